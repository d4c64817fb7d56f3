"""The compiled segments: pure functions of (params, cache, inputs), jitted with static shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.models import KVCache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def forward(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens_BT: jax.Array,
            start_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] of a chunk at positions start[b] + t, and the updated cache."""
    return nnx.merge(graphdef, params)(tokens_BT, start_B, cache)


def logits(model, token_ids) -> jax.Array:
    """float32 logits [B, T, V] of a full forward pass over a [B, T] integer array."""
    tokens_BT = jnp.asarray(token_ids, jnp.int32)
    if tokens_BT.ndim != 2:
        raise ValueError(f"token_ids must be a [batch, length] array, got shape {tokens_BT.shape}")
    B, T = tokens_BT.shape
    cache = model.module.init_cache(B, T)
    out, _ = forward(model.graphdef, model.params, cache, tokens_BT, jnp.zeros((B,), jnp.int32))
    return out
