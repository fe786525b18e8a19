"""The quantized weight formats a recipe can target, one row each: how a weight is encoded and decoded, which
tensors it becomes, and what AMD Quark calls it. Planning, the layer job, verification and the recipe schema
read this table instead of branching on format names, so a new format is one more row.

Each Quark release whose bytes requant reproduces has its own table (:data:`QUARK_VERSIONS`): 0.11 (Quark
0.11.2, the default) quantizes compressed-tensors' BF16 decode of INT4 weights and stores FP8 scales in the
weight's dtype; 0.13 quantizes the exact FP32 decode, stores FP8 scales in FP32 and writes E8M0 exponent -127 as
byte 1 (see the ``*_q13`` functions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from requant.constants import DEFAULT_QUARK, FP4_PER_BYTE, MX_BLOCK_SIZE, QUARK_RELEASES
from requant.formats.fp8 import (
    dequantize_fp8_per_channel,
    fp8_per_channel_scale,
    fp8_per_channel_scale_from_int4,
    fp8_per_channel_scale_from_int4_q13,
    fp8_per_channel_scale_q13,
    quantize_fp8_per_channel,
    quantize_fp8_per_channel_q13,
)
from requant.formats.fp8_block import fp8_block_to_mxfp4
from requant.formats.fused import int4_to_mxfp4
from requant.formats.fused_nvfp4 import int4_to_nvfp4
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import (
    dequantize_mxfp4,
    e8m0_q13,
    quantize_mxfp4,
    quantize_mxfp4_ct,
    quantize_mxfp4_q13,
    repack_mxfp4,
    repack_mxfp4_q13,
)
from requant.formats.nvfp4 import (
    NVFP4_GROUP,
    dequantize_nvfp4,
    dequantize_nvfp4_modelopt,
    quantize_nvfp4,
    quantize_nvfp4_modelopt,
)
from requant.io.safetensors import TensorSpec

UNQUANTIZED = "unquantized"  # target of a tensor class kept in its upstream precision
NO_FORMAT = "none"  # recipe format of a recipe that quantizes nothing


@dataclass(frozen=True)
class WeightFormat:
    name: str  # recipe format and target name
    quark_scheme: str  # Quark 0.11's template scheme (LLMTemplate ... get_config(scheme=...))
    quark_dtype: str  # global_quant_config.weight.dtype in Quark's exported config
    weight_dtype: str  # safetensors dtype of ``<module>.weight``
    elements_per_byte: int  # weight elements stored in one byte of ``weight_dtype`` along the input dimension
    scale_dtype: str | None  # of ``<module>.weight_scale``; None: the high-precision dtype of the input
    scale_block: int | None  # inputs sharing one scale; None: one scale per output channel
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # BF16/F32 weight -> (weight, scale)
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (weight, scale) -> F32 weight
    # a fused path from packed INT4 (packed, group scales, in_features[, amax= of the tensors sharing a global
    # scale]), equal to ``encode`` (``encode_shared``) of the format table's INT4 decode
    from_int4: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # the scale alone, where it comes before the weight in the file (a streamed shard's first pass needs only it):
    # from a high-precision weight, and from packed INT4 (packed, group scales, in_features)
    scale_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    scale_from_int4: Callable[..., torch.Tensor] | None = None
    # a lossless path from an upstream stored in the same format by another maker (packed, scales) -> (weight, scale)
    from_mxfp4: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # a fused path from FP8 block-scaled weights (weight, weight_scale_inv, block) -> (weight, scale), equal to
    # ``encode`` of their BF16 decode
    from_fp8_block: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    weight_name: str = "weight"  # the stored weight's name after the module's (compressed-tensors: weight_packed)
    # a third output, an FP32 scale per tensor (NVFP4's weight_global_scale), and the encoder that takes the largest
    # magnitude of the tensors sharing it: (weight, amax) -> (weight, scale, global scale)
    global_scale_name: str | None = None
    encode_shared: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    global_scale_shape: tuple[int, ...] = (1,)  # compressed-tensors' [1]; Model Optimizer's a 0-dim tensor

    def output_specs(self, module: str, shape: tuple[int, ...], hp_dtype: str) -> tuple[TensorSpec, ...]:
        """The tensors a quantized ``module`` of ``shape`` (out, in) is stored as (weight, scale[, global scale])."""
        out, inp = shape
        weight_shape = (out, inp // self.elements_per_byte)
        scale_shape = (out, inp // self.scale_block) if self.scale_block else (out,)
        specs = (TensorSpec(f"{module}.{self.weight_name}", self.weight_dtype, weight_shape),
                 TensorSpec(f"{module}.weight_scale", self.scale_dtype or hp_dtype, scale_shape))
        if self.global_scale_name:
            specs += (TensorSpec(f"{module}.{self.global_scale_name}", "F32", self.global_scale_shape),)
        return specs


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    fmt.name: fmt
    for fmt in (
        # OCP MXFP4: E2M1 codes packed two per byte, one E8M0 scale byte per 32 inputs (Quark "mxfp4")
        WeightFormat("mxfp4", "mxfp4", "fp4", "U8", FP4_PER_BYTE, "U8", MX_BLOCK_SIZE, quantize_mxfp4, dequantize_mxfp4,
                     int4_to_mxfp4, from_mxfp4=repack_mxfp4, from_fp8_block=fp8_block_to_mxfp4),
        # FP8 E4M3 with one scale per output channel in the input's precision (Quark "ptpc_fp8")
        WeightFormat("fp8_per_channel", "ptpc_fp8", "fp8_e4m3", "F8_E4M3", 1, None, None, quantize_fp8_per_channel,
                     dequantize_fp8_per_channel, scale_of=fp8_per_channel_scale,
                     scale_from_int4=fp8_per_channel_scale_from_int4),
    )
}


def _mxfp4_from_int4_q13(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed, scales = int4_to_mxfp4(data_packed, scale, in_features, exact=True)
    return packed, e8m0_q13(scales)


def _mxfp4_from_fp8_block_q13(weight: torch.Tensor, scale_inv: torch.Tensor,
                              block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    packed, scales = fp8_block_to_mxfp4(weight, scale_inv, block)
    return packed, e8m0_q13(scales)


def _fp8_from_int4_q13(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_per_channel_q13(dequantize_int4(data_packed, scale, in_features, dtype=torch.float32))


QUARK_VERSIONS: dict[str, dict[str, WeightFormat]] = {
    "0.11": WEIGHT_FORMATS,
    "0.13": {
        fmt.name: fmt
        for fmt in (
            WeightFormat("mxfp4", "mxfp4", "fp4", "U8", FP4_PER_BYTE, "U8", MX_BLOCK_SIZE, quantize_mxfp4_q13,
                         dequantize_mxfp4, _mxfp4_from_int4_q13, from_mxfp4=repack_mxfp4_q13,
                         from_fp8_block=_mxfp4_from_fp8_block_q13),
            WeightFormat("fp8_per_channel", "ptpc_fp8", "fp8_e4m3", "F8_E4M3", 1, "F32", None, quantize_fp8_per_channel_q13,
                         dequantize_fp8_per_channel, _fp8_from_int4_q13, scale_of=fp8_per_channel_scale_q13,
                         scale_from_int4=fp8_per_channel_scale_from_int4_q13),
        )
    },
}
if tuple(QUARK_VERSIONS) != QUARK_RELEASES:  # the CLI offers QUARK_RELEASES without importing this table
    raise ImportError(f"format tables {tuple(QUARK_VERSIONS)} != requant.constants.QUARK_RELEASES {QUARK_RELEASES}")


def _same_mxfp4(packed: torch.Tensor, scale_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An upstream's compressed-tensors MXFP4 written as it is: the same container, nothing to requantize."""
    return packed.clone(), scale_e8m0.clone()


# compressed-tensors 0.19 as llm-compressor 0.14's model_free_ptq writes it (``mxfp4-pack-quantized``): it quantizes
# compressed-tensors' BF16 decode of an INT4 upstream, like Quark 0.11. An MXFP4 upstream is carried over code for
# code (llm-compressor would requantize its decode with the scale rule, losing what quantization-aware training kept).
COMPRESSED_TENSORS_FORMATS: dict[str, WeightFormat] = {
    fmt.name: fmt
    for fmt in (
        WeightFormat("mxfp4", "", "", "U8", FP4_PER_BYTE, "U8", MX_BLOCK_SIZE, quantize_mxfp4_ct, dequantize_mxfp4,
                     functools.partial(int4_to_mxfp4, negative_zero=True), from_mxfp4=_same_mxfp4,
                     weight_name="weight_packed"),
        # NVFP4: E2M1 codes two per byte, an FP8 E4M3 scale per 16 inputs, an FP32 global scale per tensor (or per
        # set of tensors the engines fuse: requant.export.global_scales)
        WeightFormat("nvfp4", "", "", "U8", FP4_PER_BYTE, "F8_E4M3", NVFP4_GROUP, quantize_nvfp4, dequantize_nvfp4,
                     functools.partial(int4_to_nvfp4, encode=quantize_nvfp4), weight_name="weight_packed",
                     global_scale_name="weight_global_scale", encode_shared=quantize_nvfp4),
    )
}

# NVIDIA Model Optimizer 0.47's unified Hugging Face export (``W4A16_NVFP4``: ``weight``, ``weight_scale``,
# ``weight_scale_2``), from compressed-tensors' BF16 decode of an INT4 upstream (the weights Model Optimizer is given).
MODELOPT_FORMATS: dict[str, WeightFormat] = {
    fmt.name: fmt
    for fmt in (
        WeightFormat("nvfp4", "", "", "U8", FP4_PER_BYTE, "F8_E4M3", NVFP4_GROUP, quantize_nvfp4_modelopt,
                     dequantize_nvfp4_modelopt, functools.partial(int4_to_nvfp4, encode=quantize_nvfp4_modelopt),
                     global_scale_name="weight_scale_2", encode_shared=quantize_nvfp4_modelopt,
                     global_scale_shape=()),
    )
}

# Every table of formats whose bytes requant reproduces, by the key a task carries (TensorTask.table): one per Quark
# release, compressed-tensors' and Model Optimizer's.
COMPRESSED_TENSORS_TABLE = "compressed-tensors"
MODELOPT_TABLE = "modelopt"
FORMAT_TABLES: dict[str, dict[str, WeightFormat]] = {
    **{f"quark-{version}": table for version, table in QUARK_VERSIONS.items()},
    COMPRESSED_TENSORS_TABLE: COMPRESSED_TENSORS_FORMATS,
    MODELOPT_TABLE: MODELOPT_FORMATS,
}
DEFAULT_TABLE = f"quark-{DEFAULT_QUARK}"
# The INT4 decode each table quantizes (None: compressed-tensors' own, rounded to the scale's BF16)
INT4_DECODE_DTYPE: dict[str, torch.dtype | None] = {"quark-0.11": None, "quark-0.13": torch.float32,
                                                    COMPRESSED_TENSORS_TABLE: None, MODELOPT_TABLE: None}


def weight_formats(quark: str = DEFAULT_QUARK) -> dict[str, WeightFormat]:
    """The format table of one Quark release (:data:`QUARK_VERSIONS`)."""
    return QUARK_VERSIONS[quark]


def quark_table(quark: str) -> str:
    """The :data:`FORMAT_TABLES` key of one Quark release."""
    return f"quark-{quark}"
