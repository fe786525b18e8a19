"""The upstream formats requant reads, one row each: what ``config.json`` declares, how a module's weight is
stored under it, and how that storage decodes. Planning reads the declaration (:func:`detect_source`) and each
module's tensors (:func:`stored_as`), and refuses a checkpoint whose tensors are not what it declares, before any
job runs. :func:`decode_stored` is each storage's reference decode (the reference server's); the layer job takes
the same kernels, and the fused paths of :mod:`requant.formats.table` where a target has one.

The family's releases, and what each stores quantized:

- ``int4``: compressed-tensors ``pack-quantized`` INT4, group 32 (Kimi-K2-Thinking, K2.5, K2.6: routed experts).
- ``fp8-block``: ``quant_method: fp8``, E4M3 weights with FP32 ``weight_scale_inv`` per 128x128 block
  (DeepSeek-V3/V3.1/R1, Kimi-K2-Instruct: every Linear of the decoder layers but the router); V3.1's
  ``scale_fmt: ue8m0`` holds powers of two only.
- ``mxfp4``: compressed-tensors ``mxfp4-pack-quantized`` (E2M1 codes two per byte, E8M0 scale per 32), the
  format of quantization-aware-trained MXFP4 releases.
- ``nvfp4``: compressed-tensors ``nvfp4-pack-quantized`` (E2M1 codes two per byte, FP8 E4M3 scale per 16, FP32
  global scale per tensor), llm-compressor's NVFP4 releases (and requant's ``ct-nvfp4a16``).
- ``nvfp4-modelopt``: NVIDIA Model Optimizer's ``quant_method: modelopt`` NVFP4 (``weight`` codes two per byte, FP8
  E4M3 ``weight_scale`` per 16, FP32 ``weight_scale_2`` per tensor, the reciprocal of compressed-tensors' global
  scale), NVIDIA's NVFP4 releases (``quant_algo: NVFP4``, whose activation ``input_scale`` is left behind: the
  targets quantize weights only) and requant's ``modelopt-nvfp4`` (``W4A16_NVFP4``).
- ``bf16``: no ``quantization_config`` (a fine-tune published unquantized).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from requant.constants import FP8_BLOCK_DEFAULT, INT4_GROUP_SIZE, MX_BLOCK_SIZE, UE8M0_SCALE_FMT
from requant.errors import CheckpointError
from requant.formats.fp8_block import block_grid, dequantize_fp8_block
from requant.formats.int4 import dequantize_int4, packed_columns
from requant.formats.mxfp4 import dequantize_mxfp4
from requant.formats.nvfp4 import NVFP4_GROUP, dequantize_nvfp4, dequantize_nvfp4_modelopt
from requant.io.safetensors import TORCH_TO_NAME


class SourceFormat(StrEnum):
    """An upstream checkpoint's weight format, as the manifest, the card and ``requant plan`` name it."""

    INT4 = "int4"
    FP8_BLOCK = "fp8-block"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"
    NVFP4_MODELOPT = "nvfp4-modelopt"
    BF16 = "bf16"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    SourceFormat.INT4: "compressed-tensors pack-quantized INT4, group 32",
    SourceFormat.FP8_BLOCK: "FP8 E4M3 with FP32 block scales (weight_scale_inv)",
    SourceFormat.MXFP4: "compressed-tensors mxfp4-pack-quantized (E2M1, E8M0 scale per 32)",
    SourceFormat.NVFP4: "compressed-tensors nvfp4-pack-quantized (E2M1, FP8 scale per 16, FP32 global scale)",
    SourceFormat.NVFP4_MODELOPT: "Model Optimizer NVFP4 (E2M1, FP8 weight_scale per 16, FP32 weight_scale_2)",
    SourceFormat.BF16: "unquantized (BF16)",
}

# How a module's weight is stored, by task kind: the tensors after the module name, in the task's input order.
# "dense" is a plain ``weight`` (BF16/F16/F32), which every source format may hold for the modules it leaves alone.
MODULE_PARAMS: dict[str, tuple[str, ...]] = {
    "dense": ("weight",),
    "int4": ("weight_packed", "weight_scale", "weight_shape"),
    "fp8_block": ("weight", "weight_scale_inv"),
    "mxfp4": ("weight_packed", "weight_scale"),
    "nvfp4": ("weight_packed", "weight_scale", "weight_global_scale"),
    "nvfp4_modelopt": ("weight", "weight_scale", "weight_scale_2"),
}
# Tensors a kind may carry beside MODULE_PARAMS that no target needs, left behind: the activation scale of a
# Model Optimizer NVFP4 (W4A4) release
DROPPED_PARAMS: dict[str, tuple[str, ...]] = {"nvfp4_modelopt": ("input_scale",)}
QUANTIZED_KIND = {SourceFormat.INT4: "int4", SourceFormat.FP8_BLOCK: "fp8_block", SourceFormat.MXFP4: "mxfp4",
                  SourceFormat.NVFP4: "nvfp4", SourceFormat.NVFP4_MODELOPT: "nvfp4_modelopt"}
# How each NVFP4 storage decodes its MODULE_PARAMS (packed, scales, global scale) to ``dtype``: compressed-tensors'
# global scale divides, Model Optimizer's weight_scale_2 multiplies
NVFP4_DECODERS = {"nvfp4": dequantize_nvfp4, "nvfp4_modelopt": dequantize_nvfp4_modelopt}
# The NVFP4 quant_algo values of a Model Optimizer config whose weights requant reads
MODELOPT_NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")
DECODED_DTYPE = "BF16"  # what a quantized upstream weight decodes to (the high-precision dtype of its outputs)


@dataclass(frozen=True)
class Source:
    """An upstream's declared format and the parameters its tensors are checked against."""

    format: SourceFormat
    block: tuple[int, int] | None = None  # fp8-block: weight_block_size (rows, columns)
    scale_fmt: str | None = None  # fp8-block: "ue8m0" when every scale is a power of two

    @property
    def quantized_kind(self) -> str | None:
        return QUANTIZED_KIND.get(self.format)

    def record(self) -> dict[str, Any]:
        """As the manifest stores it."""
        out: dict[str, Any] = {"format": self.format.value, "description": self.format.description}
        if self.block is not None:
            out["weight_block_size"] = list(self.block)
        if self.scale_fmt is not None:
            out["scale_fmt"] = self.scale_fmt
        return out


def detect_source(quant: Any, file: str = "config.json") -> Source:
    """The source format ``config.json``'s ``quantization_config`` declares (None: BF16); anything requant does not
    read is refused in one line naming the key."""
    if quant is None:
        return Source(SourceFormat.BF16)
    if not isinstance(quant, dict):
        raise CheckpointError(file, f"quantization_config must be an object, got {type(quant).__name__}")
    method = quant.get("quant_method")
    if method == "fp8":
        return _fp8_block(quant, file)
    if method == "compressed-tensors":
        fmt = quant.get("format")
        if fmt == "pack-quantized":
            _check_groups(quant, file, (4, "int", "group", INT4_GROUP_SIZE, True), "num_bits 4, int, group, group_size 32, symmetric")
            return Source(SourceFormat.INT4)
        if fmt == "mxfp4-pack-quantized":
            _check_groups(quant, file, (4, "float", "group", MX_BLOCK_SIZE, True), "num_bits 4, float, group, group_size 32, symmetric")
            return Source(SourceFormat.MXFP4)
        if fmt == "nvfp4-pack-quantized":
            _check_groups(quant, file, (4, "float", "tensor_group", NVFP4_GROUP, True),
                          "num_bits 4, float, tensor_group, group_size 16, symmetric")
            return Source(SourceFormat.NVFP4)
        raise CheckpointError(file, f"quantization_config.format {fmt!r} is not one requant reads "
                                    "(compressed-tensors pack-quantized INT4, mxfp4-pack-quantized or "
                                    "nvfp4-pack-quantized)")
    if method == "modelopt":
        algo, group = quant.get("quant_algo"), _modelopt_group_size(quant)
        if algo not in MODELOPT_NVFP4_ALGOS or group != NVFP4_GROUP:
            raise CheckpointError(file, f"quantization_config quant_algo {algo!r}, group_size {group!r}: of Model "
                                        f"Optimizer's formats requant reads {' and '.join(MODELOPT_NVFP4_ALGOS)} "
                                        f"with group_size {NVFP4_GROUP}")
        return Source(SourceFormat.NVFP4_MODELOPT)
    raise CheckpointError(file, f"quantization_config.quant_method {method!r} is not one requant reads "
                                "(compressed-tensors, fp8, modelopt; none for BF16)")


def _modelopt_group_size(quant: dict[str, Any]) -> Any:
    """The weights' group size of Model Optimizer's config.json form (its one config group), or of the
    hf_quant_config.json form (``group_size``)."""
    groups = quant.get("config_groups")
    if isinstance(groups, dict) and len(groups) == 1 and isinstance(next(iter(groups.values())), dict):
        return (next(iter(groups.values())).get("weights") or {}).get("group_size")
    return quant.get("group_size")


def _fp8_block(quant: dict[str, Any], file: str) -> Source:
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(file, f"quantization_config.fmt {quant.get('fmt')!r}: only e4m3 FP8 is read")
    block = quant.get("weight_block_size")
    if block is None:
        raise CheckpointError(file, "quantization_config.weight_block_size is missing: per-tensor FP8 is not read, "
                                    f"block-scaled FP8 (e.g. {list(FP8_BLOCK_DEFAULT)}) is")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 0 < b <= 1 << 16 for b in block)):
        raise CheckpointError(file, f"quantization_config.weight_block_size {str(block)[:40]} is not two positive integers")
    scale_fmt = quant.get("scale_fmt")
    if scale_fmt not in (None, UE8M0_SCALE_FMT):
        raise CheckpointError(file, f"quantization_config.scale_fmt {scale_fmt!r}: only FP32 scales and "
                                    f"{UE8M0_SCALE_FMT!r} (powers of two) are read")
    return Source(SourceFormat.FP8_BLOCK, block=(block[0], block[1]), scale_fmt=scale_fmt)


def _check_groups(quant: dict[str, Any], file: str, want: tuple, said: str) -> None:
    groups = quant.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) and isinstance(g.get("weights") or {}, dict)
                                               for g in groups.values()):
        raise CheckpointError(file, "quantization_config.config_groups must map names to objects with 'weights' objects")
    for name, group in groups.items():
        w = group.get("weights") or {}
        got = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("group_size"), w.get("symmetric"))
        if got != want:
            raise CheckpointError(file, f"quantization_config.config_groups.{name}.weights {got} are not ({said})")


def stored_as(params: set[str], dtypes: dict[str, str]) -> str:
    """The task kind of a module from the names (and dtypes) of its tensors: INT4 and MXFP4 both store a
    ``weight_packed`` and a ``weight_scale``, INT4's I32 and BF16, MXFP4's U8 and U8 (a module missing one of them is
    told by the other, and then reported missing)."""
    if "weight_scale_inv" in params:
        return "fp8_block"
    if "weight_global_scale" in params:
        return "nvfp4"
    if "weight_scale_2" in params:
        return "nvfp4_modelopt"
    if "weight_shape" in params:
        return "int4"
    for packed_or_scale in ("weight_packed", "weight_scale"):
        if packed_or_scale in params and (packed_or_scale == "weight_packed" or "weight" not in params):
            return "mxfp4" if dtypes[packed_or_scale] == "U8" else "int4"
    return "dense"


def expected_params(kind: str, shape: tuple[int, int], source: Source) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """The dtypes and shape each tensor of a ``kind`` module of ``shape`` (out, in) must have."""
    out, inp = shape
    if kind == "int4":
        return {"weight_packed": (("I32",), (out, packed_columns(inp))),
                "weight_scale": (("BF16",), (out, -(-inp // INT4_GROUP_SIZE))),
                "weight_shape": (("I32", "I64"), (2,))}
    if kind == "fp8_block":
        return {"weight": (("F8_E4M3",), shape),
                "weight_scale_inv": (("F32",), block_grid(shape, source.block or FP8_BLOCK_DEFAULT))}
    if kind == "mxfp4":
        return {"weight_packed": (("U8",), (out, inp // 2)), "weight_scale": (("U8",), (out, inp // MX_BLOCK_SIZE))}
    if kind == "nvfp4":
        return {"weight_packed": (("U8",), (out, inp // 2)), "weight_scale": (("F8_E4M3",), (out, inp // NVFP4_GROUP)),
                "weight_global_scale": (("F32",), (1,))}
    if kind == "nvfp4_modelopt":
        return {"weight": (("U8",), (out, inp // 2)), "weight_scale": (("F8_E4M3",), (out, inp // NVFP4_GROUP)),
                "weight_scale_2": (("F32",), ())}
    raise ValueError(kind)


def stored_shape(kind: str, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The (out, in) shape of the weight a module stored as ``kind`` holds."""
    if kind == "int4":
        out, inp = tensors["weight_shape"].tolist()
    elif kind in ("mxfp4", "nvfp4", "nvfp4_modelopt"):  # E2M1 codes two per byte, in the first parameter
        packed = tensors[MODULE_PARAMS[kind][0]]
        out, inp = packed.shape[0], 2 * packed.shape[1]
    else:
        out, inp = tensors["weight"].shape
    return int(out), int(inp)


def decode_stored(kind: str, tensors: dict[str, torch.Tensor], source: Source,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight of a module stored as ``kind`` (a quantized upstream's storage, checked against
    :func:`expected_params`), decoded as its format's reference does: compressed-tensors' INT4, MXFP4 and NVFP4
    decompressors, DeepSeek's FP8 block kernel; BF16 (the others' values are BF16 values; NVFP4's ``e2m1 * (s / g)``
    is rounded to ``dtype`` once, from FP32). Raises ValueError naming the parameter whose dtype or shape is
    wrong."""
    shape = stored_shape(kind, tensors)
    for param, (dtypes, want) in expected_params(kind, shape, source).items():
        got = tensors[param]
        if TORCH_TO_NAME.get(got.dtype) not in dtypes or tuple(got.shape) != want:
            raise ValueError(f"{param}: expected {'/'.join(dtypes)} {list(want)}, got {got.dtype} {list(got.shape)}")
    if kind == "int4":
        return dequantize_int4(tensors["weight_packed"], tensors["weight_scale"], shape[1])
    if kind == "fp8_block":
        return dequantize_fp8_block(tensors["weight"], tensors["weight_scale_inv"], source.block or FP8_BLOCK_DEFAULT)
    if kind == "mxfp4":
        return dequantize_mxfp4(tensors["weight_packed"], tensors["weight_scale"], torch.bfloat16)
    if kind in NVFP4_DECODERS:
        return NVFP4_DECODERS[kind](*(tensors[param] for param in MODULE_PARAMS[kind]), dtype)
    raise ValueError(f"{kind!r} is not a quantized storage")

