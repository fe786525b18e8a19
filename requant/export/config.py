"""The output's config.json and the files its format puts beside it, through the recipe's writer."""

from __future__ import annotations

import copy
from typing import Any

from requant.export import ExportFormat, OutputModules, compressed_tensors, modelopt, quark
from requant.export.draft_names import draft_head_names
from requant.manifest import HF_QUANT_CONFIG
from requant.recipe import Recipe


def strip_quantization_configs(config: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with every ``quantization_config`` key removed at any depth."""
    out = {}
    for key, value in config.items():
        if key == "quantization_config":
            continue
        out[key] = strip_quantization_configs(value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def output_config(upstream: dict[str, Any], recipe: Recipe, modules: OutputModules) -> dict[str, Any]:
    """The output config.json: upstream verbatim, nested quantization configs removed (the upstream's describes
    weights that are no longer there), the recipe's export format's own added; without MTP layers when the recipe
    drops them."""
    config = strip_quantization_configs(upstream)
    if recipe.mtp == "drop":
        for text in (config, config.get("text_config")):
            if isinstance(text, dict) and text.get("num_nextn_predict_layers"):
                text["num_nextn_predict_layers"] = 0
    if recipe.quantizes:
        config["quantization_config"] = quantization_config(recipe, modules)
    return config


def quantization_config(recipe: Recipe, modules: OutputModules) -> dict[str, Any]:
    """The top-level ``quantization_config`` of the recipe's export format (Quark lists the excluded modules by
    name, compressed-tensors writes patterns per class, Model Optimizer wildcards over the module names)."""
    if recipe.export == ExportFormat.COMPRESSED_TENSORS:
        return compressed_tensors.quantization_config(recipe)
    if recipe.export == ExportFormat.MODELOPT:
        return modelopt.quantization_config(_hf_quant_config(recipe, modules))
    return quark.quantization_config(recipe, list(modules.excluded))


def side_files(recipe: Recipe, modules: OutputModules) -> dict[str, bytes]:
    """The files the recipe's export format writes beside config.json (Model Optimizer: hf_quant_config.json)."""
    if recipe.export == ExportFormat.MODELOPT and recipe.quantizes:
        return {HF_QUANT_CONFIG: modelopt.hf_quant_config_bytes(_hf_quant_config(recipe, modules))}
    return {}


def _hf_quant_config(recipe: Recipe, modules: OutputModules) -> dict[str, Any]:
    """Model Optimizer's exclude list names every unquantized module, and also the head of an unquantized MTP layer
    as SGLang's draft model asks about it (which Model Optimizer does not write; requant.export.draft_names)."""
    unquantized = set(modules.unquantized)
    return modelopt.hf_quant_config(recipe, sorted(unquantized | draft_head_names(unquantized)), list(modules.quantized))
