"""GGUF's quantized blocks into ktjax's int8/int4 expert formats (`ktjax.experts.quant`), bit for bit
where the format holds them: Q8_0, Q4_0, Q5_0 and Q3_K into int8, Q4_K into int4. Other types are
decoded (`ktjax.io.gguf_decode`, or gguf's own decoder where it has no kernel) and quantized again
(`expert_buffer`).

Q8_0 and Q4_K are byte copies (numpy); Q4_0, Q5_0 and Q3_K unpack their bits in parallel numba loops
(in numpy they ran at 0.14-0.65 G values/s on the dev box: `scripts/bench_gguf_decode.py`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as GGML
from numba import njit, prange

from ktjax.experts.quant import QuantMatrix
from ktjax.experts.weights import ExpertFormat
from ktjax.io import gguf_decode

# Expert blocks an expert format holds bit for bit (see `write_blocks`).
EXACT = {"Q8_0": "int8", "Q4_0": "int8", "Q5_0": "int8", "Q3_K": "int8", "Q4_K": "int4"}
FLOAT_TYPES = ("F32", "F16", "BF16")


def exact_format(type_name: str, dtype) -> str | None:
    """The expert format that holds tensors of this GGML type exactly (floats: the model dtype's)."""
    if type_name in FLOAT_TYPES:
        return "bf16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else "float32"
    return EXACT.get(type_name)


@functools.cache
def _quantizer(fmt: str) -> Callable:
    """`ktjax.experts.quant.quantize`: compiled for the GPU where there is one (a full-size matrix in
    milliseconds), else the host's parallel loops (`quant_host`, numpy's arrays bit for bit)."""
    import jax

    from ktjax.experts import quant_host
    from ktjax.experts.quant import quantize
    from ktjax.io.experts import on_gpu

    if on_gpu():
        return jax.jit(lambda w: quantize(w, fmt))
    return lambda w: quant_host.quantize(w, fmt)


def _blocks(raw_RB: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 [R, nblocks, bytes per block] of a quantized [R, ...] tensor's rows (a view of the file)."""
    _, type_size = gguf.GGML_QUANT_SIZES[GGML[type_name]]
    return raw_RB.reshape(raw_RB.shape[0], -1, type_size)


def _f16_bits(b: np.ndarray) -> np.ndarray:
    """uint16 [..., nb] from the two little-endian bytes in b's last axis."""
    return b.view(np.uint16)[..., 0]


def write_blocks(out: dict[str, np.ndarray], raw_RB: np.ndarray, type_name: str) -> None:
    """Fill the arrays of an int8/int4 `ktjax.experts.quant.QuantMatrix` (`out`, e.g. views of an
    expert's buffer) from a GGUF tensor's rows, holding the same values: w = scale * q for int8;
    Q4_K's fields as they are for int4. Each byte is copied once, straight from the file's pages."""
    b = _blocks(raw_RB, type_name)
    R, nb = b.shape[:2]
    if type_name == "Q8_0":  # an f16 d per 32 values, then the values: w = d * q
        out["scale"].reshape(R, nb)[...] = _f16_bits(b[..., :2])
        out["q"].reshape(R, nb, 32)[...] = b[..., 2:].view(np.int8)
        return
    if type_name == "Q4_K":  # f16 d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        out["d"][...] = b[..., 0:2].view(np.float16)[..., 0]
        out["dmin"][...] = b[..., 2:4].view(np.float16)[..., 0]
        # The 6-bit scales and mins (gguf.quants.Q4_K.get_scale_min), four bytes at a time.
        w = b[..., 4:16].view(np.uint32)
        sc, mn = out["sc"].reshape(R, nb, 8).view(np.uint32), out["mn"].reshape(R, nb, 8).view(np.uint32)
        sc[..., 0] = w[..., 0] & 0x3F3F3F3F
        sc[..., 1] = (w[..., 2] & 0x0F0F0F0F) | ((w[..., 0] >> 2) & 0x30303030)
        mn[..., 0] = w[..., 1] & 0x3F3F3F3F
        mn[..., 1] = ((w[..., 2] >> 4) & 0x0F0F0F0F) | ((w[..., 1] >> 2) & 0x30303030)
        out["q"].reshape(R, nb, 128)[...] = b[..., 16:]  # Q4_K's qs is the int4 format's nibble order
        return
    unpack = {"Q4_0": _q4_0_int8, "Q5_0": _q5_0_int8, "Q3_K": _q3_k_int8}.get(type_name)
    if unpack is None:
        raise ValueError(f"GGML type {type_name} has no exact integer expert format")
    blocks = np.ascontiguousarray(b).reshape(R * nb, -1)
    unpack(blocks, out["q"].reshape(R * nb, -1), out["scale"].reshape(R * nb, -1))


@njit(parallel=True, cache=True)
def _q4_0_int8(blocks, q, scale):
    """Q4_0 (f16 d, 16 bytes of nibbles: values 0-15 low, 16-31 high, w = d * (q - 8)) as int8 q and d's bits."""
    for n in prange(blocks.shape[0]):
        b = blocks[n]
        scale[n, 0] = gguf_decode.u16(b, 0)
        for i in range(16):
            x = np.int32(b[2 + i])
            q[n, i] = (x & 15) - 8
            q[n, i + 16] = (x >> 4) - 8


@njit(parallel=True, cache=True)
def _q5_0_int8(blocks, q, scale):
    """Q5_0 (f16 d, 32 fifth bits, 16 bytes of nibbles, w = d * (q - 16)) as int8 q and d's bits."""
    for n in prange(blocks.shape[0]):
        b = blocks[n]
        scale[n, 0] = gguf_decode.u16(b, 0)
        qh = gguf_decode.u32(b, 2)
        for i in range(16):
            x = np.int32(b[6 + i])
            q[n, i] = ((x & 15) | np.int32(((qh >> i) & 1) << 4)) - 16
            q[n, i + 16] = ((x >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)) - 16


@njit(parallel=True, cache=True)
def _q3_k_int8(blocks, q, scale):
    """Q3_K: per 256 values an f16 d, per 16 a 6-bit signed scale s, 3-bit q in [-4, 3]: w = d * s * q.
    As int8, per group of 32: scale d and q' = s * q in [-124, 128]; a group reaching 128 stores
    -d and -q' instead (in [-128, 124]). Every product is exact in float32, so the values match.
    Value h*128 + j*32 + lane (group g = 4h + j): low bits 2j of byte 32 + h*32 + lane, high bit g
    of byte lane (clear: minus 4); sub-block scales as `gguf_decode`'s Q3_K."""
    for n in prange(blocks.shape[0]):
        b = blocks[n]
        d_bits = gguf_decode.u16(b, 108)
        for g in range(8):
            h, j = g // 4, g % 4
            sc0, sc1 = gguf_decode.q3_k_scale(b, 2 * g), gguf_decode.q3_k_scale(b, 2 * g + 1)
            flip = False  # a first pass finds a product of 128 (only s = -32 with q = -4)
            for lane in range(32):
                low = np.int32((b[32 + h * 32 + lane] >> (2 * j)) & 3)
                high = np.int32((b[lane] >> g) & 1)
                flip |= (sc0 if lane < 16 else sc1) * (low - ((high ^ 1) << 2)) == 128
            sign = -1 if flip else 1
            for lane in range(32):
                low = np.int32((b[32 + h * 32 + lane] >> (2 * j)) & 3)
                high = np.int32((b[lane] >> g) & 1)
                q[n, g * 32 + lane] = sign * (sc0 if lane < 16 else sc1) * (low - ((high ^ 1) << 2))
            scale[n, g] = d_bits ^ np.uint16(0x8000) if flip else d_bits


def expert_arrays(raw_RB: np.ndarray, type_name: str, cols: int) -> dict[str, np.ndarray]:
    """The arrays of `ktjax.experts.quant.QuantMatrix` for a GGUF tensor's rows (`write_blocks`)."""
    m = QuantMatrix(EXACT[type_name], raw_RB.shape[0], cols)
    out = {name: np.empty(shape, dtype) for name, (dtype, shape) in m.arrays().items()}
    write_blocks(out, raw_RB, type_name)
    return out


def expert_buffer(fmt: ExpertFormat, mats: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """One int8/int4 expert's buffer (`ktjax.experts.packed.PackedLayout`) from its gate, up and down
    GGUF rows (raw, GGML type name): blocks the format holds exactly are copied into it, others are
    dequantized and requantized."""
    layout = fmt.packed
    buf = np.zeros(layout.nbytes, np.uint8)
    gate_up, down = layout.arrays(buf, "gate_up"), layout.arrays(buf, "down")
    targets = [{k: v[:fmt.F] for k, v in gate_up.items()}, {k: v[fmt.F:] for k, v in gate_up.items()}, down]
    for (raw, type_name), out in zip(mats, targets):
        if EXACT.get(type_name) == fmt.name:
            write_blocks(out, raw, type_name)
        else:
            values = gguf_decode.dequantize(raw, type_name)
            if values is None:  # no kernel here for this type: gguf's decoder
                values = np.asarray(gguf.quants.dequantize(raw, GGML[type_name]), np.float32)
            for k, v in _quantizer(fmt.name)(values).items():
                out[k][...] = np.asarray(v)
    return buf
