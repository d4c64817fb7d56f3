"""Training losses and helpers: next-token cross-entropy with a loss mask, usable under
`jax.jit` / `jax.grad` through `nnx.split` / `nnx.merge` (the parameters are the differentiated
pytree), and a layer-by-layer forward that also reports how many tokens each routed expert got
(for DeepSeek-V3's auxiliary-loss-free load balancing).

Mask convention: `mask_BT[b, t]` says whether token t of row b is a *target*, i.e. whether the
prediction of token t from tokens 0..t-1 counts. Position 0 is never a target. A mask of ones
trains on every next token; for supervised fine-tuning, mark only the response tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.loading import abstract_model
from ktjax.models import DeepseekForCausalLM, layer_schedule
from ktjax.models.layers import matmul
from ktjax.models.moe import route, routed_experts
from ktjax.models.rope import cos_sin


def next_token_loss_from_logits(logits_BTV: jax.Array, tokens_BT: jax.Array,
                                mask_BT: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy (nats, float32) of predicting tokens_BT[:, t+1] from logits_BTV[:, t],
    over the targets where mask_BT[:, t+1] is nonzero (all of them when mask_BT is None)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    target_BT = tokens_BT[:, 1:]
    nll_BT = -jnp.take_along_axis(logp_BTV, target_BT[..., None], axis=-1)[..., 0]
    if mask_BT is None:
        return jnp.mean(nll_BT)
    w_BT = mask_BT[:, 1:].astype(jnp.float32)
    return jnp.sum(nll_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)


def next_token_loss(module: DeepseekForCausalLM, tokens_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of `module` on a [B, T] batch (see the module docstring for the mask).

    Runs the model's own forward (`module(tokens, start, cache)`) from position 0 with a fresh
    cache of length T. Under jax.grad, differentiate a function of the parameters, e.g.
    `lambda p: next_token_loss(nnx.merge(graphdef, p, *rest), tokens, mask)`.
    """
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    logits_BTV, _ = module(tokens_BT, jnp.zeros((B,), jnp.int32), module.init_cache(B, T))
    return next_token_loss_from_logits(logits_BTV, tokens_BT, mask_BT)


def params_loss(params: nnx.State, graphdef: nnx.GraphDef, tokens_BT: jax.Array, mask_BT: jax.Array | None = None,
                *rest: nnx.State) -> jax.Array:
    """`next_token_loss` as a pure function of a parameter pytree (plus any frozen states in `rest`)."""
    return next_token_loss(nnx.merge(graphdef, params, *rest), tokens_BT, mask_BT)


# ---- a forward that also counts expert loads ----------------------------------------------

def moe_forward(moe: Any, cfg: ModelConfig, x_BTD: jax.Array, *, dense_experts: bool = False) -> tuple[jax.Array, jax.Array]:
    """One MoE block (routed + shared experts), as `MoE.__call__`, plus the fraction of the N*K
    token-expert assignments that went to each expert [E].

    dense_experts=True runs every expert on every token and weights the outputs by the (mostly
    zero) routing weights: the same function, E/K times the expert FLOPs, but plain batched
    matmuls, which for a tiny model on a GPU beat sorting tokens by expert (ragged_dot)."""
    B, T, D = x_BTD.shape
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x_ND = x_BTD.reshape(B * T, D)
    N = x_ND.shape[0]
    bias = None if moe.gate.e_score_correction_bias is None else moe.gate.e_score_correction_bias[...]
    weights_NK, idx_NK = route(x_ND, moe.gate.weight[...], bias, cfg)
    load_E = jnp.zeros((E,), jnp.float32).at[idx_NK.reshape(-1)].add(1.0) / (N * K)
    gate_EFD, up_EFD, down_EDF = moe.experts.gate_proj[...], moe.experts.up_proj[...], moe.experts.down_proj[...]
    if dense_experts:
        dt, f32 = x_ND.dtype, jnp.float32
        combine_NE = jnp.zeros((N, E), f32).at[jnp.arange(N)[:, None], idx_NK].add(weights_NK)
        g = matmul("nd,efd->nef", x_ND, gate_EFD).astype(f32)
        u = matmul("nd,efd->nef", x_ND, up_EFD).astype(f32)
        h = ((jax.nn.silu(g) * u) * combine_NE[:, :, None]).astype(dt)
        y_ND = matmul("nef,edf->nd", h, down_EDF)
    else:
        y_ND = routed_experts(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF)
    y_BTD = y_ND.reshape(B, T, D)
    if moe.shared_experts is not None:
        y_BTD = y_BTD + moe.shared_experts(x_BTD)
    return y_BTD, load_E


def forward_with_loads(module: DeepseekForCausalLM, tokens_BT: jax.Array, *,
                       dense_experts: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Logits [B, T, V] (float32) of a chunk at positions 0..T-1, computed layer by layer with the
    model's own submodules (the same function as `module(tokens, 0, cache)`), and the expert
    loads [n_moe_layers, E] (fraction of assignments per expert), or None without MoE layers."""
    cfg = module.cfg
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    B, T = tokens_BT.shape
    start_B = jnp.zeros((B,), jnp.int32)
    rope = cos_sin(cfg, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T)))
    cache = module.init_cache(B, T)
    x_BTD = module.embed(tokens_BT)
    loads = []
    for group, first, count in layer_schedule(cfg):
        graphdef, state = nnx.split(module.layers(group))
        for j in range(first, first + count):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
            x_BTD, _, _ = layer.attend(x_BTD, rope, start_B, cache[group].latent[j], cache[group].rope[j])
            h_BTD = layer.post_attention_layernorm(x_BTD)
            if group == "moe":
                y_BTD, load_E = moe_forward(layer.mlp, cfg, h_BTD, dense_experts=dense_experts)
                loads.append(load_E)
            else:
                y_BTD = layer.mlp(h_BTD)
            x_BTD = x_BTD + y_BTD
    return module.head(x_BTD), (jnp.stack(loads) if loads else None)


def update_correction_bias(params: nnx.State, loads_LE: jax.Array | None, rate: float) -> nnx.State:
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the routing bias of under-loaded experts
    and lower that of over-loaded ones by `rate` (the sign of the load error), per MoE layer.
    Returns new parameters (pure; jit-friendly)."""
    if loads_LE is None:
        return params
    key = ("moe_layers", "mlp", "gate", "e_score_correction_bias")
    error_LE = jnp.mean(loads_LE, axis=-1, keepdims=True) - loads_LE
    flat = [(p, v.replace(v[...] + rate * jnp.sign(error_LE).astype(v.dtype)) if p == key else v)
            for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def float32_leaves(cfg: ModelConfig) -> set[tuple[str, ...]]:
    """Paths of the parameters the model keeps in float32 whatever its dtype (the MoE router)."""
    _, abstract = abstract_model(cfg, jnp.bfloat16)
    return {p for p, v in nnx.to_flat_state(abstract) if v.dtype == jnp.float32}


def cast_params(params: nnx.State, dtype: Any, keep_float32: set[tuple[str, ...]]) -> nnx.State:
    """A copy of `params` in `dtype`, except the leaves in `keep_float32` (differentiable)."""
    flat = [(p, v.replace(v[...] if p in keep_float32 else v[...].astype(dtype))) for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)
