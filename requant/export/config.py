"""The output's config.json: the upstream's, with the ``quantization_config`` of the recipe's export format."""

from __future__ import annotations

import copy
from typing import Any

from requant.export import ExportFormat, compressed_tensors, quark
from requant.recipe import Recipe


def strip_quantization_configs(config: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with every ``quantization_config`` key removed at any depth."""
    out = {}
    for key, value in config.items():
        if key == "quantization_config":
            continue
        out[key] = strip_quantization_configs(value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def output_config(upstream: dict[str, Any], recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """The output config.json: upstream verbatim, nested quantization configs removed (the upstream's describes
    weights that are no longer there), the recipe's export format's own added; without MTP layers when the recipe
    drops them."""
    config = strip_quantization_configs(upstream)
    if recipe.mtp == "drop":
        for text in (config, config.get("text_config")):
            if isinstance(text, dict) and text.get("num_nextn_predict_layers"):
                text["num_nextn_predict_layers"] = 0
    if recipe.quantizes:
        config["quantization_config"] = quantization_config(recipe, excluded_modules)
    return config


def quantization_config(recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """The top-level ``quantization_config`` of the recipe's export format; ``excluded_modules``: the exact names of
    the linear weights left unquantized (Quark lists them; compressed-tensors writes patterns per class)."""
    if recipe.export == ExportFormat.COMPRESSED_TENSORS:
        return compressed_tensors.quantization_config(recipe)
    return quark.quantization_config(recipe, excluded_modules)
