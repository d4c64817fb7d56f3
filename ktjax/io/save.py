"""Writing a model's parameters as a transformers-format checkpoint directory.

The inverse of loading: config.json (published-checkpoint style) and model.safetensors with the
published DeepSeek tensor names (one tensor per expert, torch [out, in] layout), so that loading
it back (`ktjax.load(path, dtype=...)`) gives the same parameters bit for bit. The weights written
are float, so the config declares no quantization. Written one parameter group at a time (a host
copy of one group, never of the model) into a staging directory, then moved into place: a failed
or interrupted save leaves the directory as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig, resolve_dtype
from ktjax.io.checkpoint import tensor_names
from ktjax.io.load import abstract_params
from ktjax.io.merge import SHARD_BYTES, ShardWriter

INDEX = "model.safetensors.index.json"


def save_params(cfg: ModelConfig, params: nnx.State, path: str | os.PathLike, *, dtype: Any = None,
                shard_bytes: int = SHARD_BYTES) -> str:
    """Write a stacked model state to the directory `path` (created if needed); returns the path.

    dtype: None keeps each parameter's own dtype; "bfloat16"/"float32" (or a jnp dtype) casts
    the parameters, except those the model keeps in float32 whatever its dtype (the MoE router
    and its correction bias), which stay float32 as in published checkpoints. config.json's
    `torch_dtype` records the dtype, which is what `ktjax.load` then loads in by default.
    """
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path}: exists and is not a directory")
    keep_own = dtype is None
    main = jnp.dtype(params["embed_tokens"][...].dtype) if keep_own else resolve_dtype(dtype, cfg)
    # Leaves that stay float32 even in a bfloat16 model (the router) keep float32 in the file.
    _, abstract_bf16 = abstract_params(cfg, jnp.bfloat16)
    always_f32 = {p for p, v in nnx.to_flat_state(abstract_bf16) if v.dtype == jnp.float32}

    os.makedirs(path, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".save-", dir=path)
    try:
        writer = ShardWriter(staging, shard_bytes)
        for leaf_path, var in nnx.to_flat_state(params):
            value = np.asarray(var[...])  # one group's host copy at a time
            if keep_own:
                target = value.dtype
            elif leaf_path in always_f32:
                target = np.dtype(np.float32)
            else:
                target = np.dtype(ml_dtypes.bfloat16) if main == jnp.bfloat16 else np.dtype(main)
            arr = value.astype(target, copy=False)  # jnp.bfloat16 is ml_dtypes.bfloat16
            for name, index in tensor_names(cfg, leaf_path):
                writer.add(name, arr[index])
            del value, arr
        writer.close()
        if os.listdir(staging).count("model-00001-of-00001.safetensors"):  # one shard: the usual single file
            os.replace(os.path.join(staging, "model-00001-of-00001.safetensors"),
                       os.path.join(staging, "model.safetensors"))
            os.remove(os.path.join(staging, INDEX))
        d = dataclasses.replace(cfg, fp8_block_size=None, expert_quant=None).to_dict()
        d["torch_dtype"] = jnp.dtype(main).name
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, ensure_ascii=False)
            f.write("\n")
        # The previous weights go only now that the new ones are complete.
        for old in os.listdir(path):
            if old == INDEX or old.endswith(".safetensors"):
                os.remove(os.path.join(path, old))
        for new in sorted(os.listdir(staging), key=lambda f: f == "config.json"):  # config.json last
            os.replace(os.path.join(staging, new), os.path.join(path, new))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
