"""The FP8-block kernels compiled for the CPU (numba): one pass over the codes where the torch table kernels of
:mod:`requant.formats.fp8_block` make four (magnitudes, their maxima, a gather index, the gather). Same tables,
same results: the torch kernels stay the reference and the path for other devices, and the tests hold the two
equal and both equal to Quark's encoder of the arithmetic decode.

Inputs are the per-FP8-block tables the torch side builds (BF16 bits of each of the 128 magnitude codes' values,
their MX shared exponents, and which are finite); the kernels only look things up, so every rounding rule stays
where :mod:`requant.formats.mxfp4` defines it. Each kernel releases the GIL, so a layer job's transcode threads
run them side by side.
"""

from __future__ import annotations

import numba
import numpy as np

from requant.constants import BF16_MANT_BITS, E2M1_SIGN_BIT, E8M0_BIAS, FP8_E4M3_NAN_BITS, MX_BLOCK_SIZE

OK, NAN_CODE, BEYOND_BF16 = 0, 1, 2  # what a kernel returns: the first problem it met, if any

_MAGNITUDE = np.uint8(0x7F)
_SIGN = np.uint8(0x80)
_BF16_NORMAL = 1 << BF16_MANT_BITS  # the smallest normal BF16 magnitude's bits
_E2M1_MAGNITUDE = np.uint8(E2M1_SIGN_BIT - 1)
_E2M1_SIGN = np.uint8(E2M1_SIGN_BIT)
_MX = MX_BLOCK_SIZE
_NAN = FP8_E4M3_NAN_BITS
_BIAS = E8M0_BIAS


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _build_table(table: np.ndarray, bits: np.ndarray, exponent: int, lut: np.ndarray) -> None:
    """The E2M1 code of each of an FP8 block's 256 codes under ``exponent``: ``bits`` [128] are the BF16 bits of
    the block's magnitude codes' values (the scale's sign included); code ``m + 128`` is ``-v[m]``, whose E2M1 code
    is ``m``'s with the sign bit flipped, and stays 0 where the magnitude rounds to 0. Normal BF16 values only:
    dividing by ``2**exponent`` moves the exponent field, and a quotient below the smallest normal encodes to 0."""
    shift = exponent << BF16_MANT_BITS
    for m in range(128):
        b = bits[m]
        magnitude = b & 0x7FFF
        moved = magnitude - shift
        code = np.uint8(0)
        if magnitude >= _BF16_NORMAL and moved >= _BF16_NORMAL:
            code = lut[moved | (b & 0x8000)]
        table[m] = code
        table[m + 128] = code ^ _E2M1_SIGN if code & _E2M1_MAGNITUDE else np.uint8(0)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def mxfp4_from_fp8_blocks(codes: np.ndarray, pairs: np.ndarray, block_rows: int, block_cols: int, grid_cols: int,
                          bits: np.ndarray, exponents: np.ndarray, finite: np.ndarray, slot_of: np.ndarray,
                          slots: int, lut: np.ndarray, packed: np.ndarray, scales: np.ndarray) -> int:
    """FP8 codes (uint8 [out, in], ``in`` and ``block_cols`` multiples of 32; ``pairs``: the same bytes as uint16
    [out, in/2]) -> MXFP4 ``packed`` [out, in/2] and E8M0 ``scales`` [out, in/32], in place. Per FP8 block
    (row-major over a grid ``grid_cols`` wide), per magnitude code: ``bits`` (BF16 bits of its value),
    ``exponents`` (the shared exponent when it is an MX block's largest), ``finite``, and ``slot_of`` (which of the
    block's ``slots`` distinct exponents it has). Each MX block: its largest magnitude code fixes the exponent; the
    block's table for that exponent (built on first use) maps each code to its E2M1 code. Returns OK, NAN_CODE or
    BEYOND_BF16 (the outputs are then incomplete)."""
    out, inp = codes.shape
    n_blocks = bits.shape[0]
    tables = np.empty((n_blocks * slots, 256), dtype=np.uint8)
    built = np.zeros(n_blocks * slots, dtype=np.bool_)
    half = np.empty(_MX // 2, dtype=np.uint8)
    for r in range(out):
        block_row = (r // block_rows) * grid_cols
        row = codes[r]
        row_pairs = pairs[r]
        row_packed = packed[r]
        for j in range(inp // _MX):
            c0 = j * _MX
            block = block_row + c0 // block_cols
            for k in range(_MX // 2):  # the largest magnitude code as a tree of maxima, which compiles to vectors
                half[k] = max(row[c0 + k] & _MAGNITUDE, row[c0 + _MX // 2 + k] & _MAGNITUDE)
            for k in range(_MX // 4):
                half[k] = max(half[k], half[k + _MX // 4])
            for k in range(_MX // 8):
                half[k] = max(half[k], half[k + _MX // 8])
            largest = max(max(half[0], half[1]), max(half[2], half[3]))
            if largest == _NAN:
                return NAN_CODE
            if not finite[block, largest]:
                return BEYOND_BF16
            exponent = exponents[block, largest]
            scales[r, j] = np.uint8(exponent + _BIAS)
            slot = block * slots + slot_of[block, largest]
            table = tables[slot]
            if not built[slot]:
                _build_table(table, bits[block], exponent, lut)
                built[slot] = True
            for k in range(c0 // 2, (c0 + _MX) // 2):  # two codes a load, the first in the low byte
                pair = row_pairs[k]
                row_packed[k] = table[pair & 0xFF] | (table[pair >> 8] << 4)
    return OK


@numba.njit(cache=True, nogil=True, boundscheck=False)
def bf16_from_fp8_blocks(pairs: np.ndarray, block_rows: int, block_cols: int, grid_cols: int, values: np.ndarray,
                         decoded: np.ndarray) -> bool:
    """FP8 codes two at a time (uint16 [out, in/2], the first in the low byte; ``block_cols`` even) -> BF16 bits
    (int16 [out, in]) in place, from ``values`` (int16 [blocks, 256]: each FP8 block's 256 decoded values).
    Returns whether every value written is finite (each row checked while it is in the cache)."""
    out, half_width = pairs.shape
    half_block = block_cols // 2
    written = decoded.view(np.uint32)  # two BF16 values a store
    exponent_field = np.int16(0x7F80)
    worst = np.int16(0)  # the largest exponent field written
    for r in range(out):
        block_row = (r // block_rows) * grid_cols
        row = pairs[r]
        row_written = written[r]
        for c0 in range(0, half_width, half_block):
            table = values[block_row + c0 // half_block]
            for k in range(c0, min(c0 + half_block, half_width)):
                pair = row[k]
                row_written[k] = (np.uint32(np.uint16(table[pair & 0xFF]))
                                  | (np.uint32(np.uint16(table[pair >> 8])) << 16))
        row_decoded = decoded[r]
        for k in range(2 * half_width):
            worst = max(worst, row_decoded[k] & exponent_field)
    return worst < exponent_field
