"""compressed-tensors "pack-quantized" INT4: unpacking and dequantization to BF16.

Layout (compressed-tensors ``pack_to_int32``): along the input dimension, 8 signed 4-bit values per
int32, least-significant nibble first; each nibble holds ``q + 8``. One scale per group of 32 input
columns, no zero point. Dequantization is ``q.to(scale.dtype) * scale``: one rounding to the scale's
dtype (BF16 for Kimi-K2.6), which is what a bit-exact BF16 staging checkpoint must reproduce.
"""

from __future__ import annotations

import torch

from requant.constants import INT4_BITS, INT4_GROUP_SIZE, INT4_OFFSET, INT4_PER_INT32


def packed_columns(in_features: int) -> int:
    """Number of int32 words per row for ``in_features`` INT4 values (padded to a multiple of 8)."""
    return -(-in_features // INT4_PER_INT32)


def unpack_int4(data_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [out, ceil(in/8)] -> int8 [out, in] holding q in [-8, 7]."""
    shifts = torch.arange(0, 32, INT4_BITS, dtype=torch.int32, device=data_packed.device)
    nibbles = (data_packed.unsqueeze(-1) >> shifts) & 0xF
    q = nibbles.reshape(data_packed.shape[0], -1)[:, :in_features] - INT4_OFFSET
    return q.to(torch.int8)


def dequantize_int4(
    data_packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int = INT4_GROUP_SIZE,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference INT4 -> high precision: ``q * scale`` rounded once to ``dtype`` (default ``scale.dtype``).

    The product of a 4-bit integer and a BF16 value is exact in FP32, so computing it in FP32 and
    rounding to BF16 equals compressed-tensors' BF16 multiply bit for bit; ``dtype=torch.float32`` is the
    exact decode (what compressed-tensors gives for a scale cast to FP32 first, as Quark 0.13 does).
    """
    q = unpack_int4(data_packed, in_features)
    scale_full = scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :in_features]
    return (q.to(torch.float32) * scale_full).to(dtype or scale.dtype)


def group_maxabs(nibble_bytes: torch.Tensor) -> torch.Tensor:
    """max |q| per group of packed INT4 codes, from their stored bytes viewed [..., groups, 16] (two nibbles
    n = q + 8 a byte): max(max n, 16 - min n) - 8, one reduction, as uint8 (0..8)."""
    lo, hi = nibble_bytes & 0xF, nibble_bytes >> 4
    reach = torch.maximum(torch.maximum(lo, hi), torch.minimum(lo, hi).neg_().add_(2 * INT4_OFFSET))
    return reach.amax(dim=-1) - INT4_OFFSET
