"""One routed expert of an int8/int4 model as a single byte buffer: gate_up [2F, D] and down [D, F]
quantized (`ktjax.experts.quant`), every array at a fixed, aligned offset. One buffer per expert
is one contiguous transfer on the link and one base address for the host kernels; the GPU reads
the arrays back out of it after the transfer and dequantizes them there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.experts import quant_host
from ktjax.experts.quant import GROUP, QuantMatrix, dequantize, quantize

ALIGN = 64


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each array of an expert's two matrices lies in its buffer."""

    fmt: str  # "int8" or "int4"
    F: int  # moe_intermediate_size
    D: int  # hidden_size

    @property
    def matrices(self) -> dict[str, QuantMatrix]:
        return {"gate_up": QuantMatrix(self.fmt, 2 * self.F, self.D), "down": QuantMatrix(self.fmt, self.D, self.F)}

    @functools.cached_property
    def sections(self) -> dict[tuple[str, str], tuple[int, np.dtype, tuple[int, ...]]]:
        """(matrix, array) -> (byte offset, dtype, shape)."""
        out, offset = {}, 0
        for m_name, m in self.matrices.items():
            for a_name, (dtype, shape) in m.arrays().items():
                out[(m_name, a_name)] = (offset, dtype, shape)
                offset += -(-(dtype.itemsize * math.prod(shape)) // ALIGN) * ALIGN
        return out

    @property
    def nbytes(self) -> int:
        offset, dtype, shape = list(self.sections.values())[-1]
        return offset + dtype.itemsize * math.prod(shape)

    def offsets(self, matrix: str) -> np.ndarray:
        """Byte offsets of one matrix's arrays, in `QuantMatrix.arrays()` order (the kernels' argument order)."""
        return np.array([off for (m, _), (off, _, _) in self.sections.items() if m == matrix], np.int64)

    def pack(self, gate_FD, up_FD, down_DF):
        """Quantize one expert's float matrices into its buffer (uint8 [nbytes]); numpy arrays on
        the host (`quant_host`'s parallel loops, numpy's arrays bit for bit), or jax arrays (a jitted
        caller quantizes on the device)."""
        xp = np if isinstance(gate_FD, np.ndarray) else jnp
        mats = {"gate_up": xp.concatenate([gate_FD, up_FD]).astype(xp.float32), "down": down_DF.astype(xp.float32)}
        quantizer = quant_host.quantize if xp is np else quantize
        return self.place({m_name: quantizer(w, self.fmt) for m_name, w in mats.items()})

    def place(self, arrays: dict[str, dict]):
        """The buffer of already quantized arrays ({"gate_up": {...}, "down": {...}}, as `quantize`
        returns them): how a stored int8/int4 checkpoint loads without quantizing again."""
        xp = np if isinstance(arrays["down"]["q"], np.ndarray) else jnp
        pieces, end = [], 0
        for (m_name, a_name), (offset, dtype, shape) in self.sections.items():
            arr = arrays[m_name][a_name]
            if tuple(arr.shape) != shape:
                raise ValueError(f"{self.fmt} {m_name}.{a_name}: shape {list(arr.shape)}, expected {list(shape)}")
            raw = _bytes(arr.astype(dtype))
            pieces += [xp.zeros(offset - end, xp.uint8), raw]
            end = offset + raw.shape[0]
        return xp.concatenate(pieces)

    def arrays(self, buf: np.ndarray, matrix: str) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of one matrix's arrays in a buffer."""
        out = {}
        for (m_name, a_name), (offset, dtype, shape) in self.sections.items():
            if m_name == matrix:
                out[a_name] = buf[offset:offset + dtype.itemsize * math.prod(shape)].view(dtype).reshape(shape)
        return out

    def dequantize(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 gate_up [2F, D] and down [D, F]: the reference the device and host paths are checked against."""
        return (dequantize(self.arrays(buf, "gate_up"), self.fmt, self.D),
                dequantize(self.arrays(buf, "down"), self.fmt, self.F))

    # ---- device (jax, inside a compiled segment) --------------------------------------------
    def _device_array(self, buf: jax.Array, matrix: str, name: str) -> jax.Array:
        offset, dtype, shape = self.sections[(matrix, name)]
        raw = jax.lax.slice_in_dim(buf, offset, offset + dtype.itemsize * math.prod(shape))
        if dtype.itemsize > 1:
            raw = raw.reshape(-1, dtype.itemsize)
        return jax.lax.bitcast_convert_type(raw, jnp.dtype(dtype)).reshape(shape)

    def device_matrix(self, buf: jax.Array, matrix: str, dtype) -> jax.Array:
        """One matrix dequantized from a buffer on the device: gate_up [2F, D] or down [D, F] in dtype."""
        m = self.matrices[matrix]
        a = functools.partial(self._device_array, buf, matrix)
        R, C, G = m.rows, m.padded_cols, m.groups
        f32 = jnp.float32
        if self.fmt == "int8":
            scale = jax.lax.bitcast_convert_type(a("scale"), jnp.float16).astype(f32)
            w = a("q").reshape(R, G, GROUP).astype(f32) * scale[..., None]
        else:
            p = a("q").reshape(R, C // 64, 1, 32)
            q = jnp.concatenate([p & 15, p >> 4], axis=2).reshape(R, G, GROUP).astype(f32)
            step = jnp.repeat(a("d"), 8, axis=1) * a("sc").astype(f32)
            offset = jnp.repeat(a("dmin"), 8, axis=1) * a("mn").astype(f32)
            w = q * step[..., None] - offset[..., None]
        return w.reshape(R, C)[:, :m.cols].astype(dtype)

    def device_matvec(self, buf: jax.Array, matrix: str, x_NC: jax.Array, *, form: str = "inline") -> jax.Array:
        """float32 [N, rows]: x times one matrix's transpose, reading its quantized bytes in place.

        For few tokens. XLA fuses the dequantization into the reduction, so HBM sees each quantized
        byte once instead of a dequantized copy written and read back (`device_matrix` + a matmul).
        form: "inline" (one reduction over the whole row, each weight dequantized as it is read),
        "grouped" (sums over each group of 32 first, scaled per group in a second reduction) or, for
        int4, "split" (grouped, with the low and high nibbles' groups summed apart: no interleaving)."""
        m = self.matrices[matrix]
        a = functools.partial(self._device_array, buf, matrix)
        R, C, G = m.rows, m.padded_cols, m.groups
        N = x_NC.shape[0]
        f32 = jnp.float32
        x = jnp.pad(x_NC.astype(f32), ((0, 0), (0, C - x_NC.shape[1])))
        if self.fmt == "int8":
            q = a("q").reshape(1, R, G, GROUP).astype(f32)
            scale = jax.lax.bitcast_convert_type(a("scale"), jnp.float16).astype(f32)[None, :, :, None]
            x = x.reshape(N, 1, G, GROUP)
            if form == "inline":
                return (q * scale * x).sum((2, 3))
            return ((q * x).sum(-1) * scale[..., 0]).sum(-1)
        # int4: byte l of each run of 32 holds group 2j's value l (low nibble) and group 2j+1's (high).
        J = C // 64
        p = a("q").reshape(1, R, J, 1, GROUP)
        q = jnp.concatenate([p & 15, p >> 4], axis=3).astype(f32)  # [1, R, J, 2, 32]
        step = (jnp.repeat(a("d"), 8, axis=1) * a("sc").astype(f32)).reshape(1, R, J, 2)
        offset = (jnp.repeat(a("dmin"), 8, axis=1) * a("mn").astype(f32)).reshape(1, R, J, 2)
        x = x.reshape(N, 1, J, 2, GROUP)
        if form == "inline":
            return ((q * step[..., None] - offset[..., None]) * x).sum((2, 3, 4))
        xsum = x.sum(-1)  # [N, 1, J, 2]
        if form == "split":
            lo, hi = (p[..., 0, :] & 15).astype(f32), (p[..., 0, :] >> 4).astype(f32)  # [1, R, J, 32]
            t = jnp.stack([(lo * x[..., 0, :]).sum(-1), (hi * x[..., 1, :]).sum(-1)], axis=-1)  # [N, R, J, 2]
            return (t * step - offset * xsum).sum((2, 3))
        return ((q * x).sum(-1) * step - offset * xsum).sum((2, 3))


def _bytes(a):
    """An array's bytes, flat uint8 (numpy: a view; jax: a bitcast)."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a).view(np.uint8).ravel()
    return jax.lax.bitcast_convert_type(a, jnp.uint8).ravel()


__all__ = ["ALIGN", "GROUP", "PackedLayout"]
