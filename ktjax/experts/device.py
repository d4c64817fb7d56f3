"""Routed experts held apart from the model, computed on the device: a chunk of experts (resident
or just fetched from host memory) applied to the tokens routed to them."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from ktjax.experts.weights import ExpertWeights
from ktjax.models.layers import matmul, swiglu


def expert_ffn(x_CD: jax.Array, ex: ExpertWeights) -> jax.Array:
    """down(silu(gate x) * up x) as float32. Matmul outputs are rounded to x's dtype, so that the
    backward's matmuls stay in it (see `layers.matmul`). Measured on the H200 (benchmarks/experts.md):
    gate and up as one matmul is faster for bf16 experts, as two for FP8 ones (each dequantised alone).
    int8/int4 experts are dequantized as a whole matrix before their matmul: a convert-multiply-reduce
    over their bytes instead measured slower on the H200 (2 MoE layers, B=1: 14.6 against 10.4 ms)."""
    dt, f32 = x_CD.dtype, jnp.float32
    if ex.fmt.name == "fp8":
        gate, up = ex.gate_and_up(dt)
        g_CF, u_CF = matmul("cd,fd->cf", x_CD, gate).astype(f32), matmul("cd,fd->cf", x_CD, up).astype(f32)
    else:
        g_CF, u_CF = jnp.split(matmul("cd,fd->cf", x_CD, ex.gate_up(dt)).astype(f32), 2, axis=-1)
    return matmul("cf,df->cd", swiglu(g_CF, u_CF).astype(dt), ex.down(dt)).astype(f32)


def add_experts(acc_ND, h_ND, weights_NK, idx_NK, ids_C, experts: tuple[ExpertWeights, ...], *, capacity: int):
    """Add the contribution of a chunk of experts (ids_C[c] uses experts[c]; id -1 is padding) to
    acc_ND (None: start from zeros).

    Tokens routed to each expert are gathered up to `capacity` (chosen on the host from the real
    counts, so nothing is dropped) and computed as dense matmuls; with capacity >= N every token is
    computed, weighted.
    """
    N, D = h_ND.shape
    K = idx_NK.shape[1]
    dt = h_ND.dtype
    if acc_ND is None:
        acc_ND = jnp.zeros((N, D), jnp.float32)
    if capacity >= N:
        # Decode-sized: every token goes through each expert, weighted by its routing weight (zero
        # where not routed). Same FLOPs as gathering `capacity` rows, without the dispatch's sort,
        # gathers and scatter: at batch 1 those small kernels cost more than the expert's matmuls.
        for c, ex in enumerate(experts):
            wt_N = jnp.where(idx_NK == ids_C[c], weights_NK, 0).sum(-1)
            acc_ND = acc_ND + expert_ffn(h_ND, ex) * wt_N[:, None]
        return acc_ND
    # Dispatch once for the chunk: a stable sort of the N*K assignments by their expert's slot lays
    # each expert's tokens out contiguously (slot C: routed elsewhere), so each expert takes a slice.
    hit_AC = idx_NK.reshape(-1, 1) == ids_C[None, :]
    slot_A = jnp.where(hit_AC.any(-1), jnp.argmax(hit_AC, axis=-1), len(experts))
    order_A = jnp.argsort(slot_A, stable=True)
    count_C = hit_AC.sum(0)
    start_C = jnp.cumsum(count_C) - count_C
    pad = jnp.full((capacity,), N, order_A.dtype)
    tok_A = jnp.concatenate([order_A // K, pad])  # token N: the zero row below
    w_A = jnp.concatenate([weights_NK.reshape(-1)[order_A], jnp.zeros((capacity,), weights_NK.dtype)])
    h_pad = jnp.concatenate([h_ND, jnp.zeros((1, D), dt)])
    for c, ex in enumerate(experts):
        valid_C = jnp.arange(capacity) < count_C[c]
        tok_C = jnp.where(valid_C, jax.lax.dynamic_slice_in_dim(tok_A, start_C[c], capacity), N)
        wt_C = jnp.where(valid_C, jax.lax.dynamic_slice_in_dim(w_A, start_C[c], capacity), 0.0)
        y_CD = expert_ffn(h_pad[tok_C], ex)
        acc_ND = acc_ND.at[tok_C].add(y_CD * wt_C[:, None], mode="drop")
    return acc_ND


# The compiled form, run on its own between transfers (inside another program, call add_experts).
experts_segment = jax.jit(add_experts, static_argnames=("capacity",), donate_argnums=0)
