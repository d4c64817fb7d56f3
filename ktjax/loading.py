"""`ktjax.load`: a checkpoint directory in, a ready model out."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ktjax.checkpoint import Checkpoint, CheckpointError, tensor_names
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


def load(path: str | os.PathLike, *, dtype: Any = None) -> Model:
    path = os.fspath(path)
    cfg = ModelConfig.from_json(path)
    dtype = resolve_dtype(dtype, cfg)
    graphdef, abstract = abstract_model(cfg, dtype)
    ckpt = Checkpoint(path)
    layers = group_layers(cfg)
    flat = []
    for leaf_path, var in nnx.to_flat_state(abstract):
        target = np.empty(var.shape, ml_dtypes.bfloat16 if var.dtype == jnp.bfloat16 else var.dtype)
        for name, index in tensor_names(cfg, leaf_path, layers):
            src = ckpt.read(name)
            if src.shape != target.shape[len(index):]:
                raise CheckpointError(f"{ckpt.info(name).file}: tensor {name} has shape {list(src.shape)}, "
                                      f"expected {list(target.shape[len(index):])}")
            target[index] = src.astype(target.dtype)
        flat.append((leaf_path, var.replace(jnp.asarray(target))))
    params = nnx.from_flat_state(flat)
    return Model(cfg, graphdef, params, path)
