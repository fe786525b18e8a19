"""The fused INT4 -> MXFP4 table kernel (compiled and torch's) against the reference path and against Quark; its compressed-tensors codes;
the fused INT4 -> NVFP4 class-table kernel against both NVFP4 encoders (which the oracle tests hold equal to
llm-compressor and Model Optimizer)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from requant.formats.fused import int4_mxfp4_error_sums, int4_to_mxfp4
from requant.formats.fused_nvfp4 import int4_amax, int4_to_nvfp4
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4, quantize_mxfp4_ct
from requant.formats.nvfp4 import quantize_nvfp4, quantize_nvfp4_modelopt, tensor_amax
from requant.testing.quark_reference import quark_quantize_weight


def _reference(packed, scale, in_features):
    return quantize_mxfp4(dequantize_int4(packed, scale, in_features))


def _random_int4(rows, cols, seed, scale_bits=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=g)
    if scale_bits is None:
        scale = (torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
    else:
        scale = scale_bits.to(torch.int16).view(torch.bfloat16).reshape(rows, cols // 32)
    return pack_to_int32(q, num_bits=4), scale, q


COMPILED = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]


@pytest.mark.parametrize("compiled", COMPILED)
def test_matches_reference_and_quark_on_kimi_shaped_rows(compiled):
    packed, scale, _ = _random_int4(96, 7168, seed=0)
    fused = int4_to_mxfp4(packed, scale, 7168, rows_per_block=40, compiled=compiled)  # ragged last row block
    threaded = int4_to_mxfp4(packed, scale, 7168, rows_per_block=16, threads=2, compiled=compiled)
    reference = _reference(packed, scale, 7168)
    quark = quark_quantize_weight(dequantize_int4(packed, scale, 7168), "mxfp4")
    for ours, par, ref, q in zip(fused, threaded, reference, quark):
        assert torch.equal(ours, ref) and torch.equal(ours, q) and torch.equal(par, ours)


@pytest.mark.parametrize("compiled", COMPILED)
def test_all_zero_and_single_value_blocks(compiled):
    q = torch.zeros(4, 64, dtype=torch.int8)
    q[1, 3] = -8  # max |q| = 8 from the negative side
    q[2, 40] = 7
    q[3, :] = 1
    scale = torch.full((4, 2), 0.0107421875, dtype=torch.bfloat16)
    packed = pack_to_int32(q, num_bits=4)
    fused = int4_to_mxfp4(packed, scale, 64, compiled=compiled)
    assert fused[1][0].tolist() == [0, 0]  # all-zero blocks: scale byte 0, codes 0
    for ours, ref in zip(fused, _reference(packed, scale, 64)):
        assert torch.equal(ours, ref)


# Scale bit patterns spanning every BF16 class: zero, subnormal, tiny and huge exponents (the table's
# fallback range), negative scales, every mantissa.
@st.composite
def scale_patterns(draw, n):
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["normal", "normal", "edge", "zero", "subnormal"]))
        sign = draw(st.integers(0, 1)) << 15
        if kind == "zero":
            out.append(sign)
        elif kind == "subnormal":
            out.append(sign | draw(st.integers(1, 0x7F)))
        else:
            exp = draw(st.integers(100, 130)) if kind == "normal" else draw(st.sampled_from([1, 2, 3, 4, 239, 240, 241, 250]))
            out.append(sign | exp << 7 | draw(st.integers(0, 0x7F)))
    return torch.tensor(out, dtype=torch.int32)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data())
def test_matches_reference_for_every_scale_class(seed, data):
    rows, cols = 6, 128
    bits = data.draw(scale_patterns(rows * cols // 32))
    packed, scale, _ = _random_int4(rows, cols, seed, scale_bits=bits)
    reference = _reference(packed, scale, cols)
    exact = quantize_mxfp4(dequantize_int4(packed, scale, cols, dtype=torch.float32))  # Quark 0.13's decode
    for compiled in (True, False):
        fused = int4_to_mxfp4(packed, scale, cols, rows_per_block=4, compiled=compiled)
        assert torch.equal(fused[1], reference[1]), compiled
        assert torch.equal(fused[0], reference[0]), compiled
        fused = int4_to_mxfp4(packed, scale, cols, rows_per_block=4, exact=True, compiled=compiled)
        assert torch.equal(fused[1], exact[1]) and torch.equal(fused[0], exact[0]), compiled



@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data(), st.booleans())
def test_the_compiled_error_sums_equal_the_decodes_bit_for_bit(seed, data, exact):
    """A layer job's error statistics of INT4 -> MXFP4 in one compiled pass: the same FP64 sums as decoding both
    sides with the reference decoders (dequantize_int4 in compressed-tensors' BF16 or the exact FP32; dequantize_mxfp4)
    and summing the squares, for every scale class (zero, subnormal, out-of-table, negative), infinities and NaNs
    included."""
    rows, cols = 6, 128
    packed, scale, _ = _random_int4(rows, cols, seed, scale_bits=data.draw(scale_patterns(rows * cols // 32)))
    packed_out, scale_out = int4_to_mxfp4(packed, scale, cols, exact=exact)
    picked = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows)))
    x = dequantize_int4(packed[picked], scale[picked], cols, dtype=torch.float32 if exact else None).double()
    y = dequantize_mxfp4(packed_out[picked], scale_out[picked]).double()
    signal, noise = int4_mxfp4_error_sums(packed, scale, packed_out, scale_out, picked, exact)
    for ours, theirs in ((signal, x.square().sum(dim=1)), (noise, (x - y).square().sum(dim=1))):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=0, equal_nan=True), (ours, theirs)


@pytest.mark.parametrize("bad", ["scale_dtype", "shape"])
def test_rejects_inconsistent_inputs(bad):
    packed, scale, _ = _random_int4(4, 64, seed=3)
    if bad == "scale_dtype":
        scale = scale.float()
    else:
        packed = packed[:, :-1]
    with pytest.raises(ValueError):
        int4_to_mxfp4(packed, scale, 64)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data())
def test_compressed_tensors_codes_for_every_scale_class(seed, data):
    """negative_zero: compressed-tensors' MXFP4 (a negative value that rounds to zero keeps its sign), equal to
    quantize_mxfp4_ct of the BF16 decode, through the tables and their fallback alike."""
    rows, cols = 6, 128
    packed, scale, _ = _random_int4(rows, cols, seed, scale_bits=data.draw(scale_patterns(rows * cols // 32)))
    reference = quantize_mxfp4_ct(dequantize_int4(packed, scale, cols))
    for compiled in (True, False):
        fused = int4_to_mxfp4(packed, scale, cols, rows_per_block=4, negative_zero=True, compiled=compiled)
        assert torch.equal(fused[1], reference[1]) and torch.equal(fused[0], reference[0]), compiled


def _same(ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b)


NVFP4_ENCODERS = [quantize_nvfp4, quantize_nvfp4_modelopt]


@pytest.mark.parametrize("encode", NVFP4_ENCODERS, ids=lambda f: f.__name__)
def test_nvfp4_matches_its_encoder_on_kimi_shaped_rows(encode):
    """int4_to_nvfp4 equals the encoder (compressed-tensors' or Model Optimizer's) run on the BF16 decode, its own
    amax and a larger one shared with partners; int4_amax equals the decode's largest magnitude."""
    packed, scale, _ = _random_int4(96, 7168, seed=1)
    weight = dequantize_int4(packed, scale, 7168)
    assert torch.equal(int4_amax(packed, scale, 7168), tensor_amax(weight))
    _same(int4_to_nvfp4(packed, scale, 7168, encode, rows_per_block=40), encode(weight, tensor_amax(weight)))
    shared = tensor_amax(weight) * 3
    _same(int4_to_nvfp4(packed, scale, 7168, encode, amax=shared), encode(weight, shared))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data(), st.sampled_from(NVFP4_ENCODERS))
def test_nvfp4_matches_its_encoder_for_every_scale_class(seed, data, encode):
    """Zero, subnormal, negative, tiny and huge BF16 group scales (FP8 group scales that underflow or saturate)."""
    rows, cols = 6, 128
    packed, scale, _ = _random_int4(rows, cols, seed, scale_bits=data.draw(scale_patterns(rows * cols // 32)))
    weight = dequantize_int4(packed, scale, cols)
    if not torch.isfinite(weight).all():  # a huge scale times 8 overflows BF16: the job refuses such input
        return
    assert torch.equal(int4_amax(packed, scale, cols), tensor_amax(weight))
    _same(int4_to_nvfp4(packed, scale, cols, encode, rows_per_block=4), encode(weight, tensor_amax(weight)))
