"""DeepSeek-V3/R1 (and V2/V2-Lite) as Flax NNX modules.

Same-shaped layers are stacked along a leading axis ("dense" and "moe" groups) and run with
`lax.scan`; the compressed KV cache is stacked the same way. Everything the engine compiles is a
pure function of (params, cache, inputs) through `nnx.split` / `nnx.merge`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.attention import MLAttention
from ktjax.models.layers import MLP, Dtype, Linear, RMSNorm, normal_init
from ktjax.models.moe import MoE
from ktjax.models.rope import cos_sin

GROUPS = ("dense", "moe")


class LayerCache(NamedTuple):
    """Compressed KV cache of one layer group: latent [L, B, S, Dl] and rope key [L, B, S, Dr]."""

    latent: jax.Array
    rope: jax.Array


KVCache = dict[str, LayerCache]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, *, dtype: Dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = MLAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        if kind == "moe":
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def attend(self, x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR):
        h, latent_BSL, rope_BSR = self.self_attn(self.input_layernorm(x_BTD), rope_cos_sin, start_B, latent_BSL, rope_BSR)
        return x_BTD + h, latent_BSL, rope_BSR

    def __call__(self, x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR):
        x_BTD, latent_BSL, rope_BSR = self.attend(x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR)
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD, latent_BSL, rope_BSR


def layer_schedule(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """Runs of consecutive same-kind layers: (group, first index within the group, count)."""
    runs: list[tuple[str, int, int]] = []
    seen = {g: 0 for g in GROUPS}
    for kind in cfg.layer_kinds:
        if runs and runs[-1][0] == kind:
            g, first, n = runs[-1]
            runs[-1] = (g, first, n + 1)
        else:
            runs.append((kind, seen[kind], 1))
        seen[kind] += 1
    return runs


def group_layers(cfg: ModelConfig) -> dict[str, list[int]]:
    """Global layer indices held by each stacked group, in stack order."""
    return {g: [i for i, k in enumerate(cfg.layer_kinds) if k == g] for g in GROUPS}


class DeepseekForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.dense_layers = self._stack(cfg, "dense", dtype, rngs)
        self.moe_layers = self._stack(cfg, "moe", dtype, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    @staticmethod
    def _stack(cfg: ModelConfig, kind: str, dtype: Dtype, rngs: nnx.Rngs) -> DecoderLayer | None:
        n = sum(k == kind for k in cfg.layer_kinds)
        if n == 0:
            return None

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, kind, dtype=dtype, rngs=r)

        return make(rngs)

    def layers(self, group: str) -> DecoderLayer | None:
        return self.dense_layers if group == "dense" else self.moe_layers

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens[...].dtype

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
        cfg = self.cfg
        dtype = dtype or self.dtype
        cache = {}
        for g, idx in group_layers(cfg).items():
            if idx:
                cache[g] = LayerCache(jnp.zeros((len(idx), batch, max_len, cfg.kv_lora_rank), dtype),
                                      jnp.zeros((len(idx), batch, max_len, cfg.qk_rope_head_dim), dtype))
        return cache

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        return self.embed_tokens[...][tokens_BT]

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and LM head; float32 logits."""
        x_BTD = self.norm(x_BTD)
        w_VD = self.embed_tokens[...] if self.lm_head is None else self.lm_head.weight[...]
        return jnp.einsum("btd,vd->btv", x_BTD, w_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)

    def hidden(self, tokens_BT: jax.Array, start_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run every decoder layer over a chunk at positions start[b] + t, updating the cache."""
        T = tokens_BT.shape[1]
        positions_BT = start_B[:, None] + jnp.arange(T, dtype=start_B.dtype)[None, :]
        rope = cos_sin(self.cfg, positions_BT)
        x_BTD = self.embed(tokens_BT)
        cache = dict(cache)
        for group, first, count in layer_schedule(self.cfg):
            x_BTD, cache[group] = self.run_group(group, x_BTD, rope, start_B, cache[group], first, count)
        return x_BTD, cache

    def run_group(self, group: str, x_BTD, rope, start_B, cache: LayerCache, first: int, count: int):
        """One run of consecutive same-kind layers (subclasses change how a layer runs, not the order)."""
        return run_layers(self.layers(group), x_BTD, rope, start_B, cache, first, count)

    def __call__(self, tokens_BT: jax.Array, start_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits [B, T, V] (float32) of a chunk, and the updated cache."""
        x_BTD, cache = self.hidden(tokens_BT, start_B, cache)
        return self.head(x_BTD), cache


def run_layers(stack: DecoderLayer, x_BTD, rope, start_B, cache: LayerCache, first: int, count: int):
    """Scan `count` stacked layers starting at `first`, threading x and the group's cache."""
    graphdef, state = nnx.split(stack)
    total = cache.latent.shape[0]
    if (first, count) != (0, total):
        state = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, first, first + count), state)

    def body(carry, xs):
        x, latent_LBSD, rope_LBSD = carry
        layer_state, i = xs
        layer = nnx.merge(graphdef, layer_state)
        x, lat, rp = layer(x, rope, start_B, latent_LBSD[i], rope_LBSD[i])
        latent_LBSD = jax.lax.dynamic_update_index_in_dim(latent_LBSD, lat, i, 0)
        rope_LBSD = jax.lax.dynamic_update_index_in_dim(rope_LBSD, rp, i, 0)
        return (x, latent_LBSD, rope_LBSD), None

    layer_ids = first + jnp.arange(count)
    (x_BTD, latent, rope_c), _ = jax.lax.scan(body, (x_BTD, cache.latent, cache.rope), (state, layer_ids))
    return x_BTD, LayerCache(latent, rope_c)
