"""The fused INT4 kernels compiled for the CPU (numba): one pass over the packed codes where the torch table kernels
of :mod:`requant.formats.fused` and :mod:`requant.formats.fused_nvfp4` make five (nibble magnitudes, their group
maxima, the class of each group, a gather index four bytes wide per input byte, the gather). Same tables, same
results: the torch kernels stay the reference and the path for other devices, and the tests hold the two equal and
both equal to the reference encoders of compressed-tensors' decode (and to Quark's).

The kernels only look things up in the tables the torch side builds with the reference encoders, so every rounding
rule stays where :mod:`requant.formats.mxfp4` and :mod:`requant.formats.nvfp4` define it. Each releases the GIL, so a
layer job's transcode threads run them side by side.
"""

from __future__ import annotations

import numba
import numpy as np

from requant.constants import BF16_MANT_BITS, E2M1_VALUES, INT4_GROUP_SIZE, INT4_OFFSET

_GROUP_BYTES = INT4_GROUP_SIZE // 2  # 16 bytes: 32 INT4 codes, an MX block
_MANTISSA = (1 << BF16_MANT_BITS) - 1
_EXPONENT = 0xFF
_NIBBLE = np.uint8(0xF)
_REACH = np.uint8(2 * INT4_OFFSET)  # a nibble n holds q = n - 8: |q| = max(n, 16 - n) - 8
_MAXABS = INT4_OFFSET + 1  # max |q| in 0..8


@numba.njit(cache=True, nogil=True, boundscheck=False)
def mxfp4_from_int4(codes: np.ndarray, scale_bits: np.ndarray, table: np.ndarray, exp_offset: np.ndarray,
                    safe_min: int, safe_max: int, packed: np.ndarray, scales: np.ndarray,
                    unsafe_rows: np.ndarray) -> int:
    """INT4 codes (uint8 [out, in/2], two a byte, low nibble first) and BF16 group scales (their bits, uint16
    [out, in/32]) -> MXFP4 ``packed`` [out, in/2] and E8M0 ``scales`` [out, in/32], in place, through
    :func:`requant.formats.fused._tables` (``table`` [classes * 256], ``exp_offset`` [classes]). A group whose scale's
    exponent field lies outside ``[safe_min, safe_max]`` (the tables' exact range) and is not all zero marks its row
    in ``unsafe_rows``, for the reference path to re-encode. Returns the number of rows marked."""
    out, width = codes.shape
    reach = np.empty(width, dtype=np.uint8)  # per byte: the larger |q| of its two codes, plus 8
    marked = 0
    for r in range(out):
        row = codes[r]
        row_bits = scale_bits[r]
        row_packed = packed[r]
        row_scales = scales[r]
        for k in range(width):  # the whole row first: one loop that compiles to vectors
            lo, hi = row[k] & _NIBBLE, row[k] >> 4
            reach[k] = max(max(lo, hi), _REACH - min(lo, hi))
        unsafe = False
        for j in range(width // _GROUP_BYTES):
            c0 = j * _GROUP_BYTES
            m = reach[c0]
            for k in range(c0 + 1, c0 + _GROUP_BYTES):
                m = max(m, reach[k])
            m = np.int64(m) - INT4_OFFSET  # max |q| of the group's 32 codes
            if m == 0:  # an all-zero block: scale byte 0, codes 0
                row_scales[j] = 0
                for k in range(c0, c0 + _GROUP_BYTES):
                    row_packed[k] = 0
                continue
            bits = np.int64(row_bits[j])
            exponent = (bits >> BF16_MANT_BITS) & _EXPONENT
            if exponent < safe_min or exponent > safe_max:
                unsafe = True
            cls = ((bits >> 15) * (_MANTISSA + 1) + (bits & _MANTISSA)) * _MAXABS + m
            row_scales[j] = np.uint8((exponent + exp_offset[cls]) & 0xFF)
            base = cls * 256
            for k in range(c0, c0 + _GROUP_BYTES):
                row_packed[k] = table[base + row[k]]
        if unsafe:
            unsafe_rows[r] = True
            marked += 1
    return marked


_E2M1 = np.array(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))  # by code: sign bit 3, as dequantize_e2m1 reads it
_F32_EXPONENT = np.uint32(0x7F800000)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def int4_mxfp4_error_sums(codes: np.ndarray, scale_bits: np.ndarray, packed: np.ndarray, scales: np.ndarray,
                          rows: np.ndarray, exact: bool, signal: np.ndarray, noise: np.ndarray) -> None:
    """For each row ``rows[i]`` of an INT4 matrix (codes uint8 [out, in/2] and BF16 scale bits uint16 [out, in/32],
    as :func:`mxfp4_from_int4` reads them) and its MXFP4 encoding (``packed`` uint8 [out, in/2], E8M0 ``scales``
    uint8 [out, in/32]): ``signal[i]`` = sum of x^2 and ``noise[i]`` = sum of (x - y)^2 in FP64, x the INT4 decode
    (q * scale rounded to BF16 as compressed-tensors multiplies, or the exact FP32 product with ``exact``) and y the
    MXFP4 decode rounded to FP32, as :func:`requant.formats.int4.dequantize_int4` and
    :func:`requant.formats.mxfp4.dequantize_mxfp4` give them. One pass, no decoded copy of the rows."""
    word = np.empty(1, dtype=np.float32)
    word_bits = word.view(np.uint32)
    for i in range(rows.shape[0]):
        r = rows[i]
        s = 0.0
        e = 0.0
        for g in range(codes.shape[1] // _GROUP_BYTES):
            word_bits[0] = np.uint32(scale_bits[r, g]) << 16
            scale = word[0]
            block = np.ldexp(1.0, np.int64(scales[r, g]) - 127)
            for k in range(g * _GROUP_BYTES, (g + 1) * _GROUP_BYTES):
                byte, code = codes[r, k], packed[r, k]
                for shift in (0, 4):
                    word[0] = np.float32(np.int64((byte >> shift) & _NIBBLE) - INT4_OFFSET) * scale  # exact
                    if not exact and (word_bits[0] & _F32_EXPONENT) != _F32_EXPONENT:  # round to BF16, to nearest even
                        bits = word_bits[0]
                        word_bits[0] = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
                    x = np.float64(word[0])
                    y = np.float64(np.float32(_E2M1[(code >> shift) & _NIBBLE] * block))
                    s += x * x
                    e += (x - y) * (x - y)
        signal[i] = s
        noise[i] = e
