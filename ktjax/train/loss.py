"""Training losses: next-token cross-entropy with a loss mask, usable under `jax.jit` / `jax.grad`
through `nnx.split` / `nnx.merge` (the parameters are the differentiated pytree), whole or over
chunks of tokens (`head_nll`: the [tokens, vocab] logits never exist whole).

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
from ktjax.io.load import abstract_params
from ktjax.models import DeepseekForCausalLM


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


def float32_leaves(cfg: ModelConfig) -> set[tuple[str, ...]]:
    """Paths of the parameters the model keeps in float32 whatever its dtype (the MoE router)."""
    _, abstract = abstract_params(cfg, jnp.bfloat16)
    return {p for p, v in nnx.to_flat_state(abstract) if v.dtype == jnp.float32}


def cast_params(params: nnx.State, dtype: Any, keep_float32: set[tuple[str, ...]]) -> nnx.State:
    """A copy of `params` in `dtype`, except the leaves in `keep_float32` (differentiable)."""
    flat = [(p, v.replace(v[...] if p in keep_float32 else v[...].astype(dtype))) for p, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def head_nll(head, x_BTD: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array, chunk: int
             ) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over the targets, number of targets), float32. head(x [C, D]) -> logits
    [C, V] (the final norm and LM head) and the log-softmax run over chunks of tokens, each
    rematerialised: the [tokens, vocab] logits never exist whole."""
    B, T, D = x_BTD.shape
    target_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
    w_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros((B, 1), mask_BT.dtype)], axis=1).astype(jnp.float32)
    N = B * T
    C = min(chunk, N)
    pad = (-N) % C
    x_ND = jnp.pad(x_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(target_BT.reshape(N), (0, pad))
    w_N = jnp.pad(w_BT.reshape(N), (0, pad))

    @jax.checkpoint
    def one(args):
        x_CD, t_C, w_C = args
        logits_CV = head(x_CD)
        logp = jax.nn.log_softmax(logits_CV.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum(nll * w_C)

    K = (N + pad) // C
    sums = jax.lax.map(one, (x_ND.reshape(K, C, D), t_N.reshape(K, C), w_N.reshape(K, C)))
    return jnp.sum(sums), jnp.sum(w_N)
