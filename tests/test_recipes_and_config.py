"""Recipes as schema-checked data; Quark's quantization_config pieces checked against Quark itself."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import yaml

from requant.errors import RequantError
from requant.export import ExportFormat
from requant.export.compressed_tensors import ignore_list
from requant.export.draft_names import mtp_draft_names
from requant.export.modelopt import QUANT_ALGOS
from requant.export.quark import fused_excludes, is_quark_linear_weight, quantization_config
from requant.formats.table import WEIGHT_FORMATS
from requant.recipe import LANES, builtin_names, load_checks, load_recipe, parse_checks, parse_recipe
from requant.testing.quark_reference import quark_config_dict
from requant.verification import verify


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_recipe_is_one_complete_file(name):
    """A built-in recipe is its file alone: valid, named as its file, and stating what the oracle needs (its
    Quark equivalent, whose scheme is its global format's and whose layer_config names only formats it uses;
    tests/test_convert_vs_quark.py then compares the bytes with Quark's export) and the test lanes need."""
    recipe, checks = load_recipe(name), load_checks(name)
    assert recipe.name == checks.name == name and recipe.source == f"builtin:{name}"
    if recipe.export == ExportFormat.COMPRESSED_TENSORS:  # tests/test_convert_vs_llmcompressor.py: its bytes
        assert checks.llmcompressor is not None and checks.quark is None, name
        assert checks.llmcompressor.ignore == tuple(ignore_list(recipe))  # the same list, so the same config
        return
    if recipe.export == ExportFormat.MODELOPT:  # tests/test_convert_vs_modelopt.py: its bytes
        assert checks.modelopt is not None and checks.quark is None and checks.llmcompressor is None, name
        assert checks.modelopt.scheme == QUANT_ALGOS[recipe.format][0]
        return
    assert checks.quark is not None, f"requant/recipes/{name}.yaml states no quark_equivalent"
    schemes = {f.quark_scheme for fmt, f in WEIGHT_FORMATS.items() if fmt in recipe.formats}
    if recipe.quantizes:
        assert checks.quark.scheme == WEIGHT_FORMATS[recipe.format].quark_scheme
        assert {scheme for _, scheme in checks.quark.layer_config} <= schemes
    else:  # Quark only decompresses when everything is excluded
        assert checks.quark.exclude == ("*",) and not checks.quark.layer_config
    assert set(checks.lanes) <= set(LANES)
    assert checks.vllm_cpu_stop is None or recipe.quantizes  # vLLM serves BF16 (tests/engine/test_vllm_cpu.py)


def test_the_checks_are_optional_for_your_own_recipes_and_checked_by_the_schema():
    data = _recipe_data()
    for key in ("quark_equivalent", "lanes", "vllm_cpu_stop"):
        data.pop(key, None)
    checks = parse_checks(data, "mine.yaml")
    assert checks.quark is None and checks.lanes == LANES and checks.vllm_cpu_stop is None
    assert parse_recipe(data, "mine.yaml") == parse_recipe(_recipe_data(), "mine.yaml")  # no part of the conversion
    with pytest.raises(RequantError, match="lanes/0"):
        parse_checks(_recipe_data(lanes=["gpu"]), "bad.yaml")
    with pytest.raises(RequantError, match="quark_equivalent: 'exclude' is a required property"):
        parse_checks(_recipe_data(quark_equivalent={"scheme": "mxfp4"}), "bad.yaml")
    with pytest.raises(RequantError, match="vllm_cpu_stop: 'reason' is a required property"):
        parse_recipe(_recipe_data(vllm_cpu_stop={"stage": "build_layers"}), "bad.yaml")


def test_builtin_recipes():
    k25, attn = load_recipe("amd-kimi-k25-mxfp4"), load_recipe("amd-kimi-k25-mxfp4-attn-fp8")
    assert "amd/Kimi-K2.5-MXFP4 " in k25.description + " " and "amd/Kimi-K2.5-MXFP4-AttnFP8" in attn.description
    assert k25.formats == {"mxfp4"} and attn.formats == {"mxfp4", "fp8_per_channel"}
    assert attn.layer_quant_patterns() == [("*self_attn*", "fp8_per_channel")] and k25.layer_quant_patterns() == []
    seed, amd = load_recipe("kimi-k2.6-mxfp4"), load_recipe("amd-kimi-mxfp4")
    assert seed.target("router") == "mxfp4" and amd.target("router") == "unquantized"
    assert seed.warnings and not amd.warnings
    assert load_recipe("fp8-reference").target("routed_expert") == "fp8_per_channel"
    assert not load_recipe("bf16-staging").quantizes


@pytest.mark.parametrize("recipe", [name for name in builtin_names() if load_recipe(name).quantizes
                                    and load_recipe(name).export == ExportFormat.QUARK])
def test_quantization_config_matches_quark_key_for_key(recipe):
    """What Quark builds from the recipe's quark_equivalent, for the same exclude list."""
    excluded = ["language_model.lm_head", "vision_tower.encoder.blocks.0.wo"]
    quark = load_checks(recipe).quark
    ours = quantization_config(load_recipe(recipe), excluded)
    theirs = quark_config_dict(quark.scheme, excluded, dict(quark.layer_config) or None)
    ours.pop("export")  # added by Quark's exporter, not by Config.to_dict()
    assert ours == theirs
    assert list(ours) == list(theirs)
    assert list(ours["global_quant_config"]["weight"]) == list(theirs["global_quant_config"]["weight"])


def test_an_mtp_layers_excluded_modules_are_also_named_as_sglangs_draft_model_names_them():
    """SGLang's NextN draft model builds model.layers.N as model.decoder plus model.eh_proj (SGLang's test lane checks
    what it decides); a layer without eh_proj is no MTP layer, and the embedding and head get no draft name."""
    excluded = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                "model.layers.3.eh_proj", "model.layers.3.shared_head.head", "model.layers.3.self_attn.o_proj",
                "model.layers.3.mlp.shared_experts.gate_proj", "model.layers.3.mlp.shared_experts.up_proj"]
    assert mtp_draft_names(set(excluded)) == {"model.eh_proj", "model.decoder.self_attn.o_proj",
                                              "model.decoder.mlp.shared_experts.gate_proj",
                                              "model.decoder.mlp.shared_experts.up_proj"}
    assert fused_excludes(excluded) == sorted({
        "model.layers.0.mlp.gate_up_proj", "model.layers.3.mlp.shared_experts.gate_up_proj", "model.eh_proj",
        "model.decoder.self_attn.o_proj", "model.decoder.mlp.shared_experts.gate_proj",
        "model.decoder.mlp.shared_experts.up_proj", "model.decoder.mlp.shared_experts.gate_up_proj"})
    assert mtp_draft_names({"model.layers.3.self_attn.o_proj"}) == set()


def test_fused_module_names_are_excluded_only_where_every_shard_is():
    excluded = ["m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj", "m.layers.0.mlp.down_proj",
                "m.layers.1.mlp.shared_experts.gate_proj",  # its up_proj is quantized: no fused name
                "m.layers.1.self_attn.q_a_proj", "m.layers.1.self_attn.kv_a_proj_with_mqa", "m.lm_head"]
    fused = ["m.layers.0.mlp.gate_up_proj", "m.layers.1.self_attn.fused_qkv_a_proj",
             "m.layers.1.self_attn.fused_qkv_a_proj_with_mqa"]
    assert fused_excludes(excluded) == fused
    assert fused_excludes(excluded + fused) == []  # already there: not twice
    assert quantization_config(load_recipe("amd-kimi-mxfp4"), excluded)["exclude"] == sorted(excluded + fused)
    exact = load_recipe("amd-kimi-mxfp4", fused_excludes=False)
    assert quantization_config(exact, excluded)["exclude"] == sorted(excluded)
    assert not parse_recipe(_recipe_data(fused_excludes=False), "test").fused_excludes
    with pytest.raises(RequantError, match="fused_excludes"):
        parse_recipe(_recipe_data(fused_excludes="no"), "test")


def _recipe_data(**changes):
    data = yaml.safe_load(resources.files("requant.recipes").joinpath("amd-kimi-mxfp4.yaml").read_text())
    data.update(changes)
    return data


@pytest.mark.parametrize("change,message", [
    ({"format": "int3"}, "format"),
    ({"targets": {"routed_expert": "mxfp4"}}, "required"),
    ({"extra": 1}, "Additional properties"),
])
def test_schema_rejects_bad_recipes(change, message):
    with pytest.raises(RequantError, match=message):
        parse_recipe(_recipe_data(**change), "test.yaml")


def test_formats_may_mix_but_the_global_one_must_be_used_and_norms_stay_unquantized():
    data = _recipe_data()
    data["targets"] = dict(data["targets"], router="fp8_per_channel")
    mixed = parse_recipe(data, "mixed.yaml")
    assert mixed.layer_quant_patterns() == [("*mlp.gate", "fp8_per_channel")]
    data["format"] = "fp8_per_channel"
    assert parse_recipe(data, "mixed.yaml").layer_quant_patterns() == [("*mlp.experts*", "mxfp4")]
    data = _recipe_data(format="fp8_per_channel")
    with pytest.raises(RequantError, match="global format 'fp8_per_channel' is not the target of any class"):
        parse_recipe(data, "unused.yaml")
    with pytest.raises(RequantError, match="format is none but targets use"):
        parse_recipe(_recipe_data(format="none"), "none.yaml")
    data = _recipe_data()
    data["targets"] = dict(data["targets"], norm="mxfp4")
    with pytest.raises(RequantError, match="norm cannot be quantized"):
        parse_recipe(data, "norm.yaml")


def test_overrides_come_first_and_become_quark_patterns_first():
    data = _recipe_data(overrides=[{"pattern": "*.layers.1.mlp.experts.*", "target": "fp8_per_channel"},
                                   {"pattern": "*o_proj", "target": "mxfp4"}])
    recipe = parse_recipe(data, "overrides.yaml")
    assert recipe.target_for("language_model.model.layers.1.mlp.experts.3.up_proj") == "fp8_per_channel"
    assert recipe.target_for("language_model.model.layers.2.mlp.experts.3.up_proj") == "mxfp4"
    assert recipe.target_for("language_model.model.layers.2.self_attn.o_proj") == "mxfp4"
    assert recipe.target_for("language_model.model.layers.2.self_attn.q_b_proj") == "unquantized"
    assert recipe.layer_quant_patterns() == [("*.layers.1.mlp.experts.*", "fp8_per_channel"), ("*o_proj", "mxfp4")]
    with pytest.raises(RequantError, match="overrides/0/target"):
        parse_recipe(_recipe_data(overrides=[{"pattern": "*", "target": "int2"}]), "bad.yaml")


@pytest.mark.parametrize("pattern,target,fused", [
    ("*self_attn.q_a_proj", "mxfp4", "self_attn.fused_qkv_a_proj"),     # q_a and kv_a share one vLLM layer
    ("*.layers.1.mlp.experts.0.*", "unquantized", "mlp.experts"),        # one FusedMoE method per layer
    ("*shared_experts.up_proj", "mxfp4", "shared_experts.gate_up_proj"),
])
def test_a_recipe_that_splits_a_fused_vllm_layer_is_refused_before_converting(tiny_upstream, tmp_path, pattern,
                                                                              target, fused):
    import requant
    from requant.errors import PlanError

    data = _recipe_data(name="split", overrides=[{"pattern": pattern, "target": target}])
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=f"vLLM fuses these modules into one layer .*{fused}"):
        requant.convert(str(tiny_upstream), str(tmp_path / "out"), str(path), progress=False)
    assert not (tmp_path / "out").exists()
    data["overrides"] = [{"pattern": "*self_attn.[qk]*_a_proj*", "target": "mxfp4"}]  # both parts: allowed
    path.write_text(yaml.safe_dump(data))
    requant.convert(str(tiny_upstream), str(tmp_path / "ok"), str(path), progress=False)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())["quantization_config"]
    # an override is written even in the global format: a later class pattern must not catch its modules
    assert config["layer_quant_config"] == {"*self_attn.[qk]*_a_proj*": config["global_quant_config"]}
    assert "language_model.model.layers.1.self_attn.q_a_proj" not in config["exclude"]
    verify(str(tmp_path / "ok"))


def test_an_override_may_not_quantize_a_norm(tiny_upstream, tmp_path):
    import requant
    from requant.errors import PlanError

    path = tmp_path / "norm.yaml"
    path.write_text(yaml.safe_dump(_recipe_data(overrides=[{"pattern": "*embed_tokens", "target": "mxfp4"}])))
    with pytest.raises(PlanError, match="keeps norms and embeddings unquantized"):
        requant.convert(str(tiny_upstream), str(tmp_path / "out"), str(path), progress=False)


def test_unknown_recipe_names_the_choices():
    with pytest.raises(RequantError, match="amd-kimi-mxfp4"):
        load_recipe("nope")


@pytest.mark.parametrize("name,linear", [
    ("language_model.lm_head.weight", True),
    ("language_model.model.layers.0.input_layernorm.weight", False),
    ("language_model.model.embed_tokens.weight", False),
    ("vision_tower.encoder.blocks.0.norm0.weight", True),  # Quark's rule: only names ending in "norm" are norms
    ("vision_tower.patch_embed.proj.weight", False),
    ("language_model.model.layers.1.mlp.gate.e_score_correction_bias", False),
])
def test_quark_linear_weight_rule(name, linear):
    assert is_quark_linear_weight(name) is linear


def test_tensor_classes_follow_their_fnmatch_patterns_in_order(tiny_upstream):
    """``classify`` (one compiled expression) against the rule it implements: the first class one of whose
    fnmatch patterns matches, over every module of the tiny upstream and names that sit near the boundaries."""
    import fnmatch

    from requant.layout import CLASS_PATTERNS, classify

    def by_fnmatch(module):
        return next((cls for cls, patterns in CLASS_PATTERNS if any(fnmatch.fnmatchcase(module, p) for p in patterns)), None)

    index = json.loads((tiny_upstream / "model.safetensors.index.json").read_text())
    modules = {name.rpartition(".")[0] for name in index["weight_map"]}
    modules |= {"lm_head", "x.mlp.gate", "x.mlp.gates", "x.mlp.experts.norm", "x.self_attn.kv_a_layernorm", "norm",
                "vision_tower", "mm_projector.", "a\nb.mlp.gate", "x.mlp.gate_proj.bias", "unknown.module",
                    "model.layers.61.eh_proj", "model.layers.61.shared_head.head", "model.layers.61.shared_head.norm"}
    assert {m: classify(m) for m in modules} == {m: by_fnmatch(m) for m in modules}
    assert {classify(m) for m in modules} >= set(dict(CLASS_PATTERNS)) - {"mm_projector"}


def test_the_mtp_key_keeps_by_default_and_takes_keep_unquantized_or_drop():
    assert parse_recipe(_recipe_data(), "test").mtp == "keep"
    assert parse_recipe(_recipe_data(mtp="drop"), "test").mtp == "drop"
    kept_bf16 = parse_recipe(_recipe_data(mtp="unquantized"), "test")
    assert kept_bf16.target_for("model.layers.61.mlp.experts.0.gate_proj", in_mtp_layer=True) == "unquantized"
    assert kept_bf16.target_for("model.layers.3.mlp.experts.0.gate_proj") == "mxfp4"
    assert parse_recipe(_recipe_data(), "test").target_for("model.layers.61.mlp.experts.0.gate_proj",
                                                            in_mtp_layer=True) == "mxfp4"
    with pytest.raises(RequantError, match="mtp"):
        parse_recipe(_recipe_data(mtp="no"), "test")


def test_a_compressed_tensors_recipe_says_what_it_cannot_express():
    """compressed-tensors export: formats of its table only, one format, no overrides, no Quark-only keys; and
    --quark-version on it is refused in one line."""
    base = {**_recipe_data(), "export": "compressed-tensors"}
    for key in ("quark_equivalent", "vllm_cpu_stop", "lanes"):
        base.pop(key, None)
    assert parse_recipe(base, "ct.yaml").format_table == "compressed-tensors"
    with pytest.raises(RequantError, match="export compressed-tensors has no format fp8_per_channel"):
        parse_recipe({**base, "targets": {**base["targets"], "attention": "fp8_per_channel"}}, "ct.yaml")
    with pytest.raises(RequantError, match="quark_version applies to Quark exports"):
        parse_recipe({**base, "quark_version": "0.13"}, "ct.yaml")
    with pytest.raises(RequantError, match="takes no overrides"):
        parse_recipe({**base, "overrides": [{"pattern": "*experts.0.*", "target": "unquantized"}]}, "ct.yaml")
    with pytest.raises(RequantError, match="mtp: unquantized applies to Quark and Model Optimizer exports"):
        parse_recipe({**base, "mtp": "unquantized"}, "ct.yaml")
    with pytest.raises(RequantError, match="recipe ct-mxfp4 writes compressed-tensors, not a Quark export"):
        load_recipe("ct-mxfp4", quark_version="0.13")
