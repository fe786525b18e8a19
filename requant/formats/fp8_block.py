"""FP8 E4M3 weights with one FP32 scale per 128x128 block (``weight`` + ``weight_scale_inv``), the format of
DeepSeek-V3/V3.1/R1 and Kimi-K2-Instruct, decoded as every reference does it: the FP8 value times its block's
scale in FP32, then one rounding to BF16 (DeepSeek's ``weight_dequant`` kernel, compressed-tensors'
``FP8BlockDequantizer`` converter, Quark's copy of DeepSeek's kernel). Edge blocks may be partial (DeepSeek-V3's
``kv_a_proj_with_mqa`` is [576, 7168] with [5, 56] scales); their scale covers the rows and columns that exist.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from requant.constants import BF16_MANT_BITS, E2M1_SIGN_BIT, E8M0_BIAS, FP8_E4M3_NAN_BITS, MX_BLOCK_SIZE
from requant.formats.mxfp4 import e2m1_codes, pow2_f64, quantize_mxfp4, shared_exponent

_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)  # code -> value
_MAGNITUDE = 0x7F  # an E4M3 code without its sign bit: magnitudes grow with it (0x7F itself is NaN)
_E2M1_MAGNITUDE = E2M1_SIGN_BIT - 1  # an E2M1 code without its sign bit
_CHUNK_ROWS = 32  # rows whose gather index (4 bytes an element) stays in the L2 cache


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale tensor's shape for a weight of ``shape``: one scale per block, partial edge blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def block_values(scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, codes: int = 256) -> torch.Tensor:
    """Each block's decoded value of the first ``codes`` E4M3 codes ([blocks, codes], on the scales' device): the
    code's value times the block's scale in FP32, rounded to ``dtype`` once; every decode here looks values up in
    it (the first 128 codes are the magnitudes)."""
    return (_FP8_VALUES[:codes].to(scale_inv.device) * scale_inv.to(torch.float32).reshape(-1, 1)).to(dtype)


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.bfloat16, compiled: bool = True) -> torch.Tensor:
    """(float8_e4m3fn [out, in], FP32 [ceil(out/bo), ceil(in/bi)]) -> ``dtype`` [out, in]: each element times its
    block's scale in FP32, then rounded to ``dtype`` once. Inside a block that is a function of the element's code
    alone, so each block's 256 products are computed once and the matrix is one gather (NaN codes give NaN).
    ``compiled``: BF16 on a CPU by the compiled kernel (:mod:`requant.formats.fp8_block_cpu`); False: torch's
    gather, the reference and the path for other devices."""
    out, inp = weight.shape
    bo, bi = block
    device = weight.device
    if compiled and _decodes_compiled(weight, block, dtype):
        return _decode_cpu(weight, scale_inv, block)[0]
    table = block_values(scale_inv, dtype).reshape(-1)
    column_offset = (torch.arange(inp, device=device, dtype=torch.int32) // bi) * 256
    codes = weight.view(torch.uint8)
    result = torch.empty(out, inp, dtype=dtype, device=device)
    for r0 in range(0, out, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, out)
        rows = torch.arange(r0, r1, device=device, dtype=torch.int32) // bo * (scale_inv.shape[1] * 256)
        index = codes[r0:r1].to(torch.int32).add_(column_offset).add_(rows.unsqueeze(1))
        torch.index_select(table, 0, index.view(-1), out=result[r0:r1].view(-1))
    return result


def dequantize_fp8_block_rows(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                              rows: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """:func:`dequantize_fp8_block` of ``rows`` alone: each row is a block of its own height, under its block row's
    scales."""
    return dequantize_fp8_block(weight.view(torch.uint8)[rows].view(torch.float8_e4m3fn),
                                scale_inv[rows // block[0]], (1, block[1]), dtype)


def fp8_block_to_mxfp4(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                       compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], FP32 block scales) -> MXFP4 (uint8 [out, in/2], E8M0 uint8 [out, in/32]), equal
    to ``quantize_mxfp4(dequantize_fp8_block(weight, scale_inv, block))`` for every input, without the BF16 matrix.

    Why tables are exact: inside one FP8 block every element decodes to ``v[c] = bf16(fp8(c) * s)``, a function of
    its code ``c`` alone (256 values). An MX block (32 inputs) lies inside one FP8 block when the block width is a
    multiple of 32; its maximum is ``|v[m]|`` for its largest magnitude code ``m`` (each step is monotone), which
    fixes its exponent ``e``, and each element's E2M1 code is then a function of ``(c, e)``. So a table per FP8
    block and per exponent its MX blocks use, built with the reference encoder, turns the matrix into one gather
    per element. Raises ValueError for NaN codes and for values that decode beyond BF16's range, as the decode
    would produce them. ``compiled``: on a CPU, the compiled kernel walks the same tables in one pass
    (:mod:`requant.formats.fp8_block_cpu`; not for subnormal BF16 values); False: torch's ops, the reference."""
    out, inp = weight.shape
    bo, bi = block
    if inp % MX_BLOCK_SIZE or bi % MX_BLOCK_SIZE:
        return quantize_mxfp4(dequantize_fp8_block_checked(weight, scale_inv, block, compiled))
    device = weight.device
    values = block_values(scale_inv, codes=128)
    if compiled and device.type == "cpu" and not _has_subnormal(values):
        return _fused_cpu(weight, scale_inv, block, values)
    codes = weight.view(torch.uint8).view(out, inp // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    rows = min(_CHUNK_ROWS, out)
    magnitudes = torch.empty(rows, *codes.shape[1:], dtype=torch.uint8, device=device)  # scratch, one chunk
    largest = torch.empty(codes.shape[:2], dtype=torch.uint8, device=device)  # each MX block's largest magnitude code
    for r0 in range(0, out, rows):
        r1 = min(r0 + rows, out)
        torch.bitwise_and(codes[r0:r1], _MAGNITUDE, out=magnitudes[:r1 - r0])
        torch.amax(magnitudes[:r1 - r0], dim=-1, out=largest[r0:r1])
    if bool(largest.eq(FP8_E4M3_NAN_BITS).any()):
        raise ValueError(f"{fp8_nan_count(weight)} NaN values")
    fp8_block = ((torch.arange(out, device=device) // bo).unsqueeze(1) * scale_inv.shape[1]
                 + (torch.arange(inp // MX_BLOCK_SIZE, device=device) * MX_BLOCK_SIZE // bi).unsqueeze(0))
    amax = values.view(-1)[fp8_block * 128 + largest.long()].float().abs()
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{_inf_count(weight, scale_inv, block)} values decode beyond BF16's range (Inf)")
    exponent = shared_exponent(amax)
    index, table = _code_tables(values, fp8_block, exponent, amax == 0)
    packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=device)
    gather = torch.empty(rows, *codes.shape[1:], dtype=torch.int32, device=device)  # scratch, one chunk
    selected = torch.empty(rows * inp, dtype=torch.uint8, device=device)
    for r0 in range(0, out, rows):
        n = min(r0 + rows, out) - r0
        gather[:n].copy_(codes[r0:r0 + n]).add_(index[r0:r0 + n].unsqueeze(-1))
        torch.index_select(table, 0, gather[:n].view(-1), out=selected[:n * inp])
        pairs = selected[:n * inp].view(torch.int16)  # two codes, the first in the low byte
        packed[r0:r0 + n] = pairs.bitwise_or_(pairs >> 4).view(n, -1)  # the low byte of each pair
    return packed, (exponent + E8M0_BIAS).to(torch.uint8)


def _has_subnormal(values: torch.Tensor) -> bool:
    """Whether any of the BF16 ``values`` is subnormal (tiny block scales only): the CPU kernel's tables take
    normal values alone, so such a matrix goes through the torch tables and their reference encoder."""
    magnitude = values.view(torch.int16).bitwise_and(0x7FFF)
    return bool(((magnitude > 0) & (magnitude < 1 << BF16_MANT_BITS)).any())


def _fused_cpu(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_block_to_mxfp4` by the compiled CPU kernel, from each FP8 block's ``values`` [blocks, 128]."""
    from requant.formats import fp8_block_cpu

    _check_grid(weight, scale_inv, block)
    out, inp = weight.shape
    magnitude = values.float().abs()
    exponents = shared_exponent(magnitude).view(values.shape)
    slot_of = torch.zeros_like(exponents)  # exponents grow with the code: slots count their changes
    torch.cumsum(exponents[:, 1:] != exponents[:, :-1], dim=1, out=slot_of[:, 1:])
    packed = torch.empty(out, inp // 2, dtype=torch.uint8)
    scales = torch.empty(out, inp // MX_BLOCK_SIZE, dtype=torch.uint8)
    codes = weight.contiguous().view(torch.uint8).numpy()
    status = fp8_block_cpu.mxfp4_from_fp8_blocks(
        codes, codes.view(np.uint16), block[0], block[1], scale_inv.shape[1],
        values.view(torch.int16).to(torch.int32).numpy(), exponents.numpy(), torch.isfinite(magnitude).numpy(),
        slot_of.numpy(), int(slot_of.max()) + 1, _e2m1_of_bf16().numpy(), packed.numpy(), scales.numpy())
    if status == fp8_block_cpu.NAN_CODE:
        raise ValueError(f"{fp8_nan_count(weight)} NaN values")
    if status == fp8_block_cpu.BEYOND_BF16:
        raise ValueError(f"{_inf_count(weight, scale_inv, block)} values decode beyond BF16's range (Inf)")
    return packed, scales


def _check_grid(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """The compiled kernels index the scale grid unchecked: its shape is checked here, once."""
    if tuple(scale_inv.shape) != block_grid(tuple(weight.shape), block):
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} "
                         f"in blocks of {tuple(block)}")


def _decodes_compiled(weight: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether the compiled CPU kernel decodes ``weight``: BF16 on a CPU, codes read two at a time."""
    return weight.device.type == "cpu" and dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and block[1] % 2 == 0


def _decode_cpu(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """:func:`dequantize_fp8_block` to BF16 by the compiled CPU kernel, and whether every value is finite."""
    from requant.formats import fp8_block_cpu

    _check_grid(weight, scale_inv, block)
    values = block_values(scale_inv)
    decoded = torch.empty(weight.shape, dtype=torch.bfloat16)
    finite = fp8_block_cpu.bf16_from_fp8_blocks(weight.contiguous().view(torch.uint8).numpy().view(np.uint16),
                                                block[0], block[1], scale_inv.shape[1],
                                                values.view(torch.int16).numpy(), decoded.view(torch.int16).numpy())
    return decoded, bool(finite)


def _code_tables(values: torch.Tensor, fp8_block: torch.Tensor, exponent: torch.Tensor,
                 zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E2M1 code of each FP8 block's 256 values under each exponent its MX blocks use (uint8
    [blocks * span * 256]), and each MX block's offset into it. ``values``: the block's values of the 128 codes
    without a sign bit; code ``c + 128`` is ``-v[c]``, whose E2M1 code is ``c``'s with the sign bit (0 stays +0).
    An all-zero MX block (exponent -127) reads its FP8 block's first table: +-0 encodes to 0 under any exponent."""
    blocks = values.shape[0]
    unused = torch.iinfo(torch.int32).max
    lowest = torch.full((blocks,), unused, dtype=torch.int32, device=values.device).scatter_reduce(
        0, fp8_block.reshape(-1), torch.where(zero, unused, exponent).reshape(-1), "amin")
    lowest = torch.where(lowest == unused, 0, lowest)
    step = torch.where(zero, 0, exponent - lowest[fp8_block])
    span = int(step.max()) + 1
    exponents = lowest.unsqueeze(1) + torch.arange(span, dtype=torch.int32, device=values.device)  # [blocks, span]
    positive = _e2m1_scaled(values, exponents)  # [blocks, span, 128]
    negative = torch.where(positive.bitwise_and(_E2M1_MAGNITUDE) == 0, 0, positive ^ E2M1_SIGN_BIT)
    table = torch.cat((positive, negative), dim=-1).reshape(-1)
    return ((fp8_block * span + step) * 256).to(torch.int32), table


def _e2m1_scaled(values: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """``e2m1_codes(values / 2**exponents)`` for BF16 ``values`` [blocks, n] and int32 ``exponents`` [blocks, span]
    -> uint8 [blocks, span, n]. Dividing a normal BF16 value by a power of two moves its exponent field and nothing
    else, so the code is :func:`_e2m1_of_bf16`'s for the moved bits; below the smallest normal the quotient is under
    2**-126, which encodes to 0. Subnormal BF16 values (tiny scales only) go through the reference encoder."""
    bits = values.view(torch.int16).to(torch.int32).unsqueeze(1)
    magnitude = bits.bitwise_and(0x7FFF)
    moved = magnitude - (exponents << BF16_MANT_BITS).unsqueeze(-1)
    normal = magnitude >= 1 << BF16_MANT_BITS
    lut = _e2m1_of_bf16().to(values.device)
    codes = lut[moved.clamp(min=0).bitwise_or(bits.bitwise_and(0x8000))]
    codes = torch.where(normal & (moved >= 1 << BF16_MANT_BITS), codes, 0)
    subnormal = ~normal & (magnitude != 0)
    if bool(subnormal.any()):
        scaled = values.to(torch.float64).unsqueeze(1) * pow2_f64(-exponents).unsqueeze(-1)
        codes = torch.where(subnormal, e2m1_codes(scaled.to(torch.float32)), codes)
    return codes


@lru_cache(maxsize=1)
def _e2m1_of_bf16() -> torch.Tensor:
    """The E2M1 code of every BF16 bit pattern (uint8 [65536]; NaN and Inf patterns unused)."""
    return e2m1_codes(torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32))


def dequantize_fp8_block_checked(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                                 compiled: bool = True) -> torch.Tensor:
    """:func:`dequantize_fp8_block` to BF16, refused where a value is not finite: ValueError naming how many NaN
    codes there are, or else how many values decode beyond BF16's range (e.g. 448 under a huge block scale)."""
    if compiled and _decodes_compiled(weight, block, torch.bfloat16):
        decoded, finite = _decode_cpu(weight, scale_inv, block)
    else:
        decoded = dequantize_fp8_block(weight, scale_inv, block, compiled=False)
        finite = bool(torch.isfinite(decoded).all())
    if not finite:
        if nan := fp8_nan_count(weight):
            raise ValueError(f"{nan} NaN values")
        raise ValueError(f"{int((~torch.isfinite(decoded)).sum())} values decode beyond BF16's range (Inf)")
    return decoded


def _inf_count(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> int:
    return int((~torch.isfinite(dequantize_fp8_block(weight, scale_inv, block))).sum())


def fp8_nan_count(weight: torch.Tensor) -> int:
    """How many E4M3 "fn" codes of ``weight`` are NaN (0x7F or 0xFF); the format has no Inf."""
    return int(weight.view(torch.uint8).bitwise_and(0x7F).eq(FP8_E4M3_NAN_BITS).sum())


def non_power_of_two(scale: torch.Tensor) -> int:
    """How many FP32 scales are not an exact power of two (a nonzero mantissa, or zero/negative): what a
    ``scale_fmt: ue8m0`` checkpoint may not hold."""
    bits = scale.to(torch.float32).contiguous().view(torch.int32)
    return int(((bits & 0x7FFFFF) != 0).logical_or(bits <= 0).sum())
