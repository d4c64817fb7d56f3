"""Reading a checkpoint's parameters onto their targets.

Loading is two passes. `plan_leaves` maps every parameter leaf to its checkpoint tensors and checks
them from the safetensors headers alone, so bad input fails before any data is read and no
half-loaded model exists. Then `read_leaf` fills each leaf on its target (a device or host memory
sharding), one memory-mapped tensor at a time, converting or dequantising on the target: host memory
during a load stays near the loaded parameters plus a few tensors in flight. Routed experts held
apart from the model are read one expert at a time by `ktjax.io.experts`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from ktjax.config import ModelConfig
from ktjax.experts.quant import dequantize
from ktjax.io.checkpoint import Checkpoint, LeafSource, check_unexpected, dequantize_fp8, leaf_source, read_quantized
from ktjax.io.gguf import GGUFCheckpoint, is_gguf, open_gguf
from ktjax.models import DeepseekForCausalLM

LeafPath = tuple[str, ...]


def open_checkpoint(path: str) -> Checkpoint | GGUFCheckpoint:
    """A safetensors checkpoint directory, or a GGUF model (a .gguf file, a split set, a directory of them)."""
    return open_gguf(path) if is_gguf(path) else Checkpoint(path)


def model_config(path: str) -> ModelConfig:
    """config.json's, or the GGUF metadata's."""
    return open_gguf(path).config if is_gguf(path) else ModelConfig.from_json(path)


def abstract_params(cfg: ModelConfig, dtype, *, attention: str = "auto", dispatch: str = "auto",
                    expert_mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Structure and shapes of the model's parameters, without allocating them (expert_mesh: the
    mesh the routed experts are split over, part of the structure)."""
    return nnx.split(nnx.eval_shape(lambda: DeepseekForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), attention=attention,
                                                                 dispatch=dispatch, expert_mesh=expert_mesh)))


def is_routed_expert(path: LeafPath) -> bool:
    return path[1:3] == ("mlp", "experts")


def plan_leaves(ckpt: Checkpoint, cfg: ModelConfig, abstract: nnx.State
                ) -> tuple[list[tuple[LeafPath, LeafSource]], list[str]]:
    """Every leaf's checked source, in flat-state order, and every tensor name they consume; raises
    `CheckpointError` on a missing or bad tensor."""
    plan, consumed = [], []
    for leaf_path, var in nnx.to_flat_state(abstract):
        src = leaf_source(ckpt, cfg, leaf_path, var.shape, var.dtype)
        plan.append((leaf_path, src))
        consumed += src.names
    return plan, consumed


# Bytes dispatched to the target before waiting for them: asynchronous dispatch would otherwise
# let the reader run ahead and hold many tensors in host memory at once.
IN_FLIGHT_BYTES = 64 << 20


@functools.cache
def _zeros_fn(shape: tuple[int, ...], dtype: jnp.dtype, sharding: jax.sharding.Sharding) -> Callable[[], jax.Array]:
    # Allocated by a program whose output lives on the target, so nothing is staged elsewhere first.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _set_piece(leaf, index, piece, scale, *, block):
    value = piece.astype(leaf.dtype) if scale is None else dequantize_fp8(piece, scale, block, leaf.dtype)
    value = value.reshape((1,) * len(index) + value.shape)
    return jax.lax.dynamic_update_slice(leaf, value, tuple(index) + (0,) * piece.ndim)


def _set_blocks(leaf, index, arrays, *, fmt, cols):
    return _set_piece(leaf, index, dequantize(arrays, fmt, cols), None, block=None)


@functools.cache
def _set_blocks_fn(sharding: jax.sharding.Sharding, fmt: str, cols: int) -> Callable:
    return jax.jit(functools.partial(_set_blocks, fmt=fmt, cols=cols), donate_argnums=0, out_shardings=sharding)


@functools.cache
def _set_piece_fn(sharding: jax.sharding.Sharding, block: tuple[int, int]) -> Callable:
    # The leaf is donated, so each tensor is written in place: one copy of the leaf exists at any time.
    # Conversion and dequantisation run on the target (half the bytes cross the bus for FP8).
    return jax.jit(functools.partial(_set_piece, block=block), donate_argnums=0, out_shardings=sharding)


def read_leaf(ckpt: Checkpoint, source: LeafSource, *, sharding: jax.sharding.Sharding | None = None,
              on_tensor: Callable[[int], None] | None = None) -> jax.Array:
    """One parameter leaf, read tensor by tensor into its final array on `sharding` (default: this
    process's first device), FP8 tensors dequantised with their own block scales, int8/int4 ones with theirs.
    on_tensor(stored_bytes) is called after each tensor is dispatched (progress)."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own (several hosts)
    set_piece = _set_piece_fn(sharding, source.block)
    leaf = _zeros_fn(source.shape, source.dtype, sharding)()
    pending = 0
    for name, index, scale_name in source.tensors:
        blocks = ckpt.read_blocks(name) if source.quant is None and scale_name is None else None
        if blocks is not None:  # GGUF's integer blocks: their bytes cross, the target dequantizes
            fmt, arrays = blocks
            leaf = _set_blocks_fn(sharding, fmt, source.shape[-1])(leaf, index, arrays)
            nbytes = sum(a.nbytes for a in arrays.values())
            del arrays, blocks
        else:
            if source.quant is not None:  # int8/int4 experts read as floats: dequantized on the host (numpy)
                arrays = read_quantized(ckpt, name, source.quant)
                w, s = dequantize(arrays, source.quant, source.shape[-1]), None
                nbytes = sum(a.nbytes for a in arrays.values())
            else:
                w = ckpt.read(name)
                s = None if scale_name is None else ckpt.read(scale_name)
                nbytes = w.nbytes + (0 if s is None else s.nbytes)
            leaf = set_piece(leaf, index, w, s)
            del w, s  # unmaps the tensor once its transfer is done
        pending += nbytes
        if pending >= IN_FLIGHT_BYTES:
            leaf.block_until_ready()
            pending = 0
        if on_tensor is not None:
            on_tensor(nbytes)
    return leaf.block_until_ready()


def show_progress(progress: bool | None) -> bool:
    """An explicit choice, else: when stderr is a terminal."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(path: str, total_bytes: int, progress: bool | None) -> tqdm:
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                desc=f"loading {os.path.basename(path.rstrip('/'))}",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, "
                           "{rate_fmt}{postfix}]",
                disable=not show_progress(progress), dynamic_ncols=True, file=sys.stderr)


def read_leaves(ckpt: Checkpoint, plan: list[tuple[LeafPath, LeafSource]], abstract: nnx.State, bar: tqdm, *,
                sharding: jax.sharding.Sharding | Callable[[LeafPath], jax.sharding.Sharding] | None = None
                ) -> list[tuple[LeafPath, nnx.Variable]]:
    """The planned leaves read onto their target (one sharding, or one per leaf path), as flat-state
    (path, variable) pairs."""
    variables = dict(nnx.to_flat_state(abstract))
    count = sum(len(src.tensors) for _, src in plan)
    done = 0

    def on_tensor(nbytes: int) -> None:
        nonlocal done
        done += 1
        bar.set_postfix_str(f"{done}/{count} tensors", refresh=False)
        bar.update(nbytes)

    def target(p: LeafPath) -> jax.sharding.Sharding | None:
        return sharding(p) if callable(sharding) else sharding

    return [(p, variables[p].replace(read_leaf(ckpt, src, sharding=target(p), on_tensor=on_tensor)))
            for p, src in plan]


def load_params(path: str, cfg: ModelConfig, dtype, *, progress: bool | None = None, attention: str = "auto",
                expert_mesh: jax.sharding.Mesh | None = None,
                sharding: Callable[[LeafPath], jax.sharding.Sharding] | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Every parameter of a transformers-format DeepSeek checkpoint on the first device, or where
    sharding(leaf path) says (FP8 tensors dequantised to `dtype`); expert_mesh: the mesh the model's
    routed experts are split over. Raises `ConfigError`/`CheckpointError` (one line naming the file
    and tensor) before reading any data."""
    graphdef, abstract = abstract_params(cfg, dtype, attention=attention, expert_mesh=expert_mesh)
    ckpt = open_checkpoint(path)
    plan, consumed = plan_leaves(ckpt, cfg, abstract)
    check_unexpected(ckpt, cfg, consumed)
    with progress_bar(path, sum(src.stored_nbytes for _, src in plan), progress) as bar:
        flat = read_leaves(ckpt, plan, abstract, bar, sharding=sharding)
    return graphdef, nnx.from_flat_state(flat)
