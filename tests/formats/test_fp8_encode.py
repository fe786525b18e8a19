"""Per-channel FP8 E4M3 (Quark ptpc_fp8 weights) against Quark's own quantizer."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused_kernel import scale_patterns

from requant.formats.fp8 import dequantize_fp8_per_channel, fp8_per_channel_scale_from_int4, quantize_fp8_per_channel
from requant.formats.int4 import dequantize_int4
from requant.testing.quark_reference import quark_quantize_weight


def _check(weight):
    data, scale = quantize_fp8_per_channel(weight)
    q_data, q_scale = quark_quantize_weight(weight, "ptpc_fp8")
    assert data.dtype == q_data.dtype == torch.float8_e4m3fn
    assert scale.dtype == q_scale.dtype == torch.bfloat16 and scale.shape == q_scale.shape
    assert torch.equal(scale.view(torch.int16), q_scale.view(torch.int16))
    assert torch.equal(data.view(torch.uint8), q_data.view(torch.uint8))


def test_zero_row_gets_eps_scale():
    weight = torch.zeros(2, 32, dtype=torch.bfloat16)
    weight[1, 0] = 448.0
    data, scale = quantize_fp8_per_channel(weight)
    assert scale[0].item() == torch.finfo(torch.float32).eps and scale[1].item() == 1.0
    assert data.view(torch.uint8)[0].eq(0).all()
    _check(weight)


def test_amax_maps_to_448():
    weight = torch.tensor([[0.1, -0.35, 0.2] + [0.0] * 29], dtype=torch.bfloat16)
    data, scale = quantize_fp8_per_channel(weight)
    assert abs(dequantize_fp8_per_channel(data, scale)[0, 1].item() + 0.35) < 0.35 / 16
    _check(weight)


@st.composite
def bf16_rows(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.sampled_from([32, 64]))
    base = draw(st.integers(1, 250))
    bits = []
    for _ in range(rows * cols):
        kind = draw(st.sampled_from(["near", "near", "zero", "subnormal", "random"]))
        sign = draw(st.integers(0, 1)) << 15
        if kind == "zero":
            bits.append(sign)
        elif kind == "subnormal":
            bits.append(sign | draw(st.integers(1, 0x7F)))
        elif kind == "random":
            bits.append(sign | draw(st.integers(1, 254)) << 7 | draw(st.integers(0, 0x7F)))
        else:
            bits.append(sign | max(1, base - draw(st.integers(0, 20))) << 7 | draw(st.integers(0, 0x7F)))
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(rows, cols)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bf16_rows())
def test_matches_quark_on_adversarial_rows(weight):
    _check(weight)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data())
def test_scale_from_packed_int4_equals_quarks_scale_of_the_decoded_weight(seed, data):
    """A streamed FP8 shard's first pass takes each expert's scale from its packed INT4 codes without decoding
    them: equal, bit for bit, to the scale Quark gives the decoded BF16 weight (compressed-tensors packs the codes),
    over scales of every BF16 class (zero, subnormal, negative, the largest exponents) and all-zero rows."""
    rows, cols = 6, 128
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=g)
    q[data.draw(st.integers(0, rows - 1))] = 0  # an all-zero row: eps scale
    scale = data.draw(scale_patterns(rows * cols // 32)).to(torch.int16).view(torch.bfloat16).reshape(rows, cols // 32)
    packed = pack_to_int32(q, num_bits=4)
    weight = dequantize_int4(packed, scale, cols)
    ours = fp8_per_channel_scale_from_int4(packed, scale, cols)
    _, quark_scale = quark_quantize_weight(weight, "ptpc_fp8")
    assert ours.dtype == quark_scale.dtype and torch.equal(ours.view(torch.int16), quark_scale.view(torch.int16))
    assert torch.equal(ours.view(torch.int16), quantize_fp8_per_channel(weight)[1].view(torch.int16))
