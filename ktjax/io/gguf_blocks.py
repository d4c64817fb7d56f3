"""GGUF's quantized blocks into ktjax's int8/int4 expert formats (`ktjax.experts.quant`), bit for bit
where the format holds them: Q8_0, Q4_0, Q5_0 and Q3_K into int8, Q4_K into int4. Other types are
dequantized with `gguf.quants.dequantize` and quantized again (`expert_buffer`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as GGML

from ktjax.experts.quant import QuantMatrix
from ktjax.experts.weights import ExpertFormat

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
    """`ktjax.experts.quant.quantize` compiled (on a GPU a full-size matrix takes milliseconds, in numpy a second)."""
    import jax

    from ktjax.experts.quant import quantize

    return jax.jit(lambda w: quantize(w, fmt))


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
    if type_name in ("Q8_0", "Q4_0", "Q5_0"):  # an f16 d per 32 values, then the values: w = d * q
        out["scale"].reshape(R, nb)[...] = _f16_bits(b[..., :2])
        q = out["q"].reshape(R, nb, 2, 16)
        if type_name == "Q8_0":
            q[...] = b[..., 2:].view(np.int8).reshape(R, nb, 2, 16)
            return
        qs = b[..., -16:]  # low nibbles are values 0-15, high nibbles 16-31
        high = 0 if type_name == "Q4_0" else np.unpackbits(b[..., 2:6], axis=-1, bitorder="little").reshape(R, nb, 2, 16) << 4
        offset = 8 if type_name == "Q4_0" else 16
        q[...] = ((np.stack([qs & 15, qs >> 4], axis=2) | high).astype(np.int16) - offset).astype(np.int8)
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
    if type_name == "Q3_K":
        _q3_k_int8(out, b)
        return
    raise ValueError(f"GGML type {type_name} has no exact integer expert format")


def _q3_k_int8(out: dict[str, np.ndarray], b: np.ndarray) -> None:
    """Q3_K: per 256 values an f16 d, per 16 a 6-bit signed scale s, 3-bit q in [-4, 3]: w = d * s * q.
    As int8, per group of 32: scale d and q' = s * q in [-124, 128]; a group reaching 128 stores
    -d and -q' instead (in [-128, 124]). Every product is exact in float32, so the values match."""
    R, nb = b.shape[:2]
    hmask, qs, scales, d = b[..., :32], b[..., 32:96], b[..., 96:108], b[..., 108:110]
    low = (scales[..., None, :8] >> np.array([[0], [4]], np.uint8)).reshape(R, nb, 16) & 15
    high = (scales[..., 8:, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 1, 3, 2).reshape(R, nb, 16) & 3
    s_raw = low | (high << 4)  # s + 32, in 0..63, per 16 values
    ql = (qs.reshape(R, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    qh = (hmask.reshape(R, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q_raw = ql.reshape(R, nb, 16, 16) | (qh.reshape(R, nb, 16, 16) << 2)  # q + 4, in 0..7
    # s * q through a table of all 64 x 8 products; only s = -32 with q = -4 reaches 128.
    q8 = _Q3_PRODUCTS[(s_raw[..., None].astype(np.uint16) << 3) | q_raw].reshape(R, nb, 8, 32)
    flip = ((s_raw == 0)[..., None] & (q_raw == 0)).reshape(R, nb, 8, 32).any(-1)  # [R, nb, 8]
    out["q"].reshape(R, nb, 8, 32)[...] = np.where(flip[..., None], -q8, q8)
    d_bits = np.repeat(_f16_bits(d)[..., None], 8, axis=-1)
    out["scale"].reshape(R, nb, 8)[...] = np.where(flip, d_bits ^ np.uint16(0x8000), d_bits)


_Q3_PRODUCTS = ((np.arange(64)[:, None] - 32) * (np.arange(8)[None, :] - 4)).astype(np.int16).ravel()


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
            values = np.asarray(gguf.quants.dequantize(raw, GGML[type_name]), np.float32)
            for k, v in _quantizer(fmt.name)(values).items():
                out[k][...] = np.asarray(v)
    return buf
