"""FP8 E4M3 weights with one FP32 scale per 128x128 block (``weight`` + ``weight_scale_inv``), the format of
DeepSeek-V3/V3.1/R1 and Kimi-K2-Instruct, decoded as every reference does it: the FP8 value times its block's
scale in FP32, then one rounding to BF16 (DeepSeek's ``weight_dequant`` kernel, compressed-tensors'
``FP8BlockDequantizer`` converter, Quark's copy of DeepSeek's kernel). Edge blocks may be partial (DeepSeek-V3's
``kv_a_proj_with_mqa`` is [576, 7168] with [5, 56] scales); their scale covers the rows and columns that exist.
"""

from __future__ import annotations

import torch

from requant.constants import FP8_E4M3_NAN_BITS


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The scale tensor's shape for a weight of ``shape``: one scale per block, partial edge blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(float8_e4m3fn [out, in], FP32 [ceil(out/bo), ceil(in/bi)]) -> ``dtype`` [out, in]: each element times its
    block's scale in FP32, then rounded to ``dtype`` once. Whole blocks broadcast the scale without expanding
    it; a partial edge row or column of blocks is done apart, so nothing is padded or copied twice."""
    out, inp = weight.shape
    bo, bi = block
    scale = scale_inv.to(torch.float32)
    full_rows, full_cols = out - out % bo, inp - inp % bi
    result = torch.empty(out, inp, dtype=dtype, device=weight.device)
    for rows in ((0, full_rows), (full_rows, out)):
        for cols in ((0, full_cols), (full_cols, inp)):
            r0, r1 = rows
            c0, c1 = cols
            if r1 == r0 or c1 == c0:
                continue
            part = weight[r0:r1, c0:c1].to(torch.float32)
            h, w = -(-(r1 - r0) // bo), -(-(c1 - c0) // bi)
            s = scale[r0 // bo: r0 // bo + h, c0 // bi: c0 // bi + w]
            ph, pw = min(bo, r1 - r0), min(bi, c1 - c0)  # the block's extent inside this part
            product = part.view(h, ph, w, pw) * s.view(h, 1, w, 1)
            result[r0:r1, c0:c1] = product.view(r1 - r0, c1 - c0).to(dtype)
    return result


def fp8_nan_count(weight: torch.Tensor) -> int:
    """How many E4M3 "fn" codes of ``weight`` are NaN (0x7F or 0xFF); the format has no Inf."""
    return int(weight.view(torch.uint8).bitwise_and(0x7F).eq(FP8_E4M3_NAN_BITS).sum())


def non_power_of_two(scale: torch.Tensor) -> int:
    """How many FP32 scales are not an exact power of two (a nonzero mantissa, or zero/negative): what a
    ``scale_fmt: ue8m0`` checkpoint may not hold."""
    bits = scale.to(torch.float32).contiguous().view(torch.int32)
    return int(((bits & 0x7FFFFF) != 0).logical_or(bits <= 0).sum())
