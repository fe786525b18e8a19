"""vLLM 0.32 (CPU) against requant's outputs: what it loads, how it answers, what it decides per layer.

- bf16-staging of the default synthetic upstream, served exactly as written: greedy tokens and top-5
  logprobs equal to `requant serve` in float32, the smoke test passes, and lm-eval's GSM8K gives the same
  per-sample answers through both servers.
- Every other recipe: vLLM's quantization decision for each layer it builds, observed inside its own loader
  (requant/engines/vllm_probe.py, a vLLM plugin), equals what the recipe intends for that tensor class, and
  where vLLM stops on this machine is recorded with its own message (test-artifacts/engine/).
- An MXFP4 router is refused when vLLM loads its weights: its router is always built unquantized.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from engine_support import ROUTER_ONLY, tree_digest

from requant.cli import main
from requant.engines.engines import launch
from requant.engines.vllm_cpu import Probe, intended, probe_env, read_probe
from requant.errors import RequantError
from requant.evaluation.gsm8k import run_gsm8k
from requant.recipe import load_recipe
from requant.synth import PROFILES

pytestmark = pytest.mark.oracle

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "engine"
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


def _assert_decisions(probe: Probe, recipe_name: str, allowed_mismatch: set[str] = frozenset()) -> None:
    recipe = load_recipe(recipe_name)
    wrong = []
    for layer in probe.layers:
        assert layer.tensor_class is not None, f"vLLM layer {layer.prefix} ({layer.layer_type}) has no tensor class"
        want = intended(recipe.target(layer.tensor_class), layer)
        got = probe.decision(layer)
        if layer.error is None and got != want and layer.tensor_class not in allowed_mismatch:
            wrong.append(f"{layer.prefix} ({layer.tensor_class}): vLLM {got}, recipe {want}")
    assert not wrong, "\n".join(wrong)


def _report(name: str, recipe_name: str, probe: Probe) -> None:
    recipe = load_recipe(recipe_name)
    rows: dict[str, dict] = {}
    for layer in probe.layers:
        row = rows.setdefault(layer.tensor_class, {"target": recipe.target(layer.tensor_class), "types": set(),
                                                   "decisions": set(), "intended": set(), "count": 0})
        row["types"].add(layer.layer_type)
        row["decisions"].add(probe.decision(layer) or f"not built: {(layer.error or '')[:60]}")
        row["intended"].add(intended(row["target"], layer))
        row["count"] += 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = {"recipe": recipe.name, "ready": probe.ready, "stopped": probe.stopped,
            "classes": {k: {**v, **{s: sorted(v[s]) for s in ("types", "decisions", "intended")}} for k, v in rows.items()}}
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def _probe(vllm_cpu, checkpoint: Path, work: Path, **launch_kw) -> tuple[Probe, bool]:
    env, records = probe_env(work)
    try:
        with launch(vllm_cpu, str(checkpoint), served_model_name="probe", log_dir=work, max_model_len=1024,
                    env=env, warmup=True, **launch_kw):
            served = True
    except RequantError:
        served = False
    return read_probe(records), served


def _amx() -> bool:
    from requant.engines.engines import load_engines

    python = load_engines()["vllm-cpu"].python()
    out = subprocess.run([python, "-c", "import torch; print(torch.cpu._is_amx_tile_supported())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_bf16_staging_loads_unedited_with_every_layer_unquantized(bf16_vllm, engine_variants):
    probe = read_probe(bf16_vllm.records)
    assert probe.ready and probe.stopped is None
    _assert_decisions(probe, "bf16-staging")
    classes = {layer.tensor_class for layer in probe.layers}
    assert BUILT_BEFORE_LAYERS_END | {"lm_head"} <= classes, classes
    _report("bf16-staging", "bf16-staging", probe)
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


@pytest.mark.parametrize("recipe", ["amd-kimi-mxfp4", "fp8-reference", "kimi-k2.6-mxfp4"])
def test_vllm_decides_per_layer_what_the_recipe_intends(recipe, vllm_cpu, engine_variants, tmp_path):
    probe, served = _probe(vllm_cpu, engine_variants[recipe], tmp_path)
    _report(recipe, recipe, probe)
    classes = {layer.tensor_class for layer in probe.layers}
    assert BUILT_BEFORE_LAYERS_END <= classes, classes
    # The router is the one class vLLM does not take from the checkpoint's config: GateLinear is built
    # unquantized, whatever the recipe says (see the router-refusal test for what follows).
    router_mismatch = {"router"} if load_recipe(recipe).target("router") != "unquantized" else set()
    _assert_decisions(probe, recipe, router_mismatch)
    for layer in probe.layers:
        if layer.tensor_class == "router":
            assert probe.decision(layer) == "UnquantizedLinearMethod" and layer.layer_type == "GateLinear"
    if _amx():  # x86 CPUs with AMX have vLLM CPU MoE kernels for these formats; this machine was not one
        return
    assert not served and probe.stopped is not None
    if load_recipe(recipe).target("routed_expert") == "mxfp4":
        assert probe.stopped["stage"] == "build_layers"
        assert "No MXFP4 MoE backend supports the deployment configuration" in probe.stopped["error"]
        assert "backend: CPU, reason: kernel does not support current device cpu" in probe.stopped["error"]
        experts = [layer for layer in probe.layers if layer.tensor_class == "routed_expert"]
        assert experts[0].target == "QuarkOCP_MX_MoEMethod" and experts[0].error is not None
    else:
        assert probe.stopped["stage"] == "prepare_kernels"
        assert probe.stopped["error"] == "ValueError: Unsupported FP8 MoE backend: NONE"


def test_an_mxfp4_router_is_refused_when_vllm_loads_its_weights(vllm_cpu, engine_variants, tmp_path):
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
    probe, served = _probe(vllm_cpu, engine_variants[ROUTER_ONLY.stem], tmp_path)
    _report("router-only-mxfp4", str(ROUTER_ONLY), probe)
    assert not served
    _assert_decisions(probe, str(ROUTER_ONLY), {"router"})
    p = PROFILES["tiny"]
    assert probe.stopped["stage"] == "load_weights" and probe.stopped["where"].endswith("weight_loader")
    assert probe.stopped["error"] == (f"AssertionError: Tried to load weights of size torch.Size([{p.experts}, "
                                      f"{p.hidden // 2}])to a parameter of size torch.Size([{p.experts}, {p.hidden}])")
