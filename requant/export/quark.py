"""The ``quantization_config`` AMD Quark's file-to-file export writes (0.11.2, or 0.13 for a recipe whose
``quark_version`` is 0.13), built without importing Quark.

Quark's exporter deletes every nested ``quantization_config`` (compressed-tensors' included), writes its
own at the top level, and replaces the exclude patterns with the sorted exact names of the modules it
saw and left unquantized. "Saw" follows Quark's notion of a Linear weight: a tensor named ``*.weight``
whose module name does not end in "norm" and does not contain "embed".

Serving engines do not build every checkpoint module: they fuse some (``mlp.gate_proj`` + ``mlp.up_proj`` into
``mlp.gate_up_proj``, ``q_a_proj`` + ``kv_a_proj_with_mqa`` into one projection) and ask whether the fused name is
excluded. SGLang 0.5.13-0.5.23 matches the fused name against the list as it is, so a BF16 dense MLP or shared
expert is built quantized and its weights fail to load. By default (``Recipe.fused_excludes``) the list also names
each fused module whose shards are all excluded, and the names SGLang's MTP draft model gives the MTP layer's
excluded modules (``model.eh_proj``, ``model.decoder.*``); those names match no tensor, so Quark's and vLLM's
readers decide as before. ``--no-fused-excludes`` writes Quark's list exactly.
"""

from __future__ import annotations

import copy
from typing import Any

from requant.export.draft_names import mtp_draft_names
from requant.recipe import Recipe, quark_schemes


def is_quark_linear_weight(tensor_name: str) -> bool:
    if "." not in tensor_name:
        return False
    module, param = tensor_name.rsplit(".", 1)
    return param == "weight" and not module.endswith("norm") and "embed" not in module


def _layer_config(scheme: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    return {"input_tensors": _spec(scheme["input_tensors"], release), "output_tensors": None,
            "weight": _spec(scheme["weight"], release), "bias": None, "target_device": None}


def _spec(spec: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
    """One tensor spec as a release writes it: its keys in its order, the keys it added with their values."""
    added = release.get("added_spec_keys", {})
    order = release.get("spec_key_order") or list(spec)
    return {key: spec[key] if key in spec else added[key] for key in order}


# The fused modules the engines build, by their last name component, and the checkpoint modules (shards) each is
# built from: SGLang's MergedColumnParallelLinear ``gate_up_proj`` and ``fused_qkv_a_proj_with_mqa``, vLLM's
# ``gate_up_proj`` and ``fused_qkv_a_proj`` (DeepseekV2 models, which Kimi-K2.x runs as).
ENGINE_FUSED_MODULES = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj_with_mqa": ("q_a_proj", "kv_a_proj_with_mqa"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
}


def fused_excludes(excluded_modules: list[str]) -> list[str]:
    """The engines' names to exclude as well: ``X.F`` for each engine fused module ``F`` whose every shard ``X.S`` is
    excluded (a fused module with one shard quantized must stay quantized, as the engines decide), then the names
    SGLang's MTP draft model gives the MTP layers' excluded modules (:func:`requant.export.draft_names.mtp_draft_names`)."""
    excluded = set(excluded_modules)
    parents = {name.rsplit(".", 1)[0] for name in excluded if "." in name}
    fused = {f"{parent}.{name}" for parent in parents for name, shards in ENGINE_FUSED_MODULES.items()
             if all(f"{parent}.{shard}" in excluded for shard in shards)}
    return sorted((fused | mtp_draft_names(excluded | fused)) - excluded)


def quantization_config(recipe: Recipe, excluded_modules: list[str]) -> dict[str, Any]:
    """Quark's top-level config for ``recipe``: its global format, a ``layer_quant_config`` entry per pattern of
    another format (Quark's own pattern keys, in its order of precedence); ``excluded_modules`` are exact names,
    with the engines' fused names added unless the recipe says otherwise. Written as the recipe's Quark release
    (``quark_version``) writes it."""
    data = quark_schemes()
    release = data["releases"][recipe.quark_version]
    exclude = list(excluded_modules) + (fused_excludes(excluded_modules) if recipe.fused_excludes else [])
    config: dict[str, Any] = {
        "global_quant_config": _layer_config(data["schemes"][recipe.format], release),
        "exclude": sorted(exclude),
    }
    config.update(copy.deepcopy(data["top_level"]))
    config["layer_quant_config"] = {pattern: _layer_config(data["schemes"][fmt], release)
                                    for pattern, fmt in recipe.layer_quant_patterns()}
    config["version"] = release["version"]
    config["export"] = dict(data["export"])
    return config
