"""`ktjax.experts.quant`'s int8/int4 quantizers for host arrays, as parallel numba loops over rows:
the same arrays, bit for bit, as its numpy code (the same float32 operations in the same order; no
fastmath, so no FMA contraction).

Why: without a GPU the loader and `ktjax quantize` quantize every routed expert on the host, and numpy
took 139 ms (int4) and 320 ms (int8) per 2048 x 7168 matrix on the dev box, three per expert: hours for
DeepSeek-R1's 14,848 experts on one core. Here each row is one iteration of a parallel loop.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ktjax.experts.quant import GROUP, RECIP_15, RECIP_127, RECIP_255, QuantMatrix


@intrinsic
def _f16_bits(typingctx, x):
    """float32 -> the bits of the nearest float16 (ties to even; subnormals, infinities), as numpy's
    astype(float16) rounds."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _f16_value(typingctx, bits):
    """float16 bits -> float32 (exact)."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(inline="always")
def _inverse(x):
    return np.float32(1.0) / x if x > 0 else np.float32(0.0)


@njit(inline="always")
def _value(w, r, c):
    """w[r, c], or the zero padding past the row's end."""
    return w[r, c] if c < w.shape[1] else np.float32(0.0)


@njit(parallel=True, cache=True)
def _int8(w, q, scale):
    """w float32 [R, C] -> q int8 [R, G*32], scale float16 bits [R, G]: per group of 32, the scale is
    max|w| / 127 in float16 and q = round(w / scale)."""
    for r in prange(w.shape[0]):
        for g in range(scale.shape[1]):
            amax = np.float32(0.0)
            for c in range(g * GROUP, (g + 1) * GROUP):
                amax = max(amax, abs(_value(w, r, c)))
            bits = _f16_bits(amax * RECIP_127)
            inv = _inverse(_f16_value(bits))
            for c in range(g * GROUP, (g + 1) * GROUP):
                q[r, c] = min(max(np.rint(_value(w, r, c) * inv), np.float32(-127.0)), np.float32(127.0))
            scale[r, g] = bits


@njit(parallel=True, cache=True)
def _int4(w, q, sc, mn, d, dmin):
    """w float32 [R, C] -> Q4_K's arrays (`quant.quantize_int4`): per group of 32 a range from min(w, 0)
    to max(w) in 15 steps, per super-block of 8 groups float32 bases d and dmin of which each group's
    step and minimum are 8-bit multiples; q in 0..15, two per byte in Q4_K's nibble order."""
    for r in prange(w.shape[0]):
        scale_g = np.empty(8, np.float32)
        min_g = np.empty(8, np.float32)
        for s in range(d.shape[1]):
            for i in range(8):
                g0 = (s * 8 + i) * GROUP
                hi, lo = _value(w, r, g0), _value(w, r, g0)
                for c in range(g0 + 1, g0 + GROUP):
                    v = _value(w, r, c)
                    hi, lo = max(hi, v), min(lo, v)
                lo = min(lo, np.float32(0.0))
                scale_g[i] = (hi - lo) * RECIP_15
                min_g[i] = -lo
            d_s, dmin_s = scale_g[0], min_g[0]
            for i in range(1, 8):
                d_s, dmin_s = max(d_s, scale_g[i]), max(dmin_s, min_g[i])
            d_s, dmin_s = d_s * RECIP_255, dmin_s * RECIP_255
            d[r, s], dmin[r, s] = d_s, dmin_s
            inv_d, inv_dmin = _inverse(d_s), _inverse(dmin_s)
            for i in range(8):
                g = s * 8 + i
                sc_g = min(max(np.rint(scale_g[i] * inv_d), np.float32(0.0)), np.float32(255.0))
                mn_g = min(max(np.rint(min_g[i] * inv_dmin), np.float32(0.0)), np.float32(255.0))
                sc[r, g], mn[r, g] = sc_g, mn_g
                step = d_s * np.float32(np.uint8(sc_g))
                offset = dmin_s * np.float32(np.uint8(mn_g))
                inv = _inverse(step)
                for l in range(GROUP):
                    c = g * GROUP + l
                    v = min(max(np.rint((_value(w, r, c) + offset) * inv), np.float32(0.0)), np.float32(15.0))
                    byte = (c // 64) * 32 + c % 32  # Q4_K: a run of 64 values in 32 bytes, low nibbles first
                    if c % 64 < 32:
                        q[r, byte] = np.uint8(v)
                    else:
                        q[r, byte] |= np.uint8(v) << 4


def quantize(w_RC: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """`quant.quantize` for a host matrix [rows, cols]: the same arrays, computed in parallel."""
    w = np.ascontiguousarray(w_RC, np.float32)
    m = QuantMatrix(fmt, *w.shape)
    out = {name: np.zeros(shape, dtype) for name, (dtype, shape) in m.arrays().items()}
    if fmt == "int8":
        _int8(w, out["q"], out["scale"])
    else:
        _int4(w, out["q"], out["sc"], out["mn"], out["d"], out["dmin"])
    return out


__all__ = ["quantize"]
