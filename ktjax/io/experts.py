"""Routed experts read from a checkpoint one at a time, into the expert format the model keeps them
in (`ktjax.experts.weights`): as stored (bf16, FP8, or the int8/int4 arrays of a `ktjax quantize`
checkpoint), or quantized while loading (int8, int4, or FP8 blocks from float weights). One expert's
matrices are in host memory at a time.

The stored values become float32 in a compiled program on the default device, fed the stored bytes
(FP8 values and their scales, or bf16): on a GPU the link carries 1-2 bytes per value, and the GPU
dequantizes and quantizes in milliseconds. Dequantizing an FP8 matrix of 2048 x 7168 in numpy took
90-200 ms on the dev box (ml_dtypes' float8 conversion; XLA:CPU 25-32 ms), three per expert: about an
hour for DeepSeek-R1's 14,848 experts, where a load should be limited by the disk. Without a GPU the
int8/int4 quantizer runs on the host (`ktjax.experts.quant_host`: numpy's arrays bit for bit, which
XLA:CPU's quantizer is not at rare near-ties).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ktjax.config import ModelConfig
from ktjax.experts.weights import FLOAT_FORMATS, ExpertFormat, ExpertWeights, float_expert, fp8_expert, packed_expert
from ktjax.experts.quant import dequantize
from ktjax.io.checkpoint import FP8_DTYPE, Checkpoint, LeafSource, dequantize_fp8, quantized_names, read_quantized

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Tensor = tuple[str, str | None]  # (name, FP8 scale name or None)


def expert_tensors(cfg: ModelConfig, sources: dict[tuple[str, ...], LeafSource]) -> dict[tuple[int, int], list[Tensor]]:
    """(layer, expert) -> its gate, up and down tensors, from the checked sources of the stacked expert leaves."""
    moe = cfg.layer_groups["moe"]
    out: dict[tuple[int, int], list[Tensor]] = {}
    for proj in PROJECTIONS:
        for name, (j, e), scale in sources[("moe_layers", "mlp", "experts", proj)].tensors:
            out.setdefault((moe[j], e), []).append((name, scale))
    return out


def stored_fp8(ckpt: Checkpoint, cfg: ModelConfig) -> bool:
    """Every routed expert matrix of the checkpoint is FP8 (headers only)."""
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}.weight"
             for i in cfg.moe_layers for e in range(cfg.n_routed_experts) for p in PROJECTIONS]
    return bool(names) and all(n in ckpt and ckpt.info(n).dtype == FP8_DTYPE for n in names)


def fp8_blocks(w_RC, block: int):
    """float -> (float8_e4m3fn values, float32 per-block scales), as DeepSeek's FP8 checkpoints store
    weights (the inverse of `dequantize_fp8`)."""
    xp = np if isinstance(w_RC, np.ndarray) else jnp
    R, C = w_RC.shape
    rb, cb = -(-R // block), -(-C // block)
    padded = xp.pad(w_RC.astype(xp.float32), ((0, rb * block - R), (0, cb * block - C)))
    blocks = padded.reshape(rb, block, cb, block)
    scale = xp.abs(blocks).max(axis=(1, 3)) / 448.0
    scale = xp.where(scale > 0, scale, 1.0).astype(xp.float32)
    q = (blocks / scale[:, None, :, None]).reshape(rb * block, cb * block)[:R, :C]
    return q.astype(ml_dtypes.float8_e4m3fn if xp is np else jnp.float8_e4m3fn), scale


@functools.cache
def _values(block: tuple[int, int], fp8: bool):
    """float32 values of one expert's gate, up and down matrices (FP8 with their scales when `fp8`,
    else any float dtype), computed on the default device."""
    def values(mats, scales):
        return [dequantize_fp8(m, s, block, jnp.float32) if fp8 else m.astype(jnp.float32)
                for m, s in zip(mats, scales)]
    return jax.jit(values)


@functools.cache
def _device_pack(fmt: ExpertFormat):
    return jax.jit(fmt.packed.pack)


def on_gpu() -> bool:
    """Whether the default device, which converts experts, is a GPU."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def _convert(fmt: ExpertFormat, w: list) -> ExpertWeights:
    """An expert in `fmt` from its float32 values [gate, up, down] (numpy, or arrays on the default device)."""
    if fmt.name in FLOAT_FORMATS:
        return float_expert(*w, fmt)
    if fmt.name == "fp8":
        (g, gs), (u, us), (d, ds) = (fp8_blocks(np.asarray(m), fmt.block) for m in w)
        return fp8_expert(g, u, d, gs, us, ds, fmt)
    if on_gpu():
        return packed_expert(_device_pack(fmt)(*w), fmt)
    return packed_expert(fmt.packed.pack(*(np.asarray(m) for m in w)), fmt)


def stored_names(mats: list[Tensor], stored: str | None = None) -> list[str]:
    """The names of one expert's tensors in the files (scales included)."""
    if stored is not None:
        return [n for name, _ in mats for n in quantized_names(name, stored).values()]
    return [n for name, scale in mats for n in (name, scale) if n]


def stored_nbytes(ckpt: Checkpoint, mats: list[Tensor], stored: str | None = None) -> int:
    """Bytes of one expert's tensors in the files (scales included)."""
    return sum(ckpt.info(n).nbytes for n in stored_names(mats, stored))


def read_expert(ckpt: Checkpoint, mats: list[Tensor], fmt: ExpertFormat, block: tuple[int, int],
                stored: str | None = None) -> ExpertWeights:
    """One expert in `fmt`: host numpy arrays where it is kept as stored, else arrays on the default
    device, which converted it.
    block: the checkpoint's FP8 scale block; stored: the integer format the checkpoint stores the
    experts in (`ktjax quantize`), or None for float/FP8 weights."""
    if hasattr(ckpt, "read_expert"):  # a GGUF model: quantized blocks the format holds are copied, not requantized
        exact = ckpt.read_expert(mats, fmt)
        if exact is not None:
            return exact
    if stored is not None:
        gate, up, down = (read_quantized(ckpt, name, stored) for name, _ in mats)
        if fmt.name == stored:  # the stored arrays are the buffer's: placed, never quantized again
            gate_up = {a: np.concatenate([gate[a], up[a]]) for a in gate}  # per-row arrays stack as rows
            return packed_expert(fmt.packed.place({"gate_up": gate_up, "down": down}), fmt)
        # Another format: from the dequantized values (an int8 <-> int4 conversion compounds both errors).
        return _convert(fmt, [dequantize(gate, stored, fmt.D), dequantize(up, stored, fmt.D),
                              dequantize(down, stored, fmt.F)])
    raw = [ckpt.read(name) for name, _ in mats]
    scales = [None if scale is None else ckpt.read(scale) for _, scale in mats]
    if fmt.name == "fp8" and all(s is not None for s in scales):  # as stored
        return fp8_expert(*raw, *scales, fmt)
    if fmt.name in FLOAT_FORMATS and all(s is None and m.dtype == FLOAT_FORMATS[fmt.name] for m, s in zip(raw, scales)):
        return float_expert(*raw, fmt)  # as stored: stacked on the host, nothing to convert
    if all(s is not None for s in scales) or all(s is None for s in scales):  # the stored bytes cross, not float32
        return _convert(fmt, _values(tuple(block), scales[0] is not None)(raw, scales))
    # Some matrices FP8, some not: each dequantised with its own scales.
    return _convert(fmt, [np.asarray(m, np.float32) if s is None else dequantize_fp8(m, s, block, np.float32)
                          for m, s in zip(raw, scales)])
