"""The compiled segments: pure functions of (params, cache, inputs), jitted with static shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.models import KVCache
from ktjax.sampling import sample


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
    if hasattr(model, "logits"):  # offloaded models run their own segments
        return model.logits(tokens_BT)
    B, T = tokens_BT.shape
    cache = model.module.init_cache(B, T)
    out, _ = forward(model.graphdef, model.params, cache, tokens_BT, jnp.zeros((B,), jnp.int32))
    return out


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def prefill(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, tokens_BT: jax.Array, start_B: jax.Array,
            last_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """Write a (padded) chunk into the cache; logits [B, V] at each row's index last_B within the chunk."""
    module = nnx.merge(graphdef, params)
    x_BTD, cache = module.hidden(tokens_BT, start_B, cache)
    x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
    return module.head(x_B1D)[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, token_B: jax.Array,
                pos_B: jax.Array) -> tuple[jax.Array, KVCache]:
    """One token per row at position pos_B: logits [B, V] and the updated cache."""
    logits_B1V, cache = nnx.merge(graphdef, params)(token_B[:, None], pos_B, cache)
    return logits_B1V[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def prefill_and_sample(graphdef, params, cache, tokens_BT, start_B, last_B, key, temperature, top_k, top_p):
    logits_BV, cache = prefill.__wrapped__(graphdef, params, cache, tokens_BT, start_B, last_B)
    return sample(logits_BV, key, temperature, top_k, top_p), logits_BV, cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_and_sample(graphdef, params, cache, token_B, pos_B, key, temperature, top_k, top_p):
    logits_BV, cache = decode_step.__wrapped__(graphdef, params, cache, token_B, pos_B)
    return sample(logits_BV, key, temperature, top_k, top_p), cache


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist compiled segments across runs so a second start skips XLA compilation."""
    import os
    path = path or os.environ.get("KTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ktjax", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class ResidentRunner:
    """The generation loop's interface for a model whose parameters all live on the device."""

    def __init__(self, model):
        self.model = model

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return self.model.module.init_cache(batch, max_len)

    def prefill(self, cache, tokens_BT, lengths_B, key, temperature, top_k, top_p):
        """Prompt chunks of the padded prompt in turn; each row's next token from its last chunk."""
        from ktjax.generation import prefill_chunks
        B = tokens_BT.shape[0]
        next_B = np.zeros(B, np.int32)
        for start, T in prefill_chunks(tokens_BT.shape[1]):
            last = np.clip(lengths_B - 1 - start, 0, T - 1)
            key, sub = jax.random.split(key)
            sampled, _, cache = prefill_and_sample(
                self.model.graphdef, self.model.params, cache, jnp.asarray(tokens_BT[:, start:start + T]),
                jnp.full((B,), start, jnp.int32), jnp.asarray(last), sub, temperature, top_k, top_p)
            ends_here = (lengths_B - 1 >= start) & (lengths_B - 1 < start + T)
            next_B = np.where(ends_here, np.asarray(sampled), next_B)
        return next_B, cache

    def decode_and_sample(self, cache, token_B, pos_B, key, temperature, top_k, top_p):
        return decode_and_sample(self.model.graphdef, self.model.params, cache, token_B, pos_B, key, temperature,
                                 top_k, top_p)


def runner(model):
    """What the generation loop drives: offloaded models schedule their own segments."""
    return model if hasattr(model, "prefill") else ResidentRunner(model)
