"""Integer formats for routed experts held in host memory: int8 and int4, quantized along each
weight's input dimension in groups of 32, laid out so that GGUF's blocks map into them exactly.

int8 (GGUF Q8_0): w[o, i] = scale[o, g] * q[o, i] with g = i // 32; q int8 in [-127, 127], scale
    float16 (kept as its raw bits, uint16, so kernels without float16 read it).
int4 (GGUF Q4_K): w[o, i] = (d[o, s] * sc[o, g]) * q[o, i] - dmin[o, s] * mn[o, g], q in 0..15,
    per group of 32 an 8-bit scale sc and minimum mn, per super-block of 256 (s = i // 256) float32
    d and dmin. Two values per byte: in each run of 64 values (32 bytes), byte l holds value l in
    its low nibble and value 32 + l in its high nibble, as Q4_K's `qs` does, so a Q4_K block is
    copied, not re-packed, and its 6-bit scales and minimums fit the 8-bit ones.

Rows are padded with zeros to whole groups (int8) or super-blocks (int4); the activations they
meet are zero-padded too, so padding never contributes. Dequantization follows GGUF's order of float32 operations, so a block
dequantizes here bit for bit as `gguf.quants.dequantize` does it.

The quantizers take numpy arrays (on the host) or jax arrays (on a GPU, where a full-size expert
quantizes in milliseconds instead of a second); so do the dequantizers (the loader dequantizes GGUF's
non-expert tensors on the device this way).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 32  # values per scale
SUPER = 256  # values per int4 super-block (8 groups share d and dmin)
FORMATS = ("int8", "int4")
# Divisions by constants as multiplications by their float32 reciprocals: XLA rewrites x / c into
# x * (1 / c), so numpy's and XLA's quantizers give the same scales only when both multiply (measured
# on XLA:CPU over 3 random 2048 x 7168 matrices: int8 identical; int4 scales identical, 1-3 of 14.7 M
# values one level apart at near-ties, so without a GPU the host quantizes with `quant_host`, numpy's twin).
RECIP_127, RECIP_15, RECIP_255 = np.float32(1 / 127), np.float32(1 / 15), np.float32(1 / 255)


@dataclasses.dataclass(frozen=True)
class QuantMatrix:
    """One quantized [rows, cols] weight (cols: the input dimension, padded to `padded_cols`)."""

    fmt: str
    rows: int
    cols: int

    @property
    def padded_cols(self) -> int:
        unit = GROUP if self.fmt == "int8" else SUPER
        return -(-self.cols // unit) * unit

    @property
    def groups(self) -> int:
        return self.padded_cols // GROUP

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The arrays of this matrix: name -> (dtype, shape)."""
        R, C, G = self.rows, self.padded_cols, self.groups
        if self.fmt == "int8":
            return {"q": (np.dtype(np.int8), (R, C)), "scale": (np.dtype(np.uint16), (R, G))}
        S = C // SUPER
        return {"q": (np.dtype(np.uint8), (R, C // 2)), "sc": (np.dtype(np.uint8), (R, G)),
                "mn": (np.dtype(np.uint8), (R, G)), "d": (np.dtype(np.float32), (R, S)),
                "dmin": (np.dtype(np.float32), (R, S))}

    @property
    def nbytes(self) -> int:
        return sum(dt.itemsize * math.prod(shape) for dt, shape in self.arrays().values())


# ---- int8 ------------------------------------------------------------------------------------

def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def _groups(w_RC, padded: int):
    """float32 [R, G, 32]: the rows padded with zeros and split into groups."""
    xp = _xp(w_RC)
    R, C = w_RC.shape
    w = xp.pad(w_RC.astype(xp.float32), ((0, 0), (0, padded - C)))
    return w.reshape(R, padded // GROUP, GROUP)


def _inverse(x):
    """1 / x where x > 0, else 0 (an all-zero group quantizes to zeros)."""
    xp = _xp(x)
    positive = x > 0
    return xp.where(positive, 1.0 / xp.where(positive, x, 1.0), 0.0).astype(xp.float32)


def _bits16(x):
    return x.view(np.uint16) if isinstance(x, np.ndarray) else jax.lax.bitcast_convert_type(x, jnp.uint16)


def quantize_int8(w_RC) -> dict:
    xp = _xp(w_RC)
    m = QuantMatrix("int8", *w_RC.shape)
    w = _groups(w_RC, m.padded_cols)
    scale16 = (xp.abs(w).max(-1) * RECIP_127).astype(xp.float16)
    q = xp.clip(xp.rint(w * _inverse(scale16.astype(xp.float32))[..., None]), -127, 127).astype(xp.int8)
    return {"q": q.reshape(m.rows, -1), "scale": _bits16(scale16)}


def _half(bits):
    """float16 from its raw bits (uint16)."""
    return bits.view(np.float16) if isinstance(bits, np.ndarray) else jax.lax.bitcast_convert_type(bits, jnp.float16)


def dequantize_int8(a: dict[str, np.ndarray], cols: int) -> np.ndarray:
    xp = _xp(a["q"])
    R, C = a["q"].shape
    scale = _half(a["scale"]).astype(xp.float32)
    w = a["q"].reshape(R, C // GROUP, GROUP).astype(xp.float32) * scale[..., None]
    return w.reshape(R, C)[:, :cols]


# ---- int4 ------------------------------------------------------------------------------------

def pack_nibbles(q_RC):
    """uint8 [R, C/2] from values 0..15 [R, C] (C a multiple of 64), Q4_K's order."""
    R, C = q_RC.shape
    q = q_RC.reshape(R, C // 64, 2, 32).astype(_xp(q_RC).uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(R, C // 2)


def unpack_nibbles(p_RH: np.ndarray) -> np.ndarray:
    R, H = p_RH.shape
    p = p_RH.reshape(R, H // 32, 1, 32)
    return _xp(p_RH).concatenate([p & 15, p >> 4], axis=2).reshape(R, 2 * H)


def quantize_int4(w_RC) -> dict:
    xp = _xp(w_RC)
    m = QuantMatrix("int4", *w_RC.shape)
    R, S = m.rows, m.padded_cols // SUPER
    w = _groups(w_RC, m.padded_cols)  # [R, G, 32]
    lo = xp.minimum(w.min(-1), 0.0)  # as Q4_K: the minimum is never above zero
    scale_g = (w.max(-1) - lo) * RECIP_15  # [R, G]
    min_g = -lo
    # Second level: per super-block a float32 base, per group an 8-bit multiple of it.
    d = (scale_g.reshape(R, S, 8).max(-1) * RECIP_255).astype(xp.float32)
    dmin = (min_g.reshape(R, S, 8).max(-1) * RECIP_255).astype(xp.float32)

    def level(x_RG, base_RS):
        inv = xp.repeat(_inverse(base_RS), 8, axis=1)
        return xp.clip(xp.rint(x_RG * inv), 0, 255).astype(xp.uint8)

    sc, mn = level(scale_g, d), level(min_g, dmin)
    step = xp.repeat(d, 8, axis=1) * sc.astype(xp.float32)  # the scale dequantization will use
    offset = xp.repeat(dmin, 8, axis=1) * mn.astype(xp.float32)
    q = xp.clip(xp.rint((w + offset[..., None]) * _inverse(step)[..., None]), 0, 15).astype(xp.uint8)
    return {"q": pack_nibbles(q.reshape(R, -1)), "sc": sc, "mn": mn, "d": d, "dmin": dmin}


def dequantize_int4(a: dict[str, np.ndarray], cols: int) -> np.ndarray:
    xp = _xp(a["q"])
    q = unpack_nibbles(a["q"]).astype(xp.float32)
    R, C = q.shape
    step = xp.repeat(a["d"], 8, axis=1) * a["sc"].astype(xp.float32)  # float32, as GGUF: d * sc
    offset = xp.repeat(a["dmin"], 8, axis=1) * a["mn"].astype(xp.float32)
    w = q.reshape(R, C // GROUP, GROUP) * step[..., None] - offset[..., None]
    return w.reshape(R, C)[:, :cols]


def quantize(w_RC, fmt: str) -> dict:
    """The arrays of `QuantMatrix(fmt, *w.shape)` for a float matrix [rows, cols]."""
    if fmt == "int8":
        return quantize_int8(w_RC)
    if fmt == "int4":
        return quantize_int4(w_RC)
    raise ValueError(f"unknown quantized format {fmt!r} (use one of {FORMATS})")


def dequantize(a: dict[str, np.ndarray], fmt: str, cols: int) -> np.ndarray:
    """float32 [rows, cols]: numpy for numpy arrays, jax (traceable) for jax arrays."""
    return dequantize_int8(a, cols) if fmt == "int8" else dequantize_int4(a, cols)
