"""The ``quantization_config`` AMD Quark's file-to-file export writes (0.11.2, or 0.13 for a recipe whose
``quark_version`` is 0.13), built without importing Quark.

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


def _layer_config(scheme: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    return {"input_tensors": _spec(scheme["input_tensors"], release), "output_tensors": None,
            "weight": _spec(scheme["weight"], release), "bias": None, "target_device": None}


def _spec(spec: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    """One tensor spec as a release writes it: its keys in its order, the keys it added with their values."""
    added = release.get("added_spec_keys", {})
    order = release.get("spec_key_order") or list(spec)
    return {key: spec[key] if key in spec else added[key] for key in order}


def quantization_config(recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """Quark's top-level config for ``recipe``: its global format, a ``layer_quant_config`` entry per pattern of
    another format (Quark's own pattern keys, in its order of precedence); ``excluded_modules`` are exact names.
    Written as the recipe's Quark release (``quark_version``) writes it."""
    data = quark_schemes()
    release = data["releases"][recipe.quark_version]
    config: dict[str, Any] = {
        "global_quant_config": _layer_config(data["schemes"][recipe.format], release),
        "exclude": sorted(excluded_modules),
    }
    config.update(copy.deepcopy(data["top_level"]))
    config["layer_quant_config"] = {pattern: _layer_config(data["schemes"][fmt], release)
                                    for pattern, fmt in recipe.layer_quant_patterns()}
    config["version"] = release["version"]
    config["export"] = dict(data["export"])
    return config


def output_config(upstream: dict[str, Any], recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """The output config.json: upstream verbatim, nested quantization configs removed, Quark's added."""
    config = strip_quantization_configs(upstream)
    if recipe.quantizes:
        config["quantization_config"] = quantization_config(recipe, excluded_modules)
    return config
