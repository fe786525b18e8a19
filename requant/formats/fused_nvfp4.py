"""Fused INT4 (compressed-tensors pack-quantized) -> NVFP4 without BF16 matrices, equal to an NVFP4 encoder run on
compressed-tensors' BF16 decode, for any encoder whose group scale depends only on its 16 values and the tensor's
global scale, and whose element codes only on each value, its group scale and the global scale (compressed-tensors'
:func:`~requant.formats.nvfp4.quantize_nvfp4` and Model Optimizer's
:func:`~requant.formats.nvfp4.quantize_nvfp4_modelopt` both are).

Why a table is exact: an NVFP4 group (16 inputs) lies inside one INT4 group (32 inputs), so its values are
``bf16(q * s)`` for the INT4 group's BF16 scale ``s`` and codes ``q`` in -8..7; its largest magnitude is
``bf16(m * |s|)`` for ``m = max |q|`` over the 16. A group's scale and codes therefore depend only on its class
``(s, m)`` (and the tensor's global scale, fixed). The classes present in a matrix (at most one per group, in
practice a few thousand) are encoded once each, by the encoder itself, as a synthetic group holding every code
``|q| <= m`` (so its largest magnitude is the real group's); each class gives a byte table (two INT4 nibbles in, two
E2M1 codes out: the INT4 and FP4 nibble orders agree) and a group scale. Converting a group is then one gather per
byte and one per scale.

The global scale is the encoder's for the largest magnitude of the tensor (or of the tensors sharing it), which
:func:`int4_amax` reads off the INT4 groups without decoding them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from requant.constants import INT4_GROUP_SIZE, INT4_OFFSET
from requant.formats.int4 import dequantize_int4, group_maxabs, packed_columns
from requant.formats.mxfp4 import unpack_fp4
from requant.formats.nvfp4 import NVFP4_GROUP

_MAXABS = INT4_OFFSET + 1  # max |q| in 0..8
_KEYS = (1 << 16) * _MAXABS  # (BF16 scale bits, max |q|) pairs
_NIBBLES = 16
_GROUP_BYTES = NVFP4_GROUP // 2

Encoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]  # (BF16 weight, amax) -> NVFP4 tensors


def _check(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> None:
    if scale.dtype != torch.bfloat16:
        raise ValueError(f"fused INT4->NVFP4 needs BF16 group scales, got {scale.dtype}")
    out_features = data_packed.shape[0]
    if in_features % INT4_GROUP_SIZE or data_packed.shape[1] != packed_columns(in_features) \
            or tuple(scale.shape) != (out_features, in_features // INT4_GROUP_SIZE):
        raise ValueError(f"packed {tuple(data_packed.shape)} / scale {tuple(scale.shape)} do not fit shape "
                         f"({out_features}, {in_features})")


def int4_amax(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The largest magnitude of compressed-tensors' BF16 decode of INT4 weights (a BF16 scalar, as
    :func:`~requant.formats.nvfp4.tensor_amax` of the decode): ``bf16(max |q| * |s|)`` over the groups."""
    _check(data_packed, scale, in_features)
    groups = data_packed.contiguous().view(torch.uint8).view(data_packed.shape[0], -1, INT4_GROUP_SIZE // 2)
    return _amax(group_maxabs(groups), scale)


def _amax(maxabs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``bf16(max |q| * |s|)`` over the INT4 groups, from each group's max |q| [out, in/32]."""
    return (maxabs.to(torch.float32) * scale.to(torch.float32).abs()).to(torch.bfloat16).amax()


def _class_tables(keys: torch.Tensor, amax: torch.Tensor, encode: Encoder) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      list[torch.Tensor]]:
    """For the class keys present (``scale_bits * 9 + m``): the byte tables [classes * 256], the group scales
    [classes] and the encoder's other outputs (the global scale), from one synthetic group per class."""
    bits, maxabs = keys // _MAXABS, keys % _MAXABS
    q = torch.arange(_NIBBLES, device=keys.device) - INT4_OFFSET  # position n holds q = n - 8: nibble n's code
    nibbles = torch.where(q.abs().unsqueeze(0) <= maxabs.unsqueeze(1), q + INT4_OFFSET, INT4_OFFSET)  # else q = 0
    row = torch.cat([nibbles, torch.full_like(nibbles, INT4_OFFSET)], dim=1).to(torch.uint8)  # one INT4 group
    packed = (row[:, 0::2] | (row[:, 1::2] << 4)).contiguous().view(torch.int32)
    scale = bits.to(torch.int32).to(torch.int16).view(torch.bfloat16).unsqueeze(1)
    values = dequantize_int4(packed, scale, INT4_GROUP_SIZE)[:, :NVFP4_GROUP]
    codes_packed, group_scale, *rest = encode(values.contiguous(), amax)
    codes = unpack_fp4(codes_packed)  # [classes, 16]: the code of q = n - 8 at position n
    byte = torch.arange(256, device=keys.device)
    table = codes[:, byte & 0xF] | (codes[:, byte >> 4] << 4)
    return table.reshape(-1).contiguous(), group_scale.reshape(-1), rest


def int4_to_nvfp4(data_packed: torch.Tensor, scale: torch.Tensor, in_features: int, encode: Encoder,
                  amax: torch.Tensor | None = None, rows_per_block: int = 256) -> tuple[torch.Tensor, ...]:
    """INT4 [out, in/8] int32 + BF16 scale [out, in/32] -> what ``encode(bf16 decode, amax)`` returns (packed uint8
    [out, in/2], FP8 scales [out, in/16], global scale), byte for byte; ``amax``: the largest magnitude of the
    tensors sharing the global scale (default: this one's, :func:`int4_amax`)."""
    _check(data_packed, scale, in_features)
    out_features, n_groups = data_packed.shape[0], in_features // NVFP4_GROUP
    nibble_bytes = data_packed.contiguous().view(torch.uint8).view(out_features, n_groups, _GROUP_BYTES)
    maxabs = group_maxabs(nibble_bytes).to(torch.int32)  # [out, groups of 16]
    if amax is None:  # an INT4 group's max |q| is the larger of its two halves'
        amax = _amax(maxabs.view(out_features, -1, 2).amax(dim=-1), scale)
    bits = (scale.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF).repeat_interleave(2, dim=1)
    key = bits.mul_(_MAXABS).add_(maxabs)
    device = data_packed.device
    present = torch.zeros(_KEYS, dtype=torch.bool, device=device)
    present[key.view(-1)] = True
    keys = present.nonzero().flatten()
    dense = torch.empty(_KEYS, dtype=torch.int32, device=device)
    dense[keys] = torch.arange(len(keys), dtype=torch.int32, device=device)
    table, group_scales, rest = _class_tables(keys, amax, encode)
    cls = dense[key]  # [out, groups]: each group's class
    packed_out = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    for r0 in range(0, out_features, rows_per_block):
        r1 = min(r0 + rows_per_block, out_features)
        index = nibble_bytes[r0:r1].to(torch.int32).add_((cls[r0:r1] * 256).unsqueeze(-1))
        torch.index_select(table, 0, index.view(-1), out=packed_out[r0:r1].view(-1))
    scale_out = group_scales.view(torch.uint8)[cls].view(group_scales.dtype)  # one-byte FP8: gathered as bytes
    return packed_out, scale_out, *rest
