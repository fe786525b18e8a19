"""Fused INT4 (compressed-tensors pack-quantized) -> MXFP4 (Quark 0.11) without BF16 matrices.

Why a lookup table is exact: an INT4 group and an MX block are the same 32 input columns, so inside a
block every weight is ``w = bf16(q * s)`` for one BF16 scale ``s = sign * M * 2**E`` (M in [1, 2)).
Scaling by a power of two commutes with BF16 rounding while values stay normal, so the block's MX
exponent is ``E - 127 + k(M, m) - 2`` where ``m = max |q|`` and ``k`` depends only on ``bf16(m * M)``,
and every element ``w / 2**e = bf16(q * M) / 2**(k - 2)`` depends only on ``(sign, M, m, q)``.
That is 2 * 128 * 9 block classes; for each we tabulate, with the reference encoder, the output byte
for every input byte (two nibbles in, two FP4 codes out: the INT4 and FP4 nibble orders agree on
little-endian words). Converting a block is then one table gather per byte.

The exact decode Quark 0.13 quantizes (``exact=True``: ``w = q * s`` in FP32, no BF16 rounding) has the same
structure, even more simply: every element is ``q * M`` times the power of two, so one more pair of tables
(built without the two BF16 roundings) makes it exact too.

compressed-tensors' MXFP4 (``negative_zero=True``) has Quark's codes but one: a negative value that rounds to zero
keeps its sign (code 0x8), which its tables say as well.

Blocks whose scale is so small or large that products go subnormal/overflow or the E8M0 exponent
clamps (never the case in real checkpoints, but reachable by adversarial input) are re-encoded by
the reference path, so the result is bit-exact for every input.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from requant.constants import (
    BF16_EXP_MASK,
    BF16_MANT_BITS,
    E2M1_SIGN_BIT,
    E8M0_BIAS,
    INT4_GROUP_SIZE,
    INT4_OFFSET,
    MX_BLOCK_SIZE,
)
from requant.formats.int4 import dequantize_int4, group_maxabs, packed_columns
from requant.formats.mxfp4 import e2m1_codes, pow2_f64, quantize_mxfp4, quantize_mxfp4_ct, shared_exponent

_MANTISSAS = 1 << BF16_MANT_BITS  # 128 BF16 mantissas
_MAXABS = 9  # max |q| in 0..8
_CLASSES = 2 * _MANTISSAS * _MAXABS
_BYTES_PER_BLOCK = MX_BLOCK_SIZE // 2
# BF16 biased exponents for which every product q*s (|q| <= 8) is a normal BF16 and the block exponent
# E - 127 + k - 2 (k in 0..4) stays inside [-127, 127] without touching Inf: the table is exact there.
_SAFE_EXP_MIN, _SAFE_EXP_MAX = 3, 240


@lru_cache(maxsize=8)
def _tables(device: str, exact: bool = False, negative_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte table uint8 [CLASSES * 256], exponent offset int32 [CLASSES]) built by the reference encoder.

    Class index = (sign * 128 + mantissa) * 9 + m. The offset k - 2 is the block exponent relative to
    the scale's unbiased exponent (unused, 0, for m == 0: an all-zero block is written as byte 0).
    """
    sign = torch.arange(2).repeat_interleave(_MANTISSAS * _MAXABS)
    mant = torch.arange(_MANTISSAS).repeat_interleave(_MAXABS).repeat(2)
    maxabs = torch.arange(_MAXABS).repeat(2 * _MANTISSAS)
    # representative scale with exponent 0: +-(1 + mant/128)
    bits = ((sign << 15) | (E8M0_BIAS << BF16_MANT_BITS) | mant).to(torch.int16)
    s = bits.view(torch.bfloat16).to(torch.float32)
    amax = maxabs.to(torch.float32) * s.abs()
    if not exact:  # compressed-tensors' BF16 decode rounds each product (and so the block's maximum) to BF16
        amax = amax.to(torch.bfloat16).to(torch.float32)
    exp = shared_exponent(amax)  # = k - 2 since the representative scale has exponent 0
    q = torch.arange(-INT4_OFFSET, 16 - INT4_OFFSET, dtype=torch.float32)
    values = q.unsqueeze(0) * s.unsqueeze(1)
    if not exact:
        values = values.to(torch.bfloat16).to(torch.float32)
    codes = e2m1_codes((values.double() * pow2_f64(-exp).unsqueeze(1)).float())  # [CLASSES, 16 nibbles]
    if negative_zero:  # compressed-tensors: the quotient's sign (never an underflow where the tables are used)
        codes |= ((codes == 0) & (values < 0)).to(codes.dtype) * E2M1_SIGN_BIT
    byte = torch.arange(256)
    table = codes[:, byte & 0xF] | (codes[:, byte >> 4] << 4)  # [CLASSES, 256]
    zero = maxabs == 0
    table[zero] = 0
    exp = torch.where(zero, torch.zeros_like(exp), exp)
    return table.reshape(-1).contiguous().to(device), exp.to(torch.int32).to(device)


def int4_to_mxfp4(
    data_packed: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    rows_per_block: int | None = None,
    threads: int = 1,
    exact: bool = False,
    negative_zero: bool = False,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 [out, in/8] int32 + BF16 scale [out, in/32] -> MXFP4 (uint8 [out, in/2], E8M0 uint8 [out, in/32]).

    Streams ``rows_per_block`` rows at a time (default: 256 on CPU, the whole matrix on a GPU); memory
    beyond the output is a few bytes per element of one row block. ``threads > 1`` converts row blocks concurrently (torch releases the GIL in its
    ops); the caller should then keep torch's own intra-op threads at 1 to avoid oversubscription. ``exact``:
    quantize the exact FP32 decode (Quark 0.13) instead of compressed-tensors' BF16 decode (Quark 0.11).
    ``negative_zero``: compressed-tensors' codes (:func:`~requant.formats.mxfp4.quantize_mxfp4_ct`).
    ``compiled``: on a CPU, the compiled kernel walks the same tables in one pass (:mod:`requant.formats.fused_cpu`);
    False: torch's ops, the reference and the path for other devices.
    """
    if scale.dtype != torch.bfloat16:
        raise ValueError(f"fused INT4->MXFP4 needs BF16 group scales, got {scale.dtype}")
    if in_features % MX_BLOCK_SIZE or INT4_GROUP_SIZE != MX_BLOCK_SIZE:
        raise ValueError(f"input dimension {in_features} is not a multiple of {MX_BLOCK_SIZE}")
    out_features = data_packed.shape[0]
    n_blocks = in_features // MX_BLOCK_SIZE
    if data_packed.shape[1] != packed_columns(in_features) or tuple(scale.shape) != (out_features, n_blocks):
        raise ValueError(
            f"packed {tuple(data_packed.shape)} / scale {tuple(scale.shape)} do not fit shape ({out_features}, {in_features})"
        )
    device = data_packed.device
    if rows_per_block is None:  # CPU: blocks that stay in cache; GPU: one launch set per matrix
        rows_per_block = 256 if device.type == "cpu" else max(out_features, 1)
    table, exp_offset = _tables(str(device), exact, negative_zero)
    packed_out = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
    scale_out = torch.empty(out_features, n_blocks, dtype=torch.uint8, device=device)
    nibble_bytes = data_packed.contiguous().view(torch.uint8)  # little-endian: low nibble first
    scale_bits = scale.contiguous().view(torch.int16)
    compiled = compiled and device.type == "cpu"

    def convert_rows(r0: int) -> None:
        r1 = min(r0 + rows_per_block, out_features)
        if compiled:
            unsafe_rows = _compiled_rows(nibble_bytes[r0:r1], scale_bits[r0:r1], table, exp_offset,
                                         packed_out[r0:r1], scale_out[r0:r1])
        else:
            unsafe_rows = _table_rows(nibble_bytes[r0:r1], scale_bits[r0:r1], table, exp_offset, n_blocks,
                                      packed_out[r0:r1], scale_out[r0:r1])
        if unsafe_rows is not None:
            _reencode_rows(data_packed, scale, in_features, unsafe_rows + r0, packed_out, scale_out, exact,
                           negative_zero)

    starts = range(0, out_features, rows_per_block)
    if threads > 1 and len(starts) > 1:
        list(_pool(threads).map(convert_rows, starts))
    else:
        for r0 in starts:
            convert_rows(r0)
    return packed_out, scale_out


@lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="requant-fused")


def _table_rows(nibble_bytes: torch.Tensor, scale_bits: torch.Tensor, table: torch.Tensor, exp_offset: torch.Tensor,
                n_blocks: int, packed_out: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor | None:
    """Rows of the matrix through the tables by torch's ops, into ``packed_out`` and ``scale_out`` (the same rows);
    the indices of the rows holding blocks outside the tables' exact range (None: none)."""
    rows = nibble_bytes.shape[0]
    blocks = nibble_bytes.view(rows, n_blocks, _BYTES_PER_BLOCK)
    maxabs = group_maxabs(blocks).to(torch.int32)
    bits = scale_bits.to(torch.int32) & 0xFFFF
    exponent = (bits >> BF16_MANT_BITS) & BF16_EXP_MASK
    cls = ((bits >> 15) * _MANTISSAS + (bits & (_MANTISSAS - 1))) * _MAXABS + maxabs
    # index = class * 256 + input byte; int32 arithmetic in place (mixed-dtype broadcasts are slow)
    index = blocks.to(torch.int32).add_((cls * 256).unsqueeze(-1))
    torch.index_select(table, 0, index.view(-1), out=packed_out.view(-1))
    block_exp = exponent - E8M0_BIAS + exp_offset[cls]
    scale_out.copy_(torch.where(maxabs == 0, 0, block_exp + E8M0_BIAS).to(torch.uint8))
    unsafe = ((exponent < _SAFE_EXP_MIN) | (exponent > _SAFE_EXP_MAX)) & (maxabs > 0)
    return unsafe.any(dim=1).nonzero().flatten() if bool(unsafe.any()) else None


def _compiled_rows(nibble_bytes: torch.Tensor, scale_bits: torch.Tensor, table: torch.Tensor,
                   exp_offset: torch.Tensor, packed_out: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor | None:
    """:func:`_table_rows` by the compiled CPU kernel (:mod:`requant.formats.fused_cpu`)."""
    from requant.formats import fused_cpu

    unsafe = torch.zeros(nibble_bytes.shape[0], dtype=torch.bool)
    marked = fused_cpu.mxfp4_from_int4(nibble_bytes.numpy(), scale_bits.numpy().view(np.uint16), table.numpy(),
                                       exp_offset.numpy(), _SAFE_EXP_MIN, _SAFE_EXP_MAX, packed_out.numpy(),
                                       scale_out.numpy(), unsafe.numpy())
    return unsafe.nonzero().flatten() if marked else None


def int4_mxfp4_error_sums(data_packed: torch.Tensor, scale: torch.Tensor, packed_out: torch.Tensor,
                          scale_out: torch.Tensor, rows: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``rows`` (CPU tensors): the sum of the squared INT4 decodes of an INT4 matrix (``exact``: the FP32
    decode, else compressed-tensors' BF16) and the sum of their squared errors against its MXFP4 encoding
    (``packed_out``, ``scale_out``), both FP64, by the compiled kernel in one pass (the error statistics of a layer
    job; :func:`requant.formats.fused_cpu.int4_mxfp4_error_sums`)."""
    from requant.formats import fused_cpu

    signal = torch.empty(len(rows), dtype=torch.float64)
    noise = torch.empty(len(rows), dtype=torch.float64)
    fused_cpu.int4_mxfp4_error_sums(data_packed.contiguous().view(torch.uint8).numpy(),
                                    scale.contiguous().view(torch.int16).numpy().view(np.uint16),
                                    packed_out.numpy(), scale_out.numpy(), rows.numpy(), exact, signal.numpy(),
                                    noise.numpy())
    return signal, noise


def _reencode_rows(
    data_packed: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    rows: torch.Tensor,
    packed_out: torch.Tensor,
    scale_out: torch.Tensor,
    exact: bool = False,
    negative_zero: bool = False,
) -> None:
    """Reference path for ``rows``, those holding blocks outside the table's exact range."""
    weight = dequantize_int4(data_packed[rows], scale[rows], in_features, dtype=torch.float32 if exact else None)
    packed, scales = (quantize_mxfp4_ct if negative_zero else quantize_mxfp4)(weight)
    packed_out[rows] = packed
    scale_out[rows] = scales
