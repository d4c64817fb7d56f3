"""Writing a model's parameters as a transformers-format checkpoint directory.

The inverse of loading: config.json (published-checkpoint style) and model.safetensors with the
published DeepSeek tensor names (one tensor per expert, torch [out, in] layout), so that loading
it back (`ktjax.load(path, dtype=...)`) gives the same parameters bit for bit. The weights written
are float, so the config declares no quantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ktjax.config import ModelConfig, resolve_dtype
from ktjax.io.checkpoint import tensor_names
from ktjax.io.load import abstract_params


def save_params(cfg: ModelConfig, params: nnx.State, path: str | os.PathLike, *, dtype: Any = None) -> str:
    """Write a stacked model state to the directory `path` (created if needed); returns the path.

    dtype: None keeps each parameter's own dtype; "bfloat16"/"float32" (or a jnp dtype) casts
    the parameters, except those the model keeps in float32 whatever its dtype (the MoE router
    and its correction bias), which stay float32 as in published checkpoints. config.json's
    `torch_dtype` records the dtype, which is what `ktjax.load` then loads in by default.
    """
    path = os.fspath(path)
    keep_own = dtype is None
    main = jnp.dtype(params["embed_tokens"][...].dtype) if keep_own else resolve_dtype(dtype, cfg)
    # Leaves that stay float32 even in a bfloat16 model (the router) keep float32 in the file.
    _, abstract_bf16 = abstract_params(cfg, jnp.bfloat16)
    always_f32 = {p for p, v in nnx.to_flat_state(abstract_bf16) if v.dtype == jnp.float32}

    tensors: dict[str, np.ndarray] = {}
    for leaf_path, var in nnx.to_flat_state(params):
        value = np.asarray(var[...])
        if keep_own:
            target = value.dtype
        elif leaf_path in always_f32:
            target = np.dtype(np.float32)
        else:
            target = np.dtype(ml_dtypes.bfloat16) if main == jnp.bfloat16 else np.dtype(main)
        arr = value.astype(target, copy=False)  # jnp.bfloat16 is ml_dtypes.bfloat16
        for name, index in tensor_names(cfg, leaf_path):
            tensors[name] = np.ascontiguousarray(arr[index])

    os.makedirs(path, exist_ok=True)
    d = dataclasses.replace(cfg, fp8_block_size=None, expert_quant=None).to_dict()
    d["torch_dtype"] = jnp.dtype(main).name
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, ensure_ascii=False)
        f.write("\n")
    file = os.path.join(path, "model.safetensors")
    save_file(tensors, file, metadata={"format": "pt"})
    os.chmod(file, 0o644)  # safetensors creates it owner-only
    return path

