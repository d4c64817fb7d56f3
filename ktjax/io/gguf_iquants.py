"""The i-quants of low-bit GGUF files (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ3_XXS: the types unsloth's
1.58-2.2 bit DeepSeek-R1 files keep their experts in) decoded to float32 in parallel numba loops, bit
for bit as `gguf.quants.dequantize`: 8 (or 4) values at a time from gguf's own grids of sign-free
patterns, times a sign pattern and a scale, in gguf's order of float32 operations (`gguf_decode`)."""

from __future__ import annotations

import functools

import gguf
import numpy as np
from numba import njit, prange

from ktjax.io.gguf_decode import f16_at, u32

@functools.cache
def _grid(cls) -> np.ndarray:
    """float32 [entries, values per entry]: the grid gguf decodes with (`gguf.quants.IQ*.grid`)."""
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), np.float32)


KSIGNS = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8).copy()  # 7 sign bits -> 8, with even parity


@njit(inline="always")
def _signed8(o, at, grid_row, db, signs):
    """o[at:at+8] = db * grid row * (+1 or -1 by the bits of `signs`)."""
    for v in range(8):
        x = db * grid_row[v]
        o[at + v] = -x if (signs >> v) & 1 else x


@njit(parallel=True, cache=True)
def _iq2_xxs(blocks, half, grid, ksigns, out):
    """d; per 32 values two uint32: 4 grid indices (8 values each), then 4 x 7 sign bits and a 4-bit
    scale s: w = d * (0.5 + s) * 0.25 * grid * sign."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for g in range(8):
            aux1 = u32(b, 2 + 8 * g + 4)
            db = d * (np.float32(0.5) + np.float32(aux1 >> 28)) * np.float32(0.25)
            for l in range(4):
                _signed8(o, 32 * g + 8 * l, grid[b[2 + 8 * g + l]], db, ksigns[(aux1 >> (7 * l)) & 127])


@njit(parallel=True, cache=True)
def _iq2_xs(blocks, half, grid, ksigns, out):
    """d; 32 uint16 of 9-bit grid index (8 values) and 7 sign bits; 16 4-bit scales s (16 values each):
    w = d * (0.5 + s) * 0.25 * grid * sign."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for i in range(32):
            q = np.int32(b[2 + 2 * i]) | (np.int32(b[3 + 2 * i]) << 8)
            sc = (b[66 + i // 4] >> (4 * ((i // 2) % 2))) & 15
            db = d * (np.float32(0.5) + np.float32(sc)) * np.float32(0.25)
            _signed8(o, 8 * i, grid[q & 511], db, ksigns[q >> 9])


@njit(parallel=True, cache=True)
def _iq3_xxs(blocks, half, grid, ksigns, out):
    """d; 64 grid indices (4 values each); per 32 values a uint32 of 4 x 7 sign bits and a 4-bit scale s:
    w = d * (0.5 + s) * 0.5 * grid * sign."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for g in range(8):
            aux = u32(b, 66 + 4 * g)
            db = d * (np.float32(0.5) + np.float32(aux >> 28)) * np.float32(0.5)
            for l in range(4):
                signs = ksigns[(aux >> (7 * l)) & 127]
                for h in range(2):
                    row = grid[b[2 + 8 * g + 2 * l + h]]
                    for v in range(4):
                        x = db * row[v]
                        o[32 * g + 8 * l + 4 * h + v] = -x if (signs >> (4 * h + v)) & 1 else x


@njit(parallel=True, cache=True)
def _iq1_s(blocks, half, grid, out):
    """d; 32 grid index bytes; per 32 values a uint16: 4 x 3 high index bits, a 3-bit scale s and the
    sign of a shift delta: w = d * (2s + 1) * (grid + delta), delta = +-0.125."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for g in range(8):
            qh = np.int32(b[34 + 2 * g]) | (np.int32(b[35 + 2 * g]) << 8)
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            delta = np.float32(-0.125) if qh & 0x8000 else np.float32(0.125)
            for k in range(4):
                row = grid[np.int32(b[2 + 4 * g + k]) | (((qh >> (3 * k)) & 7) << 8)]
                for v in range(8):
                    o[32 * g + 8 * k + v] = dl * (row[v] + delta)


@njit(parallel=True, cache=True)
def _iq1_m(blocks, half, grid, out):
    """32 grid index bytes; 16 bytes of 3 high index bits and a delta sign per index (a nibble each);
    8 bytes of 3-bit scales (per 16 values) with the float16 d spread over their top nibbles:
    w = d * (2s + 1) * (grid + delta), delta = +-0.125."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        w0, w1 = np.int32(b[48]) | (np.int32(b[49]) << 8), np.int32(b[50]) | (np.int32(b[51]) << 8)
        w2, w3 = np.int32(b[52]) | (np.int32(b[53]) << 8), np.int32(b[54]) | (np.int32(b[55]) << 8)
        d = half[((w0 >> 12) & 15) | (((w1 >> 12) & 15) << 4) | (((w2 >> 12) & 15) << 8) | (((w3 >> 12) & 15) << 12)]
        for i in range(32):  # grid index i: 8 values, in half i // 2 of group i // 4
            nib = (np.int32(b[32 + i // 2]) >> (4 * (i % 2))) & 15
            s = i // 2  # the scale of values 16 * s .. 16 * s + 15
            word = np.int32(b[48 + 2 * (s // 4)]) | (np.int32(b[49 + 2 * (s // 4)]) << 8)
            dl = d * np.float32(2 * ((word >> (3 * (s % 4))) & 7) + 1)
            delta = np.float32(-0.125) if nib & 8 else np.float32(0.125)
            row = grid[np.int32(b[i]) | ((nib & 7) << 8)]
            for v in range(8):
                o[8 * i + v] = dl * (row[v] + delta)


def decoder(type_name: str):
    """`(blocks, half, out) -> None` for an i-quant type with a kernel here, else None."""
    return {
        "IQ2_XXS": lambda b, h, o: _iq2_xxs(b, h, _grid(gguf.quants.IQ2_XXS), KSIGNS, o),
        "IQ2_XS": lambda b, h, o: _iq2_xs(b, h, _grid(gguf.quants.IQ2_XS), KSIGNS, o),
        "IQ3_XXS": lambda b, h, o: _iq3_xxs(b, h, _grid(gguf.quants.IQ3_XXS), KSIGNS, o),
        "IQ1_S": lambda b, h, o: _iq1_s(b, h, _grid(gguf.quants.IQ1_S), o),
        "IQ1_M": lambda b, h, o: _iq1_m(b, h, _grid(gguf.quants.IQ1_M), o),
    }.get(type_name)
