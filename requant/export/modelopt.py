"""NVIDIA Model Optimizer 0.47's unified Hugging Face export, built without importing it: ``hf_quant_config.json``
and the ``quantization_config`` it puts in config.json (``quant_method: modelopt``).

Model Optimizer lists every module that carries a quantizer but quantizes nothing (every Linear, Embedding and
Conv it leaves alone, and the MoE routers) in ``exclude_modules``, summarized with prefix wildcards: each such
module is named by the shortest of ``<prefix>*``, ``<prefix>.*`` or its own name (prefixes cut at dots, shortest
first) that names no quantized module. Engines match the list with shell wildcards (vLLM and SGLang: fnmatch).
config.json's ``quantization_config`` is that file turned into compressed-tensors' shape
(``convert_hf_quant_config_format``): one config group ``group_0`` of ``Linear`` targets, the list as ``ignore``.
"""

from __future__ import annotations

import bisect
import fnmatch
import json
from typing import Any

from requant.constants import MODELOPT_VERSION
from requant.formats.nvfp4 import NVFP4_GROUP
from requant.recipe import Recipe

PRODUCER = {"name": "modelopt", "version": MODELOPT_VERSION}
# Each format's quant_algo and block size: weight-only, as a data-free export has no activation scales to calibrate
QUANT_ALGOS: dict[str, tuple[str, int]] = {"nvfp4": ("W4A16_NVFP4", NVFP4_GROUP)}


def _names_a_prefix(sorted_names: list[str], prefix: str) -> bool:
    """Whether a name of ``sorted_names`` starts with ``prefix``."""
    i = bisect.bisect_left(sorted_names, prefix)
    return i < len(sorted_names) and sorted_names[i].startswith(prefix)


def _exclude_entry(module: str, quantized: list[str], quantized_set: set[str]) -> str:
    """The one ``exclude_modules`` entry that names ``module`` (unquantized) and no module of ``quantized``."""
    for i, char in enumerate(module):
        if char != ".":
            continue
        prefix = module[:i]
        if not _names_a_prefix(quantized, prefix):
            return prefix + "*"
        if prefix not in quantized_set and not _names_a_prefix(quantized, prefix + "."):
            return prefix + ".*"
    return module


def exclude_modules(unquantized: list[str], quantized: list[str]) -> list[str]:
    """``exclude_modules`` for modules that carry a quantizer but are left ``unquantized``, beside the
    ``quantized`` ones: one wildcard entry per module (shared where they coincide), sorted."""
    ordered = sorted(quantized)
    members = set(ordered)
    return sorted({_exclude_entry(module, ordered, members) for module in unquantized})


def excluded(module: str, exclude: list[str]) -> bool:
    """Whether an engine reading ``exclude_modules`` leaves ``module`` unquantized (a shell-wildcard match)."""
    return any(fnmatch.fnmatchcase(module, pattern) for pattern in exclude)


def hf_quant_config(recipe: Recipe, unquantized: list[str], quantized: list[str]) -> dict[str, Any]:
    """``hf_quant_config.json`` for ``recipe`` (one format), keys in Model Optimizer's order."""
    algo, group = QUANT_ALGOS[recipe.format]
    return {"producer": dict(PRODUCER),
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": group,
                             "exclude_modules": exclude_modules(unquantized, quantized)}}


def hf_quant_config_bytes(config: dict[str, Any]) -> bytes:
    """The file as Model Optimizer writes it (``json.dump`` with an indent of 4, no final newline)."""
    return json.dumps(config, indent=4).encode()


def quantization_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config``: ``hf_quant_config.json`` in compressed-tensors' shape."""
    quant = hf_config["quantization"]
    return {
        "config_groups": {"group_0": {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant["group_size"]},
            "targets": ["Linear"]}},
        "ignore": list(quant["exclude_modules"]),
        "quant_algo": quant["quant_algo"],
        "producer": dict(hf_config["producer"]),
        "quant_method": "modelopt",
    }
