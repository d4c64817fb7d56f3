"""Rotary position embedding with optional YaRN scaling, as DeepSeek-V2/V3 use it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [Dr/2] and the cos/sin amplitude (YaRN's attention factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    inv_freq = (1.0 / (base**exponents)).astype(np.float32)
    y = cfg.rope_scaling
    if y is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / y.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if y.attention_factor is not None:
        amplitude = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        amplitude = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        amplitude = yarn_mscale(y.factor)
    return inv_freq.astype(np.float32), float(amplitude)


def cos_sin(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dr/2] in float32 for the given absolute positions."""
    inv_freq, amplitude = inverse_frequencies(cfg)
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * amplitude, jnp.sin(angles) * amplitude


def apply_rope(x_BTHR: jax.Array, cos_BTP: jax.Array, sin_BTP: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate the rope dims. Interleaved checkpoints store pairs as (x0, x1), (x2, x3), ...; the
    result is laid out de-interleaved ([evens, odds]), which keeps every q.k product unchanged."""
    dtype = x_BTHR.dtype
    x = x_BTHR.astype(jnp.float32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    c, s = cos_BTP[:, :, None, :], sin_BTP[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)
