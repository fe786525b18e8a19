"""MXFP4 encoding: bit-exact tables, then property tests against Quark 0.11's own quantizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from requant.formats.mxfp4 import dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4, unpack_fp4
from requant.testing.quark_reference import quark_quantize_weight

# A block whose amax is 6.0 gets scale 2**0 (6 = 1.5 * 2**2; 1.5 rounds to one mantissa bit without
# carry; 2 - emax 2 = 0), so the other 31 elements are encoded as they are.
ELEMENT_TABLE = [
    # value, expected 4-bit code, why
    (0.0, 0b0000, "zero"),
    (-0.0, 0b0000, "negative zero is written as +0"),
    (0.5, 0b0001, "subnormal"),
    (1.0, 0b0010, ""),
    (1.5, 0b0011, ""),
    (2.0, 0b0100, ""),
    (3.0, 0b0101, ""),
    (4.0, 0b0110, ""),
    (6.0, 0b0111, "max"),
    (-0.5, 0b1001, "sign bit 3"),
    (-6.0, 0b1111, ""),
    (0.25, 0b0000, "tie 0 | 0.5 -> even 0"),
    (-0.25, 0b0000, "negative value rounding to zero is +0"),
    (0.75, 0b0010, "tie 0.5 | 1 -> even 1"),
    (1.25, 0b0010, "tie 1 | 1.5 -> even 1"),
    (1.75, 0b0100, "tie 1.5 | 2 -> even 2"),
    (2.5, 0b0100, "tie 2 | 3 -> even 2"),
    (3.5, 0b0110, "tie 3 | 4 -> even 4"),
    (5.0, 0b0110, "tie 4 | 6 -> even 4"),
    (-5.0, 0b1110, "tie, negative"),
    (0.2578125, 0b0001, "just above the 0.25 tie"),
    (5.03125, 0b0111, "just above the 5 tie"),
]


@pytest.mark.parametrize("value,code,why", ELEMENT_TABLE, ids=[f"{v}" for v, _, _ in ELEMENT_TABLE])
def test_element_codes(value, code, why):
    block = torch.full((1, 32), 0.0, dtype=torch.bfloat16)
    block[0, 0], block[0, 3] = 6.0, value
    packed, scale = quantize_mxfp4(block)
    assert scale.item() == 127
    assert unpack_fp4(packed)[0, 3].item() == code, why
    q_packed, q_scale = quark_quantize_weight(block, "mxfp4")
    assert torch.equal(packed, q_packed) and torch.equal(scale, q_scale)


def test_nibble_order_low_first():
    block = torch.zeros(1, 32, dtype=torch.bfloat16)
    block[0, :2] = torch.tensor([6.0, -0.5])  # codes 0x7 then 0x9
    packed, _ = quantize_mxfp4(block)
    assert packed[0, 0].item() == 0x97


SCALE_TABLE = [
    # block amax, expected E8M0 byte, why
    (0.0, 0, "all-zero block"),
    (1.0, 125, "2**0 -> exponent 0 - emax 2"),
    (1.7421875, 125, "below 1.75: no carry"),
    (1.75, 126, "'even' rounds 1.75 * 2**n up to 2**(n+1)"),
    (-1.75, 126, "sign does not matter"),
    (6.0, 127, ""),
    (7.0, 128, "1.75 * 4 carries"),
    (2.0**-130, 0, "BF16 subnormal amax clamps to 2**-127"),
    (2.0**-125, 0, "-125 - 2 = -127"),
    (3.3895313892515355e38, 254, "BF16 max: carry into Inf exponent -> 2**127"),
]


@pytest.mark.parametrize("amax,byte,why", SCALE_TABLE, ids=[f"{a:g}" for a, _, _ in SCALE_TABLE])
def test_scale_bytes(amax, byte, why):
    block = torch.zeros(1, 32, dtype=torch.bfloat16)
    block[0, 5] = amax
    packed, scale = quantize_mxfp4(block)
    assert scale.item() == byte, why
    assert scale.item() != 0xFF
    q_packed, q_scale = quark_quantize_weight(block, "mxfp4")
    assert torch.equal(packed, q_packed) and torch.equal(scale, q_scale)


# --- property tests: adversarial BF16 blocks against Quark -----------------------------------------
# Mantissas that produce E2M1 ties (1.25, 1.5, 1.75 times powers of two), the 1.75 boundary of the
# "even" rule and its neighbours, and powers of two.
SPECIAL_MANTISSAS = [0x00, 0x20, 0x40, 0x60, 0x5F, 0x61, 0x10, 0x30, 0x50, 0x70, 0x7F, 0x01]


@st.composite
def bf16_blocks(draw, max_rows=3):
    rows = draw(st.integers(1, max_rows))
    blocks = draw(st.integers(1, 3))
    bits = []
    for _ in range(rows * blocks):
        base = draw(st.integers(0, 254))  # biased exponent near the block max: zero/subnormal .. huge
        spread = draw(st.integers(0, 12))
        for _ in range(32):
            kind = draw(st.sampled_from(["special", "special", "random", "zero", "subnormal"]))
            sign = draw(st.integers(0, 1)) << 15
            if kind == "zero":
                bits.append(sign)
                continue
            if kind == "subnormal":
                bits.append(sign | draw(st.integers(1, 0x7F)))
                continue
            exp = max(0, base - draw(st.integers(0, spread)))
            mant = draw(st.sampled_from(SPECIAL_MANTISSAS)) if kind == "special" else draw(st.integers(0, 0x7F))
            bits.append(sign | exp << 7 | mant)
    t = torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return t.reshape(rows, blocks * 32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bf16_blocks())
def test_matches_quark_on_adversarial_blocks(weight):
    packed, scale = quantize_mxfp4(weight)
    q_packed, q_scale = quark_quantize_weight(weight, "mxfp4")
    assert torch.equal(scale, q_scale)
    assert torch.equal(packed, q_packed)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bf16_blocks())
def test_fake_quantize_is_the_encode_decode_round_trip_bit_for_bit(weight):
    """The activation QDQ's shortcut (no codes) gives the bits of encoding then decoding: signed zeros, blocks
    near FP32's largest exponent (values that overflow to inf on the way back) and subnormal scales included."""
    for x in (weight, weight.float() * 2.0**100, weight.float() * 2.0**-100):
        expected = dequantize_mxfp4(*quantize_mxfp4(x))
        assert torch.equal(fake_quantize_mxfp4(x).view(torch.int32), expected.view(torch.int32))


def test_decode_roundtrip_of_grid_values():
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6] * 4, dtype=torch.bfloat16).reshape(1, 32) * 2.0**-3
    packed, scale = quantize_mxfp4(grid)
    assert torch.equal(dequantize_mxfp4(packed, scale), grid.float())
