"""The fused FP8-block -> MXFP4 table kernel and the table decode, against Quark's encoder of the arithmetic decode,
each in both forms: compiled for the CPU (numba, the default there) and torch's ops (the reference, other devices).

End to end, every recipe from an adversarial FP8-block checkpoint is checked against Quark's file-to-file export
and compressed-tensors' decoder in ``tests/test_sources.py``; these tests reach the corners one matrix at a time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from requant.formats.fp8_block import (
    dequantize_fp8_block,
    dequantize_fp8_block_checked,
    dequantize_fp8_block_rows,
    fp8_block_to_mxfp4,
)
from requant.testing.quark_reference import quark_quantize_weight


def _arithmetic_decode(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference's decode spelled out: every element times its block's scale in FP32, rounded once."""
    rows, cols = weight.shape
    expanded = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return (weight.float() * expanded).to(dtype)


def _codes(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    codes[codes.bitwise_and(0x7F) == 0x7F] = 0x80  # no NaN; -0 instead
    return codes.view(torch.float8_e4m3fn)


COMPILED = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])


@COMPILED
def test_matches_quark_on_deepseek_shaped_blocks(compiled):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 1024, generator=g) * 0.02).to(torch.float8_e4m3fn)  # a partial row of blocks
    scale = torch.rand(5, 8, generator=g) * 1e-3 + 1e-5
    fused = fp8_block_to_mxfp4(weight, scale, (128, 128), compiled)
    quark = quark_quantize_weight(_arithmetic_decode(weight, scale, (128, 128)), "mxfp4")
    assert torch.equal(fused[0], quark[0]) and torch.equal(fused[1], quark[1])


@COMPILED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((7, 5), (2, 3)), ((64, 64), (64, 64))])
def test_table_decode_equals_the_arithmetic_decode(shape, block, dtype, compiled):
    weight = _codes(*shape, seed=1)
    weight.view(torch.uint8)[0, :2] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8)  # NaN codes decode to NaN
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = torch.exp2(torch.randint(-140, 120, grid).float()) * (1 + torch.rand(grid))
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    table = dequantize_fp8_block(weight, scale, block, dtype, compiled)
    assert torch.equal(table.view(bits), _arithmetic_decode(weight, scale, block, dtype).view(bits))
    rows = torch.tensor([0, shape[0] // 2, shape[0] - 1])
    assert torch.equal(dequantize_fp8_block_rows(weight, scale, block, rows, dtype).view(bits), table[rows].view(bits))


# Block scales over every class that matters to the table: normal, products that go subnormal in BF16, huge,
# negative, zero.
@st.composite
def block_scales(draw, n):
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["normal", "normal", "tiny", "huge", "zero"]))
        sign = draw(st.sampled_from([1.0, -1.0]))
        exponent = {"normal": draw(st.integers(-20, 0)), "tiny": draw(st.integers(-149, -120)),
                    "huge": draw(st.integers(100, 119)), "zero": 0}[kind]
        mantissa = draw(st.floats(1.0, 2.0, exclude_max=True))
        out.append(0.0 if kind == "zero" else sign * mantissa * 2.0 ** exponent)
    return torch.tensor(out, dtype=torch.float32)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.data())
def test_matches_quark_on_the_decode_for_every_scale_class(seed, data):
    rows = data.draw(st.integers(1, 70))
    block = (data.draw(st.integers(1, 40)), 32 * data.draw(st.integers(1, 3)))
    cols = 32 * data.draw(st.integers(1, 8))
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    scale = data.draw(block_scales(grid[0] * grid[1])).reshape(grid)
    weight = _codes(rows, cols, seed)
    decoded = _arithmetic_decode(weight, scale, block)
    if not bool(torch.isfinite(decoded).all()):
        for compiled in (True, False):
            with pytest.raises(ValueError, match="decode beyond BF16's range"):
                fp8_block_to_mxfp4(weight, scale, block, compiled)
        return
    quark = quark_quantize_weight(decoded, "mxfp4")
    for compiled in (True, False):
        fused = fp8_block_to_mxfp4(weight, scale, block, compiled)
        assert torch.equal(fused[1], quark[1]), compiled
        assert torch.equal(fused[0], quark[0]), compiled


def test_block_width_not_a_multiple_of_32_takes_the_decode():
    weight, scale = _codes(40, 96, seed=2), torch.rand(3, 2) * 1e-2  # 48-wide blocks split MX blocks
    fused = fp8_block_to_mxfp4(weight, scale, (16, 48))
    reference = quark_quantize_weight(_arithmetic_decode(weight, scale, (16, 48)), "mxfp4")
    assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])


@COMPILED
@pytest.mark.parametrize("kernel", [fp8_block_to_mxfp4, dequantize_fp8_block_checked], ids=["mxfp4", "bf16"])
def test_nan_codes_are_refused_with_their_count(kernel, compiled):
    weight = _codes(8, 64, seed=3)
    weight.view(torch.uint8)[2, 5] = 0xFF
    weight.view(torch.uint8)[7, 60] = 0x7F
    with pytest.raises(ValueError, match="^2 NaN values$"):
        kernel(weight, torch.ones(1, 1), (128, 128), compiled=compiled)


@COMPILED
@pytest.mark.parametrize("kernel", [fp8_block_to_mxfp4, dequantize_fp8_block_checked], ids=["mxfp4", "bf16"])
def test_values_beyond_bf16_are_refused_with_their_count_wherever_they_are(kernel, compiled):
    """Only the last row's last block overflows (448 under 2**127): a check that stops early or skips a row misses
    it."""
    weight = _codes(70, 256, seed=4)
    scale = torch.ones(3, 2)
    scale[2, 1] = 2.0**127
    weight.view(torch.uint8)[64:, 128:] = 0x01  # the smallest subnormal code: 2**118 under this block's scale
    weight.view(torch.uint8)[69, 255] = 0x7E  # 448 * 2**127
    with pytest.raises(ValueError, match=r"^1 values decode beyond BF16's range \(Inf\)$"):
        kernel(weight, scale, (32, 128), compiled=compiled)
    weight.view(torch.uint8)[69, 255] = 0x01
    kernel(weight, scale, (32, 128), compiled=compiled)


@pytest.mark.parametrize("kernel", [fp8_block_to_mxfp4, dequantize_fp8_block_checked], ids=["mxfp4", "bf16"])
def test_a_scale_grid_that_does_not_fit_is_refused_before_the_compiled_kernel_reads_it(kernel):
    with pytest.raises(ValueError, match=r"^scale grid \(1, 2\) does not fit weight \(256, 256\) in blocks of"):
        kernel(_codes(256, 256, seed=5), torch.ones(1, 2), (128, 128))
