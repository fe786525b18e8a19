"""SGLang 0.5.23's own decisions for every recipe's output: its model classes, built as `sglang serve` builds them
(requant.engines.sglang_decide, on the CPU), pick a quantization method per layer and its weight loaders take the
checkpoint's tensors. SGLang is the oracle: nothing of its matching is re-implemented here.

Without requant's fused names in the exclude list, SGLang builds BF16 dense MLPs and shared experts as quantized
`gate_up_proj` layers and cannot load them; the last test keeps that case honest.
"""

from __future__ import annotations

import json

import pytest
from engine_support import RECIPES, checkpoint_targets

import requant
from requant.cli import main
from requant.engines.sglang import BLACKWELL, MI355X, ROUTER, Decision, decide, summarize
from requant.export import ExportFormat
from requant.recipe import load_recipe

# Quark recipes that quantize but keep the dense MLP BF16, which SGLang fuses into gate_up_proj (the others quantize
# it or are all BF16), converted a second time with Quark's exclude list exactly (--no-fused-excludes).
EXACT = tuple(r for r in RECIPES if load_recipe(r).quantizes and load_recipe(r).export == ExportFormat.QUARK
              and load_recipe(r).target("dense_mlp") == "unquantized")
# NVFP4 recipes whose format can give an expert's gate and up projections separate global scales (llm-compressor's
# bytes, --no-shared-global-scale), converted a second time so.
SEPARATE = tuple(r for r in RECIPES if "nvfp4" in dict(load_recipe(r).targets).values()
                 and load_recipe(r).export == ExportFormat.COMPRESSED_TENSORS)
NVFP4 = tuple(r for r in RECIPES if "nvfp4" in dict(load_recipe(r).targets).values())


def _summary(decision: Decision, recipe: str, draft: bool = False) -> dict:
    return summarize(decision, checkpoint_targets(decision.checkpoint, draft), load_recipe(recipe).export)


@pytest.fixture(scope="module")
def sglang(sglang_python, engine_variants, tmp_path_factory) -> dict[str, Decision]:
    """SGLang's decisions (model built on the CPU, every tensor fed to its loaders) for the recipes' outputs and
    the exact-exclude variants, in one SGLang process."""
    root = tmp_path_factory.mktemp("sglang-exact")
    paths = {recipe: engine_variants[recipe] for recipe in RECIPES}
    for recipe in EXACT:
        requant.convert(str(engine_variants["upstream"]), str(root / recipe), recipe, progress=False,
                      fused_excludes=False)
        paths[f"{recipe} exact"] = root / recipe
    for recipe in SEPARATE:
        requant.convert(str(engine_variants["upstream"]), str(root / f"{recipe}-separate"), recipe, progress=False,
                        shared_global_scale=False)
        paths[f"{recipe} separate"] = root / f"{recipe}-separate"
    return dict(zip(paths, decide(list(paths.values()), load=True, interpreter=sglang_python)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_sglang_decides_per_layer_what_the_recipe_intends(recipe, sglang, engine_variants):
    """Every layer SGLang builds gets the method the recipe intends for its tensor class, and its loaders take every
    tensor; an MXFP4 router excepted: SGLang's router (MoEGate) is a BF16 parameter whatever the config says, so
    loading stops there, as the recipe warns."""
    decision = sglang[recipe]
    assert decision.sglang == "0.5.23" and decision.built, decision.probe.stopped
    # the device SGLang was told it runs on: a B200 for NVFP4 (its NVFP4 MoE methods need Blackwell), else a MI355X
    assert f"device capability {BLACKWELL if recipe in NVFP4 else MI355X}" in decision.stand_ins
    summary = _summary(decision, recipe)
    assert summary["classes"].keys() == {"embedding", "attention", "dense_mlp", "router", "routed_expert",
                                         "shared_expert", "lm_head"}
    layers = {layer.prefix: layer for layer in decision.probe.layers}
    for fused in ("language_model.model.layers.0.mlp.gate_up_proj",
                  "language_model.model.layers.1.mlp.shared_experts.gate_up_proj",
                  "language_model.model.layers.1.self_attn.fused_qkv_a_proj_with_mqa"):
        assert layers[fused].layer_type in ("MergedColumnParallelLinear", "ReplicatedLinear"), fused
    router_quantized = load_recipe(recipe).target("router") != "unquantized"
    mismatched = {m["prefix"] for m in summary["mismatches"]}
    if not router_quantized:
        assert not mismatched, summary["mismatches"]
        assert decision.load["ok"] and decision.probe.ready
    else:
        assert mismatched == {p for p, la in layers.items() if la.tensor_class == "router"}
        assert all(layers[p].quant_method == ROUTER for p in mismatched)
        stopped = decision.probe.stopped
        assert stopped["stage"] == "load_weights" and "Attempted to load weight" in stopped["error"], stopped
    if load_recipe(recipe).target("attention") == "fp8_per_channel":
        assert decision.probe.decision(layers["language_model.model.layers.1.self_attn.fused_qkv_a_proj_with_mqa"]) \
            == "QuarkLinearMethod/QuarkW8A8Fp8"


# What SGLang's NVFP4 MoE kernel preparation says when an expert's gate and up global scales differ (weight-only).
SCALES_REFUSED = "NVFP4 weight-only MoE requires the gate and up projections of each expert to share one weight_global_scale"


@pytest.mark.parametrize("recipe", NVFP4)
def test_sglang_reads_one_global_scale_per_expert_and_the_recipe_gives_it_one(recipe, sglang):
    """SGLang fuses an expert's gate_proj and up_proj into one w13 weight with a [experts, 2] global-scale parameter
    and keeps one column for both when it prepares its kernels. The recipe's output shares one scale per expert,
    so its loaders see equal columns and the preparation passes the scale check (Model Optimizer's method then
    prepares completely on the CPU; compressed-tensors' weight-only one stops at the Marlin workspace, a CUDA
    kernel)."""
    scales = sglang[recipe].global_scales
    moe = [la.prefix for la in sglang[recipe].probe.layers if la.layer_type == "FusedMoE"]
    assert [s["prefix"] for s in scales] == moe and moe, scales
    for s in scales:
        assert s["gate_up_differ"] == 0 and s["experts"] > 1, s
        assert s["prepare"]["ok"] or SCALES_REFUSED not in s["prepare"]["error"], s
        if load_recipe(recipe).export == ExportFormat.MODELOPT:
            assert s["prepare"]["ok"], s
        else:
            assert "Torch not compiled with CUDA" in s["prepare"]["error"], s


@pytest.mark.parametrize("recipe", SEPARATE)
def test_sglang_refuses_separate_gate_and_up_global_scales(recipe, sglang, capsys):
    """llm-compressor's bytes (--no-shared-global-scale: each projection its own global scale) load, but SGLang's
    weight-only NVFP4 MoE method refuses them when it prepares its kernels, naming the experts: why sharing is the
    default. ``requant engine-probe --engine sglang --load`` says so and exits 1."""
    decision = sglang[f"{recipe} separate"]
    scales = decision.global_scales
    assert scales
    for s in scales:
        assert s["gate_up_differ"] == s["experts"], s
        assert not s["prepare"]["ok"] and SCALES_REFUSED in s["prepare"]["error"], s
    assert main(["engine-probe", decision.checkpoint, "--engine", "sglang", "--load"]) == 1
    printed = capsys.readouterr().out
    assert SCALES_REFUSED in printed
    assert all(f"differs: {s['prefix']} (routed_expert): gate and up global scales differ" in printed for s in scales)


@pytest.mark.parametrize("recipe", EXACT)
def test_without_the_fused_names_sglang_quantizes_bf16_gate_up_proj(recipe, sglang, engine_variants):
    """Quark's own exclude list names gate_proj and up_proj, never SGLang's fused gate_up_proj, which SGLang
    0.5.23 then builds in the checkpoint's global format: the BF16 weights do not fit (MXFP4: its loader asserts;
    FP8: the MoE block cannot even be built). The default output excludes the fused names too."""
    decision = sglang[f"{recipe} exact"]
    summary = _summary(decision, recipe)
    gate_up = {m["prefix"] for m in summary["mismatches"] if m["prefix"].endswith(".gate_up_proj")}
    assert gate_up, summary["mismatches"]
    assert all(m["engine"].startswith("QuarkLinearMethod/") and m["recipe"] == "UnquantizedLinearMethod"
               for m in summary["mismatches"] if m["prefix"] in gate_up)
    assert "language_model.model.layers.0.mlp.gate_up_proj" in gate_up
    assert not decision.probe.ready
    exclude = json.loads((engine_variants[recipe] / "config.json").read_text())["quantization_config"]["exclude"]
    assert gate_up <= set(exclude)  # what the default output adds, and why SGLang decides right on it


@pytest.fixture(scope="module")
def sglang_deepseek(sglang_python, deepseek_variants, tmp_path_factory) -> dict[str, Decision]:
    """SGLang's decisions for the DeepSeek-V3 layout's outputs: the main model and the MTP draft model
    (``--speculative-algorithm NEXTN``), each built on the CPU and fed every tensor; one output again with Quark's
    exclude list exactly."""
    paths = {recipe: deepseek_variants[recipe] for recipe in RECIPES}
    exact = tmp_path_factory.mktemp("deepseek-exact") / "amd-kimi-mxfp4"
    requant.convert(str(deepseek_variants["upstream"]), str(exact), "amd-kimi-mxfp4", progress=False,
                    fused_excludes=False)
    paths["amd-kimi-mxfp4 exact"] = exact
    return dict(zip(paths, decide(list(paths.values()), load=True, interpreter=sglang_python)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_sglang_decides_the_deepseek_v3_layout_and_its_mtp_layer_as_the_recipe_intends(recipe, sglang_deepseek):
    """The main model and the MTP draft model SGLang builds from the same checkpoint (its ``model.decoder`` block,
    ``model.eh_proj``, its head) decide every layer as the recipe intends and load every tensor; an MXFP4 router
    stops loading, as in the Kimi layout."""
    decision = sglang_deepseek[recipe]
    assert decision.draft is not None, "no MTP draft model was built"
    draft_layers = {layer.prefix: layer for layer in decision.draft.probe.layers}
    assert {"model.decoder.mlp.experts", "model.decoder.self_attn.o_proj"} <= draft_layers.keys()
    if load_recipe(recipe).quantizes and load_recipe(recipe).export == ExportFormat.QUARK:
        assert draft_layers["model.eh_proj"].tensor_class == "mtp_projection"
        assert decision.draft.probe.decision(draft_layers["model.eh_proj"]) == "UnquantizedLinearMethod"
    else:  # without a Quark config SGLang's draft builds eh_proj as a plain torch Linear, never quantized
        assert "model.eh_proj" not in draft_layers
    router_quantized = load_recipe(recipe).target("router") != "unquantized"
    for model in (decision, decision.draft):
        summary = _summary(model, recipe, draft=model is decision.draft)
        mismatched = {m["tensor_class"] for m in summary["mismatches"]}
        assert mismatched == ({"router"} if router_quantized else set()), summary["mismatches"]
        if not router_quantized:
            assert model.load["ok"] and model.probe.ready, model.probe.stopped


def test_without_the_draft_names_sglang_quantizes_the_mtp_layers_eh_proj(sglang_deepseek):
    """SGLang's draft model renames only ``model.layers.61`` to ``model.decoder`` in the exclude list, and never
    matches ``eh_proj``: with Quark's list exactly, the BF16 eh_proj (and here, at another layer index, the whole
    BF16 block) is built MXFP4 and its weight does not load."""
    draft = sglang_deepseek["amd-kimi-mxfp4 exact"].draft
    layers = {layer.prefix: layer for layer in draft.probe.layers}
    assert draft.probe.decision(layers["model.eh_proj"]) == "QuarkLinearMethod/QuarkW4A4MXFP4"
    assert draft.probe.stopped and draft.probe.stopped["stage"] == "load_weights", draft.probe.stopped
