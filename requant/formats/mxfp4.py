"""MXFP4 (OCP MX v1.0, E2M1 elements + E8M0 block scales) as AMD Quark 0.11 exports it.

This is the plain-torch reference: readable, bit-exact against Quark's ``real_quantized`` export
(``scale_calculation_mode="even"``, round-half-even elements, saturation at +-6, zero as +0).
The fused INT4 -> MXFP4 kernel in :mod:`requant.formats.fused` is tested against it.
"""

from __future__ import annotations

import torch

from requant.constants import (
    E2M1_EMAX,
    E2M1_MAX,
    E2M1_SIGN_BIT,
    E2M1_VALUES,
    E8M0_BIAS,
    EVEN_ROUND_ADD,
    FP32_EXP_BIAS,
    FP32_MANT_BITS,
    MX_BLOCK_SIZE,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
)


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Quark's "even" block exponent for FP32 block maxima ``amax`` (>= 0), as int32 in [-127, 127].

    Round amax to one mantissa bit (carry into the exponent at >= 1.75 * 2**n), take its exponent,
    subtract E2M1's emax. Zero and FP32 subnormals give the minimum; a carry into the Inf exponent
    (amax >= 1.75 * 2**127) gives the maximum, as Quark's ``log2(inf)`` does.
    """
    bits = amax.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    biased = ((bits + EVEN_ROUND_ADD) >> FP32_MANT_BITS) & 0xFF
    exp = biased - FP32_EXP_BIAS - E2M1_EMAX
    exp = torch.where(biased == 0, torch.full_like(exp, SCALE_EXP_MIN), exp)
    exp = torch.where(biased == 0xFF, torch.full_like(exp, SCALE_EXP_MAX), exp)
    return exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX).to(torch.int32)


def pow2_f64(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent (|exponent| <= 1022) as float64, built from its bits.

    Scaling by it in float64 is exact for every FP32 input, subnormals included. GPU ``exp2`` and FP32
    division are not exact for subnormal powers of two (seen on an H200: exp2(-127) and x / 2**-127
    were off by an ulp), so the block scale never goes through them.
    """
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


def e2m1_round(mag: torch.Tensor) -> torch.Tensor:
    """FP32 magnitudes (>= 0, already divided by the block scale) -> the nearest E2M1 grid value, half to even,
    saturating at 6 (the rounding :func:`e2m1_codes` encodes)."""
    fine = torch.round(mag * 2) / 2
    mid = torch.round(mag)
    coarse = torch.round(mag / 2) * 2
    return torch.where(mag < 2, fine, torch.where(mag < 4, mid, coarse)).clamp(max=E2M1_MAX)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """FP32 values already divided by the block scale -> 4-bit E2M1 codes (uint8, 0..15).

    Round half to even on the E2M1 grid: the step is 0.5 below 2, 1 in [2, 4) and 2 from 4 upward;
    torch.round is half-to-even, and the even grid points coincide with even mantissas. Saturates at
    6. A value that rounds to zero is +0 whatever its sign.
    """
    val = e2m1_round(x.abs())
    # grid value -> magnitude code: v*2 below 2, v+2 in [2, 4), v/2+4 from 4 (0,.5,1,1.5,2,3,4,6 -> 0..7)
    code = torch.where(val < 2, val * 2, torch.where(val < 4, val + 2, val / 2 + 4)).to(torch.uint8)
    negative = (x < 0) & (code != 0)
    return code | (negative.to(torch.uint8) * E2M1_SIGN_BIT)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] -> uint8 [..., n/2]; element 2k in the low nibble, 2k+1 in the high."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> uint8 codes [..., n]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def _block_quotients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., in] (in % 32 == 0) -> (block exponents [..., in/32], FP32 quotients x / 2**exp [..., in/32, 32])."""
    if x.shape[-1] % MX_BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {MX_BLOCK_SIZE}, got {tuple(x.shape)}")
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], -1, MX_BLOCK_SIZE)
    exp = shared_exponent(blocks.abs().amax(dim=-1))
    return exp, (blocks.double() * pow2_f64(-exp).unsqueeze(-1)).float()


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference encoder: weight [..., in] (in % 32 == 0) -> (packed uint8 [..., in/2], E8M0 uint8 [..., in/32])."""
    exp, scaled = _block_quotients(weight)
    codes = e2m1_codes(scaled).reshape(weight.shape)
    return pack_fp4(codes), (exp + E8M0_BIAS).to(torch.uint8)


def e8m0_q13(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Quark 0.13's E8M0 byte for the same block exponent: it takes ``log2`` of the scale clamped to at least
    2**-126, so exponent -127 (all-zero and tiny blocks) is written as 1, not 0. The elements are still encoded
    with 2**-127; only the stored byte differs. In place, returns ``scale_e8m0``."""
    return scale_e8m0.masked_fill_(scale_e8m0 == 0, 1)


def quantize_mxfp4_q13(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp4` as Quark 0.13 stores it (:func:`e8m0_q13`)."""
    packed, scale = quantize_mxfp4(weight)
    return packed, e8m0_q13(scale)


def quantize_mxfp4_ct(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp4` as compressed-tensors 0.19 (llm-compressor's ``MXFP4A16``) writes it: the same block
    exponents and E2M1 codes, except that a negative value which rounds to zero keeps its sign (code 0x8), as
    compressed-tensors takes the sign of the quotient ``weight / scale`` computed in the weight's dtype: a quotient
    that underflows that dtype is -0.0, whose sign it drops, like an exact -0.0 weight's.

    One deliberate difference: a block whose maximum rounds past FP32's largest power of two (|w| >= 1.75 * 2**127)
    gets exponent 127 here, as in Quark; compressed-tensors takes ``log2(inf)`` and writes a meaningless byte."""
    packed, scale = quantize_mxfp4(weight)
    blocks = weight.reshape(*weight.shape[:-1], -1, MX_BLOCK_SIZE)
    divisor = pow2_f64(scale.to(torch.int64) - E8M0_BIAS).to(weight.dtype).unsqueeze(-1)
    negative = (blocks / divisor).reshape(weight.shape) < 0
    codes = unpack_fp4(packed)
    codes |= ((codes == 0) & negative).to(torch.uint8) * E2M1_SIGN_BIT
    return pack_fp4(codes), scale


def dequantize_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., n/2] -> the E2M1 values of its codes, FP32 [..., n] (-0 for code 0x8)."""
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    return lut[unpack_fp4(packed).long()]


def dequantize_mxfp4(packed: torch.Tensor, scale_e8m0: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed uint8 [..., in/2], E8M0 uint8 [..., in/32]) -> values [..., in]."""
    values = dequantize_e2m1(packed)
    blocks = values.reshape(*values.shape[:-1], -1, MX_BLOCK_SIZE)
    scale = pow2_f64(scale_e8m0.to(torch.int64) - E8M0_BIAS).unsqueeze(-1)
    return (blocks.double() * scale).reshape(values.shape).to(dtype)


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """``dequantize_mxfp4(*quantize_mxfp4(x))`` as FP32 without the codes: the same block exponents, the same
    rounding and the same values (a value that rounds to zero is +0), in a third of the operations. For run-time
    activation QDQ, where nothing is stored."""
    exp, scaled = _block_quotients(x)
    val = e2m1_round(scaled.abs())
    val = torch.where((scaled < 0) & (val != 0), -val, val)
    return (val.double() * pow2_f64(exp).unsqueeze(-1)).reshape(x.shape).float()


def positive_zero_codes(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` with every negative-zero element (code 0x8) made +0 (0x0): a copy, values unchanged (-0 == +0).
    Quark's encoder writes every zero as +0; compressed-tensors' may write -0 for small negative values."""
    low_negative_zero = (packed & 0x0F) == E2M1_SIGN_BIT
    high_negative_zero = (packed & 0xF0) == (E2M1_SIGN_BIT << 4)
    keep = 0xFF - low_negative_zero.to(torch.uint8) * E2M1_SIGN_BIT - high_negative_zero.to(torch.uint8) * (E2M1_SIGN_BIT << 4)
    return packed & keep


def repack_mxfp4(packed: torch.Tensor, scale_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An MXFP4 weight stored by another maker (compressed-tensors' ``mxfp4-pack-quantized``: the same E2M1 codes,
    nibble order and E8M0 bytes as Quark) in Quark's export: no requantization, every value identical. Quark's
    "even" scale rule would pick another exponent for a block whose largest code is 6 and drop its 0.5 codes, so
    re-encoding the decoded values would lose what the upstream's quantization-aware training kept. Negative
    zeros become +0 (:func:`positive_zero_codes`), as Quark writes zeros."""
    return positive_zero_codes(packed), scale_e8m0.clone()


def repack_mxfp4_q13(packed: torch.Tensor, scale_e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`repack_mxfp4` with the scale bytes Quark 0.13 writes (:func:`e8m0_q13`)."""
    codes, scale = repack_mxfp4(packed, scale_e8m0)
    return codes, e8m0_q13(scale)
