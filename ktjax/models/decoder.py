"""One decoder layer as named phases, defined once and composed by every executor:

    attend   x + attention(input_layernorm(x)), writing the layer's compressed KV cache
    mlp_in   h = post_attention_layernorm(x)
    dense    the dense MLP of h                      (dense layers)
    route    routing weights and expert ids of h     (MoE layers; `MoE.route`)
    shared   the shared expert of h                  (`MoE.shared`)
    routed   the chosen routed experts of h          (`MoE.routed`, or an executor's own dispatch
                                                     of experts held in host memory)
    combine  x + shared + routed                     (`moe.combine`)

`DecoderLayer.__call__` is the composition the scanned model runs; the offloaded executor calls
the phases from separately compiled segments, and the LoRA and training paths run the same layer
with adapted weights. Final norm and LM head: `final_logits`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.attention import MLAttention
from ktjax.models.layers import MLP, Dtype, RMSNorm, rms_norm
from ktjax.models.moe import MoE, combine


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, *, dtype: Dtype, rngs: nnx.Rngs, attention: str = "auto",
                 dispatch: str = "auto", expert_mesh: jax.sharding.Mesh | None = None):
        self.kind = kind
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = MLAttention(cfg, dtype=dtype, rngs=rngs, impl=attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        if kind == "moe":
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs, dispatch=dispatch, expert_mesh=expert_mesh)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def attend(self, x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR):
        h, latent_BSL, rope_BSR = self.self_attn(self.input_layernorm(x_BTD), rope_cos_sin, start_B, latent_BSL, rope_BSR)
        return x_BTD + h, latent_BSL, rope_BSR

    def mlp_in(self, x_BTD: jax.Array) -> jax.Array:
        """The MLP's input, tokens flattened: h [N, D]."""
        h_BTD = self.post_attention_layernorm(x_BTD)
        return h_BTD.reshape(-1, h_BTD.shape[-1])

    def __call__(self, x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR):
        x_BTD, latent_BSL, rope_BSR = self.attend(x_BTD, rope_cos_sin, start_B, latent_BSL, rope_BSR)
        h_ND = self.mlp_in(x_BTD)
        if self.kind == "dense":
            y_ND = x_BTD.reshape(h_ND.shape) + self.mlp(h_ND)
        else:
            y_ND = combine(x_BTD.reshape(h_ND.shape), self.mlp.shared(h_ND), self.mlp.routed(h_ND, *self.mlp.route(h_ND)))
        return y_ND.reshape(x_BTD.shape), latent_BSL, rope_BSR


def layer_structure(cfg: ModelConfig, kind: str, dtype, *, attention: str = "auto",
                    with_experts: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
    """One decoder layer's structure and abstract parameters (nothing allocated); with_experts=False
    leaves the routed experts out, for executors that hold them apart."""

    def make():
        layer = DecoderLayer(cfg, kind, dtype=dtype, rngs=nnx.Rngs(0), attention=attention)
        if kind == "moe" and not with_experts:
            layer.mlp.experts = None
        return layer

    return nnx.split(nnx.eval_shape(make))


def final_logits(norm_D: jax.Array, head_VD: jax.Array, eps: float, x_BXD: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head over any leading dims; float32 logits."""
    x = rms_norm(x_BXD, norm_D, eps)
    return jnp.einsum("...d,vd->...v", x, head_VD.astype(x.dtype), preferred_element_type=jnp.float32)
