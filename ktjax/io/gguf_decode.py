"""GGML quantized blocks decoded to float32 in parallel numba loops, bit for bit as
`gguf.quants.dequantize` decodes them.

Why: gguf's numpy decoders run at 0.02-0.2 G values/s on one core (measured on the dev box:
`scripts/bench_gguf_decode.py`), and a DeepSeek-R1 GGUF holds hundreds of billions of values in
types no integer expert format keeps as they are (a Q4_K_M file's Q6_K down projections alone:
218 G values, about half an hour). Here every block is decoded by one iteration of a parallel loop,
with gguf's own order of float32 operations (scale times sub-scale first, then times the value,
then minus the minimum), so the results are the same bits; no FMA contraction (numba contracts
only under fastmath).

Also the i-quants of the low-bit DeepSeek-R1 files (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ3_XXS:
`gguf_iquants`). Types without a kernel (IQ2_S, IQ3_S, TQ*, MXFP4, ...) return None: the caller uses
gguf's decoder.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGML
from numba import njit, prange

QK = 256  # values per K-quant super-block

# float16 bits -> float32, exactly (subnormals, infinities and NaNs included): a 256 KB table the
# kernels index, as numba has no float16 arithmetic.
HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@njit(inline="always")
def f16_at(b, i, half):
    """The float16 stored little-endian at bytes i, i+1 of b, as float32."""
    return half[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@njit(parallel=True, cache=True)
def _q8_0(blocks, half, out):
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for i in range(32):
            o[i] = np.float32(np.int8(b[2 + i])) * d


@njit(parallel=True, cache=True)
def _q4_0(blocks, half, out):
    """d, 16 bytes of nibbles (values 0-15 low, 16-31 high): w = d * (q - 8)."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for i in range(16):
            x = b[2 + i]
            o[i] = d * np.float32(np.int32(x & 15) - 8)
            o[i + 16] = d * np.float32(np.int32(x >> 4) - 8)


@njit(parallel=True, cache=True)
def _q4_1(blocks, half, out):
    """d, m, 16 bytes of nibbles: w = d * q + m."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d, m = f16_at(b, 0, half), f16_at(b, 2, half)
        for i in range(16):
            x = b[4 + i]
            o[i] = d * np.float32(x & 15) + m
            o[i + 16] = d * np.float32(x >> 4) + m


@njit(inline="always")
def u16(b, i):
    """The uint16 stored little-endian at bytes i, i+1 of b (a float16's bits, as GGUF stores its scales)."""
    return np.uint16(b[i]) | (np.uint16(b[i + 1]) << 8)


@njit(inline="always")
def u32(b, i):
    """The uint32 stored little-endian at bytes i..i+3 of b."""
    return np.uint32(b[i]) | (np.uint32(b[i + 1]) << 8) | (np.uint32(b[i + 2]) << 16) | (np.uint32(b[i + 3]) << 24)


@njit(parallel=True, cache=True)
def _q5_0(blocks, half, out):
    """d, 32 fifth bits (uint32), 16 bytes of nibbles: w = d * (q - 16)."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        qh = u32(b, 2)
        for i in range(16):
            x = b[6 + i]
            lo = np.int32(x & 15) | np.int32(((qh >> i) & 1) << 4)
            hi = np.int32(x >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)
            o[i] = d * np.float32(lo - 16)
            o[i + 16] = d * np.float32(hi - 16)


@njit(parallel=True, cache=True)
def _q5_1(blocks, half, out):
    """d, m, 32 fifth bits (uint32), 16 bytes of nibbles: w = d * q + m."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d, m = f16_at(b, 0, half), f16_at(b, 2, half)
        qh = u32(b, 4)
        for i in range(16):
            x = b[8 + i]
            o[i] = d * np.float32(np.int32(x & 15) | np.int32(((qh >> i) & 1) << 4)) + m
            o[i + 16] = d * np.float32(np.int32(x >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)) + m


# The K-quants below walk their packed bytes once each, writing every value a byte holds (reading
# a byte once per value it holds ran 2-3 times slower: the loop did not vectorise).

@njit(parallel=True, cache=True)
def _q2_k(blocks, half, out):
    """16 bytes of 4-bit scale and min per 16 values, 64 bytes of 2-bit q, d, dmin: w = d*sc * q - dmin*m.
    q byte h*32 + lane holds values h*128 + j*32 + lane in bits 2j."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d, dmin = f16_at(b, 80, half), f16_at(b, 82, half)
        for h in range(2):
            for k in range(2):
                s0, s1, s2, s3 = b[h * 8 + k], b[h * 8 + 2 + k], b[h * 8 + 4 + k], b[h * 8 + 6 + k]
                d0, m0 = d * np.float32(s0 & 15), dmin * np.float32(s0 >> 4)
                d1, m1 = d * np.float32(s1 & 15), dmin * np.float32(s1 >> 4)
                d2, m2 = d * np.float32(s2 & 15), dmin * np.float32(s2 >> 4)
                d3, m3 = d * np.float32(s3 & 15), dmin * np.float32(s3 >> 4)
                for lane in range(k * 16, k * 16 + 16):
                    x = b[16 + h * 32 + lane]
                    i = h * 128 + lane
                    o[i] = d0 * np.float32(x & 3) - m0
                    o[i + 32] = d1 * np.float32((x >> 2) & 3) - m1
                    o[i + 64] = d2 * np.float32((x >> 4) & 3) - m2
                    o[i + 96] = d3 * np.float32(x >> 6) - m3


@njit(inline="always")
def q3_k_scale(b, s):
    """Sub-block s's signed 6-bit scale in a Q3_K block b: 4 low bits in bytes 96-103, 2 high in 104-107."""
    low = (b[96 + s % 8] >> (4 * (s // 8))) & 15
    high = (b[104 + s % 4] >> (2 * (s // 4))) & 3
    return np.int32(low | (high << 4)) - 32


@njit(inline="always")
def _q3_scale(b, d, s):
    return d * np.float32(q3_k_scale(b, s))


@njit(parallel=True, cache=True)
def _q3_k(blocks, half, out):
    """32 bytes of high bits, 64 of 2-bit low bits, 12 of 6-bit scales (minus 32), d: w = d*s * q,
    q in [-4, 3], minus 4 where the high bit is clear. Value h*128 + j*32 + lane: low bits 2j of
    byte 32 + h*32 + lane, high bit 4h + j of byte lane."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 108, half)
        for h in range(2):
            for k in range(2):
                d0, d1 = _q3_scale(b, d, h * 8 + k), _q3_scale(b, d, h * 8 + 2 + k)
                d2, d3 = _q3_scale(b, d, h * 8 + 4 + k), _q3_scale(b, d, h * 8 + 6 + k)
                for lane in range(k * 16, k * 16 + 16):
                    x = np.int32(b[32 + h * 32 + lane])
                    m = np.int32(b[lane]) >> (4 * h)
                    i = h * 128 + lane
                    o[i] = d0 * np.float32((x & 3) - (((m & 1) ^ 1) << 2))
                    o[i + 32] = d1 * np.float32(((x >> 2) & 3) - ((((m >> 1) & 1) ^ 1) << 2))
                    o[i + 64] = d2 * np.float32(((x >> 4) & 3) - ((((m >> 2) & 1) ^ 1) << 2))
                    o[i + 96] = d3 * np.float32((x >> 6) - ((((m >> 3) & 1) ^ 1) << 2))


@njit(inline="always")
def _scale_min_k4(b, r):
    """The 6-bit scale and min of sub-block r of a Q4_K/Q5_K block (bytes 4-15 of b)."""
    if r < 4:
        return b[4 + r] & 63, b[8 + r] & 63
    return (b[8 + r] & 15) | ((b[r] >> 2) & 0x30), (b[8 + r] >> 4) | ((b[4 + r] >> 2) & 0x30)


@njit(inline="always")
def _k4_pair(b, c, d, dmin):
    """d * scale and dmin * min of sub-blocks 2c and 2c + 1 (the nibbles' low and high halves of bytes c*32..)."""
    sc0, m0 = _scale_min_k4(b, 2 * c)
    sc1, m1 = _scale_min_k4(b, 2 * c + 1)
    return d * np.float32(sc0), dmin * np.float32(m0), d * np.float32(sc1), dmin * np.float32(m1)


@njit(parallel=True, cache=True)
def _q4_k(blocks, half, out):
    """d, dmin, 12 bytes of 6-bit scales and mins per 32 values, 128 bytes of nibbles (byte
    c*32 + lane: value c*64 + lane low, c*64 + 32 + lane high): w = d*sc * q - dmin*m."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d, dmin = f16_at(b, 0, half), f16_at(b, 2, half)
        for c in range(4):
            d0, dm0, d1, dm1 = _k4_pair(b, c, d, dmin)
            for lane in range(32):
                x = b[16 + c * 32 + lane]
                o[c * 64 + lane] = d0 * np.float32(x & 15) - dm0
                o[c * 64 + 32 + lane] = d1 * np.float32(x >> 4) - dm1


@njit(parallel=True, cache=True)
def _q5_k(blocks, half, out):
    """Q4_K's fields with 32 bytes of fifth bits before the nibbles (bit r of byte lane: value r*32 + lane)."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d, dmin = f16_at(b, 0, half), f16_at(b, 2, half)
        for c in range(4):
            d0, dm0, d1, dm1 = _k4_pair(b, c, d, dmin)
            for lane in range(32):
                x, h = np.int32(b[48 + c * 32 + lane]), np.int32(b[16 + lane]) >> (2 * c)
                o[c * 64 + lane] = d0 * np.float32((x & 15) | ((h & 1) << 4)) - dm0
                o[c * 64 + 32 + lane] = d1 * np.float32((x >> 4) | ((h & 2) << 3)) - dm1


@njit(parallel=True, cache=True)
def _q6_k(blocks, half, out):
    """128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, d: w = d*sc * (q - 32). Value
    h*128 + j*32 + lane: nibble j // 2 of byte h*64 + (j % 2)*32 + lane, bits 2j of byte 128 + h*32 + lane."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 208, half)
        for h in range(2):
            for k in range(2):
                d0 = d * np.float32(np.int8(b[192 + h * 8 + k]))
                d1 = d * np.float32(np.int8(b[192 + h * 8 + 2 + k]))
                d2 = d * np.float32(np.int8(b[192 + h * 8 + 4 + k]))
                d3 = d * np.float32(np.int8(b[192 + h * 8 + 6 + k]))
                for lane in range(k * 16, k * 16 + 16):
                    a, c = np.int32(b[h * 64 + lane]), np.int32(b[h * 64 + 32 + lane])
                    x = np.int32(b[128 + h * 32 + lane])
                    i = h * 128 + lane
                    o[i] = d0 * np.float32(((a & 15) | ((x & 3) << 4)) - 32)
                    o[i + 32] = d1 * np.float32(((c & 15) | (((x >> 2) & 3) << 4)) - 32)
                    o[i + 64] = d2 * np.float32(((a >> 4) | (((x >> 4) & 3) << 4)) - 32)
                    o[i + 96] = d3 * np.float32(((c >> 4) | ((x >> 6) << 4)) - 32)


@njit(parallel=True, cache=True)
def _iq4_nl(blocks, half, values, out):
    """d, 16 bytes of nibbles indexing a table of 16 non-linear levels: w = d * level."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        for i in range(32):
            o[i] = d * values[(b[2 + i % 16] >> (4 * (i // 16))) & 15]


@njit(parallel=True, cache=True)
def _iq4_xs(blocks, half, values, out):
    """d, 2 + 4 bytes of 6-bit scales (minus 32) per 32 values, 128 bytes of nibbles indexing IQ4_NL's levels."""
    for n in prange(blocks.shape[0]):
        b, o = blocks[n], out[n]
        d = f16_at(b, 0, half)
        scales_h = np.int32(b[2]) | (np.int32(b[3]) << 8)
        for r in range(8):
            low = np.int32((b[4 + r // 2] >> (4 * (r % 2))) & 15)
            dl = d * np.float32((low | (((scales_h >> (2 * r)) & 3) << 4)) - 32)
            for lane in range(32):
                o[r * 32 + lane] = dl * values[(b[8 + r * 16 + lane % 16] >> (4 * (lane // 16))) & 15]


def _decoder(type_name: str):
    from ktjax.io import gguf_iquants  # it builds on this module's helpers

    return {
        "Q8_0": _q8_0,
        "Q4_0": _q4_0,
        "Q4_1": _q4_1,
        "Q5_0": _q5_0,
        "Q5_1": _q5_1,
        "Q2_K": _q2_k,
        "Q3_K": _q3_k,
        "Q4_K": _q4_k,
        "Q5_K": _q5_k,
        "Q6_K": _q6_k,
        "IQ4_NL": lambda b, h, o: _iq4_nl(b, h, IQ4_VALUES, o),
        "IQ4_XS": lambda b, h, o: _iq4_xs(b, h, IQ4_VALUES, o),
    }.get(type_name) or gguf_iquants.decoder(type_name)


DECODED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
           "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ1_M")


def dequantize(raw: np.ndarray, type_name: str, out: np.ndarray | None = None) -> np.ndarray | None:
    """float32 values of a GGUF tensor's bytes (uint8 [..., bytes per row]) as [..., values per row],
    the same bits as `gguf.quants.dequantize`; written into `out` when given. None for a type
    without a kernel here."""
    decode = _decoder(type_name)
    if decode is None:
        return None
    block, size = gguf.GGML_QUANT_SIZES[GGML[type_name]]
    if raw.shape[-1] % size:
        raise ValueError(f"{type_name}: rows of {raw.shape[-1]} bytes are not whole blocks of {size}")
    shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{type_name}: out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    decode(np.ascontiguousarray(raw).reshape(-1, size), HALF, out.reshape(-1, block))
    return out
