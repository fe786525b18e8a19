"""The ``quantization_config`` compressed-tensors 0.19 carries when llm-compressor 0.14's ``model_free_ptq`` writes a
checkpoint, built without importing either.

llm-compressor quantizes every ``*.weight`` whose module does not end in "norm" and is not on its ``ignore`` list
(exact names, or ``re:`` patterns matched from the start of the name), one config group named after the preset
scheme, ``targets: ["Linear"]``, and writes the ignore list as it was given. requant writes the list from the
recipe: the patterns of each tensor class the recipe leaves unquantized (:data:`IGNORE_PATTERNS`, in the layout's
class order), which is what a user of llm-compressor passes for the same output.

One deliberate difference: llm-compressor leaves the upstream's own ``quantization_config`` nested in
``text_config`` (Kimi's INT4, describing weights that are no longer there) and adds its own beside it; requant drops
every nested one, as for Quark (:func:`requant.export.output_config`).
"""

from __future__ import annotations

import copy
from typing import Any

from requant.constants import COMPRESSED_TENSORS_VERSION
from requant.formats.table import UNQUANTIZED
from requant.layout import CLASS_PATTERNS, ENGINE_UNQUANTIZED
from requant.recipe import Recipe

# What llm-compressor's ignore list names for each tensor class, as its Kimi examples write them (regexes on module
# names; disjoint between classes, and none matches a routed expert). Norms need none: llm-compressor never
# quantizes a module whose name ends in "norm". The engines' fused names must be ignored too where they ask for
# them: vLLM splits a fused layer into its parts, SGLang 0.5.23 matches a dense MLP's ``gate_up_proj`` as it is
# (the shared experts' and attention's fused names match their class's pattern already).
IGNORE_PATTERNS: dict[str, tuple[str, ...]] = {
    "vision_tower": (r"re:.*vision_tower.*",),
    "mm_projector": (r"re:.*mm_projector.*",),
    "routed_expert": (r"re:.*mlp\.experts\..*",),
    "shared_expert": (r"re:.*shared_experts.*",),
    "router": (r"re:.*mlp\.gate$",),
    "dense_mlp": (r"re:.*mlp\.(gate|up|down|gate_up)_proj$",),  # SGLang asks for the fused gate_up_proj by name
    "norm": (),
    "attention": (r"re:.*self_attn.*",),
    "embedding": (r"re:.*embed_tokens$",),
    "lm_head": (r"re:.*lm_head$", r"re:.*shared_head\.head$"),
    "mtp_projection": (r"re:.*eh_proj$",),
}
if set(IGNORE_PATTERNS) != {name for name, _ in CLASS_PATTERNS}:
    raise ImportError("requant.export.compressed_tensors.IGNORE_PATTERNS must name every class of layout.CLASS_PATTERNS")

# Each format's config group: llm-compressor's preset name (the group's key) and the scheme compressed-tensors
# 0.19 dumps for it.
SCHEMES: dict[str, tuple[str, dict[str, Any]]] = {
    "mxfp4": ("MXFP4A16", {
        "format": "mxfp4-pack-quantized",
        "input_activations": None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": None, "observer_kwargs": {}, "scale_dtype": "torch.uint8", "strategy": "group",
                    "symmetric": True, "type": "float", "zp_dtype": None},
    }),
    "nvfp4": ("NVFP4A16", {
        "format": "nvfp4-pack-quantized",
        "input_activations": None,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 16, "num_bits": 4,
                    "observer": None, "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn",
                    "strategy": "tensor_group", "symmetric": True, "type": "float", "zp_dtype": None},
    }),
}


def ignore_list(recipe: Recipe) -> list[str]:
    """The ignore list of ``recipe``'s output: the patterns of every class it leaves unquantized, in layout order
    (the classes no recipe may quantize included)."""
    return [pattern for cls, _ in CLASS_PATTERNS
            if cls in ENGINE_UNQUANTIZED or recipe.target(cls) == UNQUANTIZED
            for pattern in IGNORE_PATTERNS[cls]]


def quantization_config(recipe: Recipe) -> dict[str, Any]:
    """compressed-tensors' top-level config for ``recipe`` (one format: :func:`requant.recipe._check_export`), keys in
    the order llm-compressor's sorted dump has them."""
    group, scheme = SCHEMES[recipe.format]
    return {
        "config_groups": {group: copy.deepcopy(scheme)},
        "format": scheme["format"],
        "global_compression_ratio": None,
        "ignore": ignore_list(recipe),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
