"""DeepSeek-V3/R1 (and V2/V2-Lite) as Flax NNX modules, every parameter on one device.

Same-shaped layers are stacked along a leading axis ("dense" and "moe" groups) and run with
`lax.scan`; the compressed KV cache is stacked the same way. Everything the engine compiles is a
pure function of (params, cache, inputs) through `nnx.split` / `nnx.merge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.decoder import DecoderLayer, final_logits
from ktjax.models.layers import Dtype, Linear, RMSNorm, normal_init
from ktjax.models.rope import cos_sin

GROUPS = ("dense", "moe")


class LayerCache(NamedTuple):
    """Compressed KV cache of one layer group: latent [L, B, S, Dl] and rope key [L, B, S, Dr]."""

    latent: jax.Array
    rope: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The model's compressed KV cache: one stacked `LayerCache` per layer group present."""

    groups: Mapping[str, LayerCache]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Dtype) -> KVCache:
        return cls({g: LayerCache(jnp.zeros((len(idx), batch, max_len, cfg.kv_lora_rank), dtype),
                                  jnp.zeros((len(idx), batch, max_len, cfg.qk_rope_head_dim), dtype))
                    for g, idx in cfg.layer_groups.items() if idx})

    def __getitem__(self, group: str) -> LayerCache:
        return self.groups[group]

    def replace(self, group: str, cache: LayerCache) -> KVCache:
        return KVCache({**self.groups, group: cache})

    @property
    def batch(self) -> int:
        return next(iter(self.groups.values())).latent.shape[1]

    @property
    def max_len(self) -> int:
        return next(iter(self.groups.values())).latent.shape[2]


def positions(start_B: jax.Array, T: int) -> jax.Array:
    return start_B[:, None] + jnp.arange(T, dtype=start_B.dtype)[None, :]


class DeepseekForCausalLM(nnx.Module):
    """attention: the MLA kernels' implementation (`ktjax.kernels.IMPLS`); dispatch: how routed
    experts meet their tokens (`ktjax.models.moe.DISPATCHES`); expert_mesh: the mesh routed experts
    are split over (`ktjax.models.moe.routed_experts_parallel`; None: one device). All are static
    structure."""

    def __init__(self, cfg: ModelConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs, attention: str = "auto",
                 dispatch: str = "auto", expert_mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.dense_layers = self._stack(cfg, "dense", dtype, rngs, attention, dispatch, expert_mesh)
        self.moe_layers = self._stack(cfg, "moe", dtype, rngs, attention, dispatch, expert_mesh)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    @staticmethod
    def _stack(cfg: ModelConfig, kind: str, dtype: Dtype, rngs: nnx.Rngs, attention: str, dispatch: str,
               expert_mesh: jax.sharding.Mesh | None) -> DecoderLayer | None:
        n = len(cfg.layer_groups[kind])
        if n == 0:
            return None

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, kind, dtype=dtype, rngs=r, attention=attention, dispatch=dispatch,
                                expert_mesh=expert_mesh)

        return make(rngs)

    def layers(self, group: str) -> DecoderLayer | None:
        return self.dense_layers if group == "dense" else self.moe_layers

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens[...].dtype

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
        return KVCache.zeros(self.cfg, batch, max_len, dtype or self.dtype)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        return self.embed_tokens[...][tokens_BT]

    def head_weight(self) -> jax.Array:
        return self.embed_tokens[...] if self.lm_head is None else self.lm_head.weight[...]

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and LM head; float32 logits."""
        return final_logits(self.norm.weight[...], self.head_weight(), self.cfg.rms_norm_eps, x_BTD)

    def prepare_layer(self, layer: DecoderLayer, model_layer: jax.Array, dropout_key: jax.Array | None) -> None:
        """Called on each layer as it is merged inside the scan (LoRA models fold their adapters here)."""

    def hidden(self, tokens_BT: jax.Array, start_B: jax.Array, cache: KVCache | None, *, remat: bool = False,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Every decoder layer over a chunk at positions start[b] + t, updating the cache.

        cache=None runs from position 0 with a fresh cache per layer and keeps none (training);
        remat=True rematerialises each layer in the backward pass (only its input is saved)."""
        T = tokens_BT.shape[1]
        rope = cos_sin(self.cfg, positions(start_B, T))
        x_BTD = self.embed(tokens_BT)
        for group, first, count in self.cfg.layer_runs:
            group_cache = None if cache is None else cache[group]
            x_BTD, group_cache = self.run_layers(group, x_BTD, rope, start_B, group_cache, first, count, remat=remat,
                                                 dropout_key=dropout_key)
            if cache is not None:
                cache = cache.replace(group, group_cache)
        return x_BTD, cache

    def run_layers(self, group: str, x_BTD, rope, start_B, cache: LayerCache | None, first: int, count: int, *,
                   remat: bool = False, dropout_key: jax.Array | None = None):
        """Scan `count` stacked layers of a group from `first`, threading x and the group's cache."""
        graphdef, state = nnx.split(self.layers(group))
        total = jax.tree.leaves(state)[0].shape[0]
        if (first, count) != (0, total):
            state = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, first, first + count), state)
        model_ids = jnp.asarray(self.cfg.layer_groups[group][first:first + count], jnp.int32)
        B, T, _ = x_BTD.shape
        cfg = self.cfg

        def one_layer(x, layer_state, latent, rp, model_layer):
            layer = nnx.merge(graphdef, layer_state)
            self.prepare_layer(layer, model_layer, dropout_key)
            if latent is None:  # training: attend within the chunk only
                latent = jnp.zeros((B, T, cfg.kv_lora_rank), x.dtype)
                rp = jnp.zeros((B, T, cfg.qk_rope_head_dim), x.dtype)
            return layer(x, rope, start_B, latent, rp)

        if remat:
            one_layer = jax.checkpoint(one_layer)

        if cache is None:
            def body(x, xs):
                layer_state, m = xs
                return one_layer(x, layer_state, None, None, m)[0], None

            x_BTD, _ = jax.lax.scan(body, x_BTD, (state, model_ids))
            return x_BTD, None

        def body_cached(carry, xs):
            x, latent_L, rope_L = carry
            layer_state, i, m = xs
            x, lat, rp = one_layer(x, layer_state, latent_L[i], rope_L[i], m)
            latent_L = jax.lax.dynamic_update_index_in_dim(latent_L, lat, i, 0)
            rope_L = jax.lax.dynamic_update_index_in_dim(rope_L, rp, i, 0)
            return (x, latent_L, rope_L), None

        layer_ids = first + jnp.arange(count)
        (x_BTD, latent, rope_c), _ = jax.lax.scan(body_cached, (x_BTD, cache.latent, cache.rope),
                                                  (state, layer_ids, model_ids))
        return x_BTD, LayerCache(latent, rope_c)

    def __call__(self, tokens_BT: jax.Array, start_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits [B, T, V] (float32) of a chunk, and the updated cache."""
        x_BTD, cache = self.hidden(tokens_BT, start_B, cache)
        return self.head(x_BTD), cache
