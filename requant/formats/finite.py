"""Whether a tensor holds only finite values, on its raw bits: the check every input weight goes through before it
is transcoded or copied. A float is Inf or NaN exactly when its exponent field is all ones, so the largest masked
exponent field of the tensor answers for all of it: on a CPU by a compiled loop (:mod:`requant.formats.finite_cpu`,
imported on first use, as the other compiled kernels are), elsewhere by torch's ops."""

from __future__ import annotations

import numpy as np
import torch

# Exponent fields by float type, viewed as unsigned integers of the same width: all ones means Inf or NaN.
_EXPONENT_MASKS = {torch.bfloat16: (np.uint16, 0x7F80), torch.float16: (np.uint16, 0x7C00),
                   torch.float32: (np.uint32, 0x7F800000)}
_SIGNED = {np.uint16: torch.int16, np.uint32: torch.int32}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: on the raw bits for contiguous BF16/FP16/FP32, else by ``torch.isfinite``."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    if tensor.dtype in _EXPONENT_MASKS and tensor.is_contiguous():
        unsigned, mask = _EXPONENT_MASKS[tensor.dtype]
        bits = tensor.view(_SIGNED[unsigned])
        if tensor.device.type == "cpu":
            from requant.formats import finite_cpu

            return int(finite_cpu.largest_masked(bits.reshape(-1).numpy().view(unsigned), unsigned(mask))) < mask
        return int(bits.bitwise_and(mask).max()) < mask
    return bool(torch.isfinite(tensor).all())
