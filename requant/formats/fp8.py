"""Per-output-channel FP8 E4M3 weights, as AMD Quark 0.11 exports its ``ptpc_fp8`` scheme.

Quark's weight path for a BF16 matrix: the per-row amax is taken in the weight's dtype, the scale is
``amax / 448`` in that dtype (an all-zero row gets FP32 eps), the weight is divided by the scale in that
dtype, clamped to +-448 and cast to ``float8_e4m3fn``. The scale is exported in the weight's dtype, shape [out].
Those roundings are part of the format: an "equivalent" FP32 computation gives different bytes.

Quark 0.13 (the ``*_q13`` functions) computes and stores every scale in FP32: ``s = fp32(amax) / 448``. An FP32
weight (its exact INT4 decode) is divided by that scale in FP32. A BF16 weight is still divided in BF16 by the scale
rounded to BF16, so its FP8 bytes equal 0.11's while the stored scale is the unrounded FP32 one. Where that BF16
rounding underflows to zero (rows whose amax is below about 2**-125), Quark 0.13 divides by zero and writes NaN and
+-448; requant writes the row as 0.11 does (divided by eps) and stores eps, so the checkpoint stays finite.
"""

from __future__ import annotations

import torch

from requant.constants import FP8_E4M3_MAX, INT4_GROUP_SIZE
from requant.formats.int4 import group_maxabs


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn [out, in], scale [out] in weight.dtype)."""
    if weight.dim() != 2:
        raise ValueError(f"per-channel FP8 expects a 2-D weight, got shape {tuple(weight.shape)}")
    scale = fp8_per_channel_scale(weight)
    data = (weight / scale.unsqueeze(1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return data, scale


def fp8_per_channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """The scale [out] of ``quantize_fp8_per_channel(weight)``, without quantizing."""
    return _scale_of_amax(weight.abs().amax(dim=1))


def _scale_of_amax(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / FP8_E4M3_MAX
    eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=amax.dtype, device=amax.device)
    return torch.where(scale == 0, eps, scale)


def fp8_per_channel_scale_from_int4(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The scale [out] of ``quantize_fp8_per_channel(dequantize_int4(data_packed, scale, in_features))``, from the
    packed codes without decoding them: a row's amax is the largest ``max|q| * |s|`` over its groups (exact in FP32)
    rounded once to the scale's dtype, since rounding is monotonic and symmetric."""
    rows = data_packed.shape[0]
    groups = in_features // INT4_GROUP_SIZE
    nibbles = data_packed.contiguous().view(torch.uint8).view(rows, groups, INT4_GROUP_SIZE // 2)
    maxabs = group_maxabs(nibbles).to(torch.float32)
    amax = (maxabs * scale[:, :groups].to(torch.float32).abs()).amax(dim=1).to(scale.dtype)
    return _scale_of_amax(amax)


def fp8_per_channel_scale_q13(weight: torch.Tensor) -> torch.Tensor:
    """Quark 0.13's stored scale [out] (FP32) of ``weight``; see :func:`quantize_fp8_per_channel_q13`."""
    scale = _scale_of_amax(weight.abs().amax(dim=1).to(torch.float32))
    if weight.dtype != torch.float32:
        eps = torch.finfo(torch.float32).eps
        scale = torch.where(scale.to(weight.dtype) == 0, torch.full_like(scale, eps), scale)
    return scale


def quantize_fp8_per_channel_q13(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn [out, in], FP32 scale [out]) as Quark 0.13 exports ``ptpc_fp8``: the
    division happens in the weight's dtype, by the scale rounded to it (a no-op for FP32)."""
    if weight.dim() != 2:
        raise ValueError(f"per-channel FP8 expects a 2-D weight, got shape {tuple(weight.shape)}")
    scale = fp8_per_channel_scale_q13(weight)
    divisor = scale.to(weight.dtype).unsqueeze(1)
    data = (weight / divisor).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return data, scale


def fp8_per_channel_scale_from_int4_q13(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The scale of ``quantize_fp8_per_channel_q13`` of the exact (FP32) INT4 decode, from the packed codes."""
    rows = data_packed.shape[0]
    groups = in_features // INT4_GROUP_SIZE
    nibbles = data_packed.contiguous().view(torch.uint8).view(rows, groups, INT4_GROUP_SIZE // 2)
    maxabs = group_maxabs(nibbles).to(torch.float32)
    return _scale_of_amax((maxabs * scale[:, :groups].to(torch.float32).abs()).amax(dim=1))


def dequantize_fp8_per_channel(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (data.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)).to(dtype)
