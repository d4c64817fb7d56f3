"""Multi-head latent attention (MLA) with a compressed cache of latent + shared rope key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax import kernels
from ktjax.config import ModelConfig
from ktjax.models.layers import Dtype, Linear, RMSNorm, matmul
from ktjax.models.rope import apply_rope


def write_cache(cache_BSD: jax.Array, new_BTD: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write a contiguous chunk at each row's start position (in place under donation)."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache_BSD, new_BTD.astype(cache_BSD.dtype), start_B)


class MLAttention(nnx.Module):
    """impl: which attention kernels run (`ktjax.kernels.IMPLS`), a static part of the module's
    structure: "auto" on a GPU picks the Pallas kernels, training needs "reference" (no backward
    pass in the kernels)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Dtype, rngs: nnx.Rngs, impl: str = "auto"):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        self.impl = impl
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * cfg.qk_head_dim, dtype=dtype, rngs=rngs)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6, dtype=dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, dtype=dtype, rngs=rngs)
        self.kv_a_proj_with_mqa = Linear(D, cfg.cache_dim, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6, dtype=dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype=dtype, rngs=rngs)
        self.o_proj = Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias, dtype=dtype, rngs=rngs)

    def queries(self, x_BTD: jax.Array) -> jax.Array:
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        B, T, _ = x_BTD.shape
        return q.reshape(B, T, self.cfg.num_attention_heads, self.cfg.qk_head_dim)

    def __call__(
        self,
        x_BTD: jax.Array,
        rope_cos_sin: tuple[jax.Array, jax.Array],
        start_B: jax.Array,
        latent_cache_BSL: jax.Array,
        rope_cache_BSR: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attend a chunk of T tokens at positions start[b] + t; returns (out, latent_cache, rope_cache)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, Dn, Dr, Dv, Dl = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                             cfg.v_head_dim, cfg.kv_lora_rank)
        cos, sin = rope_cos_sin
        q_BTHK = self.queries(x_BTD)
        q_nope_BTHN, q_rope_BTHR = q_BTHK[..., :Dn], q_BTHK[..., Dn:]
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin, interleaved=cfg.rope_interleave)

        ckv_BTC = self.kv_a_proj_with_mqa(x_BTD)
        latent_BTL = self.kv_a_layernorm(ckv_BTC[..., :Dl])
        k_rope_BTR = apply_rope(ckv_BTC[..., None, Dl:], cos, sin, interleaved=cfg.rope_interleave)[:, :, 0]
        latent_cache_BSL = write_cache(latent_cache_BSL, latent_BTL, start_B)
        rope_cache_BSR = write_cache(rope_cache_BSR, k_rope_BTR, start_B)

        w_kv_b = self.kv_b_proj.weight[...].reshape(H, Dn + Dv, Dl).astype(x_BTD.dtype)
        w_uk_HNL, w_uv_HVL = w_kv_b[:, :Dn], w_kv_b[:, Dn:]
        if T == 1:
            # Decode: absorb kv_b_proj into the query and the output, attend in latent space.
            # Heads-major batch dimension: XLA:CPU has no bf16 x bf16 -> f32 dot for the b-major form.
            q_latent_HBL = jnp.einsum("hbn,hnl->hbl", q_nope_BTHN[:, 0].transpose(1, 0, 2), w_uk_HNL,
                                      preferred_element_type=jnp.float32).astype(x_BTD.dtype)
            q_latent_BHL = q_latent_HBL.transpose(1, 0, 2)
            o_latent_BHL = kernels.mla_decode(
                q_latent_BHL, q_rope_BTHR[:, 0], latent_cache_BSL.astype(x_BTD.dtype),
                rope_cache_BSR.astype(x_BTD.dtype), start_B + 1, sm_scale=cfg.softmax_scale, impl=self.impl)
            o_BTHV = jnp.einsum("bhl,hvl->bhv", o_latent_BHL, w_uv_HVL,
                                preferred_element_type=jnp.float32).astype(x_BTD.dtype)[:, None]
        else:
            # Prefill: expand the cached latents into full heads (compute-bound; cheaper than absorbing).
            latent_BSL = latent_cache_BSL.astype(x_BTD.dtype)
            kv_BSHX = matmul("bsl,hxl->bshx", latent_BSL, w_kv_b)
            S = latent_BSL.shape[1]
            k_rope_BSHR = jnp.broadcast_to(rope_cache_BSR.astype(x_BTD.dtype)[:, :, None], (B, S, H, Dr))
            k_BSHK = jnp.concatenate([kv_BSHX[..., :Dn], k_rope_BSHR], axis=-1)
            q_BTHK = jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1)
            o_BTHV = kernels.mla_prefill(q_BTHK, k_BSHK, kv_BSHX[..., Dn:], start_B, sm_scale=cfg.softmax_scale,
                                         impl=self.impl)
        out_BTD = self.o_proj(o_BTHV.reshape(B, T, H * Dv))
        return out_BTD, latent_cache_BSL, rope_cache_BSR
