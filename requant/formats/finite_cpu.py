"""The finite check compiled for the CPU (numba): the largest masked exponent field of a tensor's raw bits in one
read of each element, where torch's ops write the masked copy first (~10x faster here). The GIL is released, so a
layer job's transcode threads check side by side. :func:`requant.formats.finite.all_finite` calls it."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def largest_masked(bits: np.ndarray, mask) -> int:
    """The largest ``element & mask`` of ``bits`` (one dimension, unsigned), in a loop that compiles to vectors."""
    worst = bits.dtype.type(0)
    for i in range(bits.shape[0]):
        worst = max(worst, bits[i] & mask)
    return worst
