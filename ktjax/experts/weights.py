"""One routed expert of one layer in the form it is stored, moved and computed on the device, for
each expert format:

    bf16 / float32   w [3, F, D] = (gate, up, down^T) in that dtype
    fp8              w float8_e4m3fn [3, F, D] plus float32 block scales [3, F/b, D/b] (DeepSeek's FP8)
    int8 / int4      w uint8 [nbytes]: the packed buffer of `ktjax.experts.packed` (GGUF-compatible)

One expert is one contiguous transfer (two for FP8). The device reads the matrices back in the
model's dtype right where its matmuls use them (`gate_up`, `down`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from numba import njit, prange

from ktjax.experts.packed import PackedLayout

FLOAT_FORMATS = {"bf16": jnp.bfloat16, "float32": jnp.float32}
FORMATS = ("bf16", "float32", "fp8", "int8", "int4")


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """How the experts of a model are stored: the format name, sizes, and the FP8 block."""

    name: str
    F: int  # moe_intermediate_size
    D: int  # hidden_size
    block: int = 128  # FP8 scale blocks (square)

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ValueError(f"experts={self.name!r} is not a format ktjax knows (use one of {', '.join(FORMATS)})")

    @functools.cached_property
    def packed(self) -> PackedLayout | None:
        # Cached: its section table is read on every decode step's accounting (~0.1 ms per build).
        return PackedLayout(self.name, self.F, self.D) if self.name in ("int8", "int4") else None

    @property
    def quantized(self) -> bool:
        """Stored in fewer bits than the model computes in (dequantized after each transfer)."""
        return self.name not in FLOAT_FORMATS

    @property
    def host_computable(self) -> bool:
        """The host-CPU kernels read this format (`ktjax.experts.host`)."""
        return self.packed is not None

    @property
    def nbytes(self) -> int:
        """Bytes of one expert as stored (what crosses the link per expert)."""
        F, D = self.F, self.D
        if self.name in FLOAT_FORMATS:
            return 3 * F * D * np.dtype(FLOAT_FORMATS[self.name]).itemsize
        if self.name == "fp8":
            return 3 * F * D + 3 * 4 * -(-F // self.block) * -(-D // self.block)
        return self.packed.nbytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One expert's arrays (see the module docstring) and its format (static)."""

    w: jax.Array
    scale: jax.Array | None
    fmt: ExpertFormat = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def _fp8_matrices(self, k: slice, dtype) -> jax.Array:
        """FP8 matrices k as [n, F, D] in dtype, dequantised with their block scales (measured on
        the H200: XLA still writes them out before the matmul, benchmarks/experts.md)."""
        w, scale, b = self.w[k], self.scale[k], self.fmt.block
        n, F, D = w.shape
        if F % b == 0 and D % b == 0:  # broadcast over blocks: no scale tensor the size of the weights
            w = w.reshape(n, F // b, b, D // b, b).astype(jnp.float32)
            return (w * scale[:, :, None, :, None]).astype(dtype).reshape(n, F, D)
        s = jnp.repeat(jnp.repeat(scale, b, axis=1)[:, :F], b, axis=2)[:, :, :D]
        return (w.astype(jnp.float32) * s).astype(dtype)

    def gate_up(self, dtype) -> jax.Array:
        """[2F, D]: gate and up stacked, for one matmul."""
        F, D = self.fmt.F, self.fmt.D
        if self.fmt.packed is not None:
            return self.fmt.packed.device_matrix(self.w, "gate_up", dtype)
        if self.fmt.name == "fp8":
            return self._fp8_matrices(slice(0, 2), dtype).reshape(2 * F, D)
        return self.w[:2].reshape(2 * F, D).astype(dtype)

    def gate_and_up(self, dtype) -> tuple[jax.Array, jax.Array]:
        """gate and up [F, D] each dequantised alone (FP8: measured faster than one [2F, D] matrix)."""
        if self.fmt.name == "fp8":
            return self._fp8_matrices(slice(0, 1), dtype)[0], self._fp8_matrices(slice(1, 2), dtype)[0]
        gu = self.gate_up(dtype)
        return gu[:self.fmt.F], gu[self.fmt.F:]

    def down(self, dtype) -> jax.Array:
        """[D, F]."""
        if self.fmt.packed is not None:
            return self.fmt.packed.device_matrix(self.w, "down", dtype)
        if self.fmt.name == "fp8":
            return self._fp8_matrices(slice(2, 3), dtype)[0].T
        return self.w[2].T.astype(dtype)


@njit(parallel=True, cache=True)
def _transpose_into(src_RC, dst_CR):
    """dst = src.T in tiles of 64 x 64, rows of tiles in parallel."""
    R, C = src_RC.shape
    for i in prange((R + 63) // 64):
        for c0 in range(0, C, 64):
            for r in range(64 * i, min(R, 64 * i + 64)):
                for c in range(c0, min(C, c0 + 64)):
                    dst_CR[c, r] = src_RC[r, c]


def _stacked(gate_FD: np.ndarray, up_FD: np.ndarray, down_DF: np.ndarray) -> np.ndarray:
    """np.stack([gate, up, down.T]) for host arrays. numpy copied a transposed 7168 x 2048 FP8 matrix at
    ~0.2 GB/s (72 of an expert's 75 ms on the dev box, ~18 minutes of an R1 load); 1- and 2-byte values
    are transposed here as unsigned integers of their size (4-byte ones too)."""
    out = np.empty((3, *gate_FD.shape), np.result_type(gate_FD, up_FD, down_DF))
    out[0], out[1] = gate_FD, up_FD
    down = np.ascontiguousarray(down_DF).astype(out.dtype, copy=False)
    if out.dtype.itemsize in (1, 2, 4):
        bits = f"u{out.dtype.itemsize}"
        _transpose_into(down.view(bits), out[2].view(bits))
    else:
        out[2] = down.T
    return out


def float_expert(gate_FD, up_FD, down_DF, fmt: ExpertFormat) -> ExpertWeights:
    """A float expert from its three matrices (numpy or jax), in the format's dtype."""
    dtype = FLOAT_FORMATS[fmt.name]
    if isinstance(gate_FD, np.ndarray):
        return ExpertWeights(_stacked(gate_FD, up_FD, down_DF).astype(dtype, copy=False), None, fmt)
    return ExpertWeights(jnp.stack([gate_FD, up_FD, down_DF.T]).astype(dtype), None, fmt)


def fp8_expert(gate_FD, up_FD, down_DF, gate_scale, up_scale, down_scale, fmt: ExpertFormat) -> ExpertWeights:
    """An FP8 expert as DeepSeek's checkpoints store it (values and `weight_scale_inv` blocks)."""
    if isinstance(gate_FD, np.ndarray):
        return ExpertWeights(_stacked(gate_FD, up_FD, down_DF),
                             np.stack([gate_scale, up_scale, down_scale.T]).astype(np.float32), fmt)
    return ExpertWeights(jnp.stack([gate_FD, up_FD, down_DF.T]),
                         jnp.stack([gate_scale, up_scale, down_scale.T]).astype(jnp.float32), fmt)


def packed_expert(buf, fmt: ExpertFormat) -> ExpertWeights:
    return ExpertWeights(buf, None, fmt)
