"""The ``quantization_config`` AMD Quark 0.11's file-to-file export writes, built without importing Quark.

Quark's exporter deletes every nested ``quantization_config`` (compressed-tensors' included), writes its
own at the top level, and replaces the exclude patterns with the sorted exact names of the modules it
saw and left unquantized. "Saw" follows Quark's notion of a Linear weight: a tensor named ``*.weight``
whose module name does not end in "norm" and does not contain "embed".
"""

from __future__ import annotations

import copy
from typing import Any

from requant.recipe import Recipe, quark_schemes


def is_quark_linear_weight(tensor_name: str) -> bool:
    if "." not in tensor_name:
        return False
    module, param = tensor_name.rsplit(".", 1)
    return param == "weight" and not module.endswith("norm") and "embed" not in module


def strip_quantization_configs(config: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with every ``quantization_config`` key removed at any depth."""
    out = {}
    for key, value in config.items():
        if key == "quantization_config":
            continue
        out[key] = strip_quantization_configs(value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def _layer_config(scheme: dict[str, Any]) -> dict[str, Any]:
    return {"input_tensors": dict(scheme["input_tensors"]), "output_tensors": None, "weight": dict(scheme["weight"]),
            "bias": None, "target_device": None}


def quantization_config(recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """Quark's top-level config for ``recipe``: its global format, a ``layer_quant_config`` entry per pattern of
    another format (Quark's own pattern keys, in its order of precedence); ``excluded_modules`` are exact names."""
    data = quark_schemes()
    config: dict[str, Any] = {
        "global_quant_config": _layer_config(data["schemes"][recipe.format]),
        "exclude": sorted(excluded_modules),
    }
    config.update(copy.deepcopy(data["top_level"]))
    config["layer_quant_config"] = {pattern: _layer_config(data["schemes"][fmt])
                                    for pattern, fmt in recipe.layer_quant_patterns()}
    config["version"] = data["version"]
    config["export"] = dict(data["export"])
    return config


def output_config(upstream: dict[str, Any], recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """The output config.json: upstream verbatim, nested quantization configs removed, Quark's added."""
    config = strip_quantization_configs(upstream)
    if recipe.quantizes:
        config["quantization_config"] = quantization_config(recipe, excluded_modules)
    return config
