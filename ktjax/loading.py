"""`ktjax.load`: a checkpoint directory in, a ready model out.

Loading is two passes. `plan_leaves` maps every parameter leaf to its checkpoint tensors and checks
them from the safetensors headers alone, so bad input fails before any data is read and no
half-loaded model exists. Then `read_leaf` fills each leaf on its target (a device or host memory
sharding), one memory-mapped tensor at a time, converting or dequantising on the target: host memory
during a load stays near the loaded parameters plus a few tensors in flight. A placement plan can
choose per leaf where it goes and whether FP8 stays FP8.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from ktjax.checkpoint import CheckpointError  # noqa: F401  (re-exported: what load raises on bad input)
from ktjax.checkpoint import Checkpoint, Fp8Array, LeafSource, check_unexpected, dequantize_fp8, fp8_scale_shape, leaf_source
from ktjax.config import ModelConfig
from ktjax.models import DeepseekForCausalLM, group_layers

DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    """A loaded model: config, the module's structure (graphdef) and its parameters as a pytree."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    path: str | None = None

    @property
    def module(self) -> DeepseekForCausalLM:
        return nnx.merge(self.graphdef, self.params)

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["embed_tokens"][...].dtype


def resolve_dtype(dtype: Any, cfg: ModelConfig) -> jnp.dtype:
    if dtype is None:
        dtype = cfg.torch_dtype if cfg.torch_dtype in DTYPE_NAMES else "bfloat16" if cfg.fp8_block_size else "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not supported (use 'float32' or 'bfloat16')")
        return jnp.dtype(DTYPE_NAMES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype {dtype} is not supported (use 'float32' or 'bfloat16')")
    return dtype


def abstract_model(cfg: ModelConfig, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Structure and shapes of the model's parameters, without allocating them."""
    return nnx.split(nnx.eval_shape(lambda: DeepseekForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))))


# Bytes dispatched to the target before waiting for them: asynchronous dispatch would otherwise
# let the reader run ahead and hold many tensors in host memory at once.
_IN_FLIGHT_BYTES = 64 << 20


def plan_leaves(ckpt: Checkpoint, cfg: ModelConfig, abstract: nnx.State) -> list[tuple[tuple[str, ...], LeafSource]]:
    """Every leaf's checked source, in flat-state order; raises `CheckpointError` on any bad or unexpected tensor."""
    layers = group_layers(cfg)
    plan = [(leaf_path, leaf_source(ckpt, cfg, leaf_path, var.shape, var.dtype, layers))
            for leaf_path, var in nnx.to_flat_state(abstract)]
    check_unexpected(ckpt, cfg, (name for _, src in plan for name in src.names))
    return plan


@functools.cache
def _zeros_fn(shape: tuple[int, ...], dtype: jnp.dtype, sharding: jax.sharding.Sharding) -> Callable[[], jax.Array]:
    # Allocated by a program whose output lives on the target, so nothing is staged elsewhere first.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _set_piece(leaf, index, piece, scale, *, block):
    value = piece.astype(leaf.dtype) if scale is None else dequantize_fp8(piece, scale, block, leaf.dtype)
    value = value.reshape((1,) * len(index) + value.shape)
    return jax.lax.dynamic_update_slice(leaf, value, tuple(index) + (0,) * piece.ndim)


@functools.cache
def _set_piece_fn(sharding: jax.sharding.Sharding, block: tuple[int, int]) -> Callable:
    # The leaf is donated, so each tensor is written in place: one copy of the leaf exists at any time.
    # Conversion and dequantisation run on the target (half the bytes cross the bus for FP8).
    return jax.jit(functools.partial(_set_piece, block=block), donate_argnums=0, out_shardings=sharding)


def read_leaf(ckpt: Checkpoint, source: LeafSource, *, keep_fp8: bool = False,
              sharding: jax.sharding.Sharding | None = None,
              on_tensor: Callable[[int], None] | None = None) -> jax.Array | Fp8Array:
    """One parameter leaf, read tensor by tensor into its final array on `sharding` (default: the first device).

    keep_fp8: a leaf stored in FP8 stays FP8, as an `Fp8Array` (values and float32 scales stacked
    like the leaf); other leaves are converted to `source.dtype` as usual.
    on_tensor(stored_bytes) is called after each tensor is dispatched (progress).
    """
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    set_piece = _set_piece_fn(sharding, source.block)
    if keep_fp8 and source.fp8:
        weight = _zeros_fn(source.shape, jnp.dtype(jnp.float8_e4m3fn), sharding)()
        scale = _zeros_fn(fp8_scale_shape(source.shape, source.block), jnp.dtype(jnp.float32), sharding)()
    else:
        leaf = _zeros_fn(source.shape, source.dtype, sharding)()
    pending = 0
    for name, index, scale_name in source.tensors:
        w = ckpt.read(name)
        s = None if scale_name is None else ckpt.read(scale_name)
        nbytes = w.nbytes + (0 if s is None else s.nbytes)
        if keep_fp8 and source.fp8:
            weight = set_piece(weight, index, w, None)
            scale = set_piece(scale, index, s, None)
            last = scale
        else:
            leaf = set_piece(leaf, index, w, s)
            last = leaf
        del w, s  # unmaps the tensor once its transfer is done
        pending += nbytes
        if pending >= _IN_FLIGHT_BYTES:
            last.block_until_ready()
            pending = 0
        if on_tensor is not None:
            on_tensor(nbytes)
    if keep_fp8 and source.fp8:
        return Fp8Array(weight.block_until_ready(), scale.block_until_ready(), source.block)
    return leaf.block_until_ready()


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def load(path: str | os.PathLike, *, dtype: Any = None, progress: bool | None = None) -> Model:
    """Load a transformers-format DeepSeek checkpoint directory (one file or shards; BF16/F16/F32/FP8).

    dtype: "float32" or "bfloat16" (default: config.json's torch_dtype; FP8 checkpoints bfloat16).
    progress: show a progress bar on stderr (default: when stderr is a terminal).
    Raises `ConfigError`/`CheckpointError` (one line naming the file and tensor) before reading any data.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_json(path)
    dtype = resolve_dtype(dtype, cfg)
    graphdef, abstract = abstract_model(cfg, dtype)
    ckpt = Checkpoint(path)
    plan = plan_leaves(ckpt, cfg, abstract)
    variables = dict(nnx.to_flat_state(abstract))
    total = sum(src.stored_nbytes for _, src in plan)
    count = sum(len(src.tensors) for _, src in plan)
    flat = []
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"loading {os.path.basename(path)}",
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
              disable=not _show_progress(progress), dynamic_ncols=True, file=sys.stderr) as bar:
        done = 0

        def on_tensor(nbytes: int) -> None:
            nonlocal done
            done += 1
            bar.set_postfix_str(f"{done}/{count} tensors", refresh=False)
            bar.update(nbytes)

        for leaf_path, src in plan:
            flat.append((leaf_path, variables[leaf_path].replace(read_leaf(ckpt, src, on_tensor=on_tensor))))
    return Model(cfg, graphdef, nnx.from_flat_state(flat), path)
