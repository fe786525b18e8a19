"""The input finite check on raw exponent bits (requant.formats.finite.all_finite, the compiled loop on a CPU) agrees
with torch.isfinite on every BF16 and FP16 bit pattern, wherever it sits in a tensor, and on FP32's special values."""

from __future__ import annotations

import pytest
import torch

from requant.formats.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern(dtype):
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = torch.isfinite(patterns).tolist()
    assert expected.count(False) == (256 if dtype == torch.bfloat16 else 2048)   # ±Inf and the NaNs
    base = torch.ones(37, dtype=dtype)
    for i, finite in enumerate(expected):
        t = base.clone()
        t[i % 37] = patterns[i]
        assert all_finite(t) == finite, (dtype, hex(i - 32768 & 0xFFFF))
    assert all_finite(patterns[torch.isfinite(patterns)])


def test_float32_specials_and_other_dtypes():
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(1000)
        t[777] = bad
        assert not all_finite(t) and not all_finite(t.to(torch.bfloat16)) and not all_finite(t.double())
    edge = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -0.0])
    assert all_finite(edge) and all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]).t())  # not contiguous: isfinite path
