"""Next-token choice from logits: greedy, temperature, top-k, top-p; all settings are traced
values, so changing them never recompiles. Settings and keys are one for the batch or one per row
(a serving batch mixes requests, each with its own settings and seed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits_BV: jax.Array, key: jax.Array, sampling) -> jax.Array:
    """`sample` with the settings of a `ktjax.runtime.model.Sampling`."""
    return sample(logits_BV, key, sampling.temperature, sampling.top_k, sampling.top_p)


sample_segment = jax.jit(sample_rows)


def sample(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Token ids [B]. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    The settings are scalars or [B]; key is one key or [B] keys (row b then samples as a batch of
    one would with key[b])."""
    logits_BV = logits_BV.astype(jnp.float32)
    B, V = logits_BV.shape
    temperature_B1, top_k_B1, top_p_B1 = (jnp.broadcast_to(v, (B,))[:, None] for v in (temperature, top_k, top_p))
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    # The sort over the vocabulary runs only when a row samples: a greedy serving batch of 32 slots
    # would sort 32 x V logits every step for nothing.
    return jax.lax.cond(jnp.any(temperature_B1 > 0), _sampled, lambda *_: greedy_B,
                        logits_BV, key, temperature_B1, top_k_B1, top_p_B1, greedy_B)


def _sampled(logits_BV, key, temperature_B1, top_k_B1, top_p_B1, greedy_B):
    V = logits_BV.shape[1]
    scaled_BV = logits_BV / jnp.maximum(temperature_B1, 1e-6)
    desc_BV = -jnp.sort(-scaled_BV, axis=-1)
    k_B1 = jnp.where(top_k_B1 > 0, jnp.minimum(top_k_B1, V), V)
    kth_B1 = jnp.take_along_axis(desc_BV, k_B1 - 1, axis=-1)
    desc_BV = jnp.where(desc_BV < kth_B1, -jnp.inf, desc_BV)
    # top-p keeps the smallest prefix of the sorted distribution whose mass reaches top_p.
    probs_BV = jax.nn.softmax(desc_BV, axis=-1)
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p_B1
    n_keep_B = jnp.maximum(keep_BV.sum(-1), 1)
    cutoff_B1 = jnp.take_along_axis(desc_BV, (n_keep_B - 1)[:, None], axis=-1)
    filtered_BV = jnp.where(scaled_BV < jnp.maximum(kth_B1, cutoff_B1), -jnp.inf, scaled_BV)
    if key.ndim == 0:
        sampled_B = jax.random.categorical(key, filtered_BV, axis=-1)
    else:
        sampled_B = jax.vmap(lambda k, row_V: jax.random.categorical(k, row_V[None])[0])(key, filtered_BV)
    return jnp.where(temperature_B1[:, 0] > 0, sampled_B.astype(jnp.int32), greedy_B)
