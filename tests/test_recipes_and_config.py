"""Recipes as schema-checked data; Quark's quantization_config pieces checked against Quark itself."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from requant.errors import RequantError
from requant.quark_config import is_quark_linear_weight, quantization_config
from requant.quark_reference import quark_config_dict
from requant.recipe import builtin_names, load_recipe, parse_recipe


def test_builtin_recipes():
    assert builtin_names() == ["amd-kimi-mxfp4", "bf16-staging", "fp8-reference", "kimi-k2.6-mxfp4"]
    seed, amd = load_recipe("kimi-k2.6-mxfp4"), load_recipe("amd-kimi-mxfp4")
    assert seed.target("router") == "mxfp4" and amd.target("router") == "unquantized"
    assert seed.warnings and not amd.warnings
    assert load_recipe("fp8-reference").target("routed_expert") == "fp8_per_channel"
    assert not load_recipe("bf16-staging").quantizes


@pytest.mark.parametrize("recipe,scheme", [("kimi-k2.6-mxfp4", "mxfp4"), ("fp8-reference", "ptpc_fp8")])
def test_quantization_config_matches_quark_key_for_key(recipe, scheme):
    excluded = ["language_model.lm_head", "vision_tower.encoder.blocks.0.wo"]
    ours = quantization_config(load_recipe(recipe), excluded)
    theirs = quark_config_dict(scheme, excluded)
    ours.pop("export")  # added by Quark's exporter, not by Config.to_dict()
    assert ours == theirs
    assert list(ours) == list(theirs)
    assert list(ours["global_quant_config"]["weight"]) == list(theirs["global_quant_config"]["weight"])


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


def test_one_format_per_recipe_and_no_quantized_norms():
    data = _recipe_data()
    data["targets"] = dict(data["targets"], router="fp8_per_channel")
    with pytest.raises(RequantError, match="exactly the declared format"):
        parse_recipe(data, "mixed.yaml")
    data = _recipe_data()
    data["targets"] = dict(data["targets"], norm="mxfp4")
    with pytest.raises(RequantError, match="norm cannot be quantized"):
        parse_recipe(data, "norm.yaml")


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
