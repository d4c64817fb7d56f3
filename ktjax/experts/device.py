"""Routed experts held apart from the model, computed on the device: a chunk of experts (resident
or just fetched from host memory) applied to the tokens routed to them.

int8/int4 experts at decode sizes (<= `expert_ffn.MAX_TOKENS` tokens) take the fused Pallas kernels of
`ktjax.kernels.expert_ffn` where the static `impl` says so (`ktjax.kernels.expert_path`: "auto" on a GPU,
"pallas", "interpret"); everything else, and every backward pass, takes the XLA form below
(`expert_ffn_reference`), which stays the reference the kernels are checked against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ktjax import kernels
from ktjax.experts.weights import ExpertFormat, ExpertWeights
from ktjax.models.layers import matmul, swiglu


def _kernel_path(x_CD: jax.Array, experts, impl: str | None) -> str:
    """"pallas" / "interpret" where the fused kernels take these experts (all of one int8/int4 format), else
    "reference"."""
    if not experts or any(ex.fmt != experts[0].fmt for ex in experts) or experts[0].fmt.packed is None:
        return "reference"
    fmt = experts[0].fmt
    return kernels.expert_path(x_CD, fmt.name, fmt.F, fmt.D, impl=impl)


def _weighted_reference(x_CD, bufs, wt_CK, acc_CD, fmt: ExpertFormat):
    acc = acc_CD
    for e, buf in enumerate(bufs):
        acc = acc + expert_ffn_reference(x_CD, ExpertWeights(buf, None, fmt)) * wt_CK[:, e:e + 1]
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_kernel(x_CD, bufs, wt_CK, acc_CD, fmt: ExpertFormat, interpret: bool):
    """acc + sum_e expert_e(x) * wt[:, e] through the fused kernels; differentiated through the reference
    (the kernels have no backward: training still gets exact gradients of the same function)."""
    return kernels.experts_pallas(x_CD, tuple(bufs), wt_CK, acc_CD, layout=fmt.packed, interpret=interpret)


def _weighted_kernel_fwd(x_CD, bufs, wt_CK, acc_CD, fmt, interpret):
    return _weighted_kernel(x_CD, bufs, wt_CK, acc_CD, fmt, interpret), (x_CD, bufs, wt_CK, acc_CD)


def _weighted_kernel_bwd(fmt, interpret, res, g):
    _, vjp = jax.vjp(functools.partial(_weighted_reference, fmt=fmt), *res)
    return vjp(g)


_weighted_kernel.defvjp(_weighted_kernel_fwd, _weighted_kernel_bwd)


# int8/int4 experts meeting this few tokens are multiplied over their quantized bytes in place (`expert_ffn_matvec`,
# in the form named) instead of dequantized into HBM and multiplied. Measured on the H200, a layer's 8 full-size
# experts (benchmarks/kernels.md, expert forms runs 1-2): 1 token int4 550-582 against 1457-1584 us, int8 405-470
# against 975-990 us; 2 tokens int4 (split) 842 against 1544 us, int8 675-751 against 982-1022 us; 4+ tokens slower.
MATVEC_FORMS = {"int8": {1: "grouped", 2: "grouped"}, "int4": {1: "grouped", 2: "split"}}


def expert_ffn(x_CD: jax.Array, ex: ExpertWeights, *, impl: str | None = None) -> jax.Array:
    """down(silu(gate x) * up x) as float32 (see `expert_ffn_reference`); int8/int4 experts with few tokens
    through the fused kernels where `impl` chooses them (`ktjax.kernels.expert_path`), else with very few
    through `expert_ffn_matvec`."""
    path = _kernel_path(x_CD, (ex,), impl)
    if path == "reference":
        form = MATVEC_FORMS.get(ex.fmt.name, {}).get(x_CD.shape[0])
        if form is not None:
            return expert_ffn_matvec(x_CD, ex, form=form)
        return expert_ffn_reference(x_CD, ex)
    C, D = x_CD.shape
    return _weighted_kernel(x_CD, (ex.w,), jnp.ones((C, 1), jnp.float32), jnp.zeros((C, D), jnp.float32),
                            ex.fmt, path == "interpret")


def expert_ffn_matvec(x_CD: jax.Array, ex: ExpertWeights, *, form: str = "inline") -> jax.Array:
    """down(silu(gate x) * up x) as float32 for an int8/int4 expert and few tokens, each matrix read in place
    by a multiply-reduce over its quantized bytes (`PackedLayout.device_matvec`): no dequantized copy."""
    layout = ex.fmt.packed
    gu_CR = layout.device_matvec(ex.w, "gate_up", x_CD, form=form)
    g_CF, u_CF = jnp.split(gu_CR, 2, axis=-1)
    return layout.device_matvec(ex.w, "down", swiglu(g_CF, u_CF), form=form)


def expert_ffn_reference(x_CD: jax.Array, ex: ExpertWeights) -> jax.Array:
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


def add_experts(acc_ND, h_ND, weights_NK, idx_NK, ids_C, experts: tuple[ExpertWeights, ...], *, capacity: int,
                impl: str | None = None):
    """Add the contribution of a chunk of experts (ids_C[c] uses experts[c]; id -1 is padding) to
    acc_ND (None: start from zeros).

    Tokens routed to each expert are gathered up to `capacity` (chosen on the host from the real
    counts, so nothing is dropped) and computed as dense matmuls; with capacity >= N every token is
    computed, weighted. int8/int4 chunks at decode sizes take the fused kernels (all the chunk's experts
    in two launches) where the static `impl` chooses them (`ktjax.kernels.expert_path`).
    """
    N, D = h_ND.shape
    K = idx_NK.shape[1]
    dt = h_ND.dtype
    if acc_ND is None:
        acc_ND = jnp.zeros((N, D), jnp.float32)
    if not experts:  # every chosen expert went elsewhere (the host CPU)
        return acc_ND
    if capacity >= N:
        # Decode-sized: every token goes through each expert, weighted by its routing weight (zero
        # where not routed). Same FLOPs as gathering `capacity` rows, without the dispatch's sort,
        # gathers and scatter: at batch 1 those small kernels cost more than the expert's matmuls.
        path, wt_NC = _kernel_path(h_ND, experts, impl), slot_weights(weights_NK, idx_NK, ids_C[:len(experts)])
        if path != "reference":
            return _weighted_kernel(h_ND, tuple(ex.w for ex in experts), wt_NC, acc_ND, experts[0].fmt,
                                    path == "interpret")
        for c, ex in enumerate(experts):
            acc_ND = add_weighted(acc_ND, expert_ffn(h_ND, ex, impl=impl), wt_NC[:, c:c + 1])
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
        y_CD = expert_ffn(h_pad[tok_C], ex, impl=impl)
        acc_ND = acc_ND.at[tok_C].add(y_CD * wt_C[:, None], mode="drop")
    return acc_ND


def add_slot_experts(acc_ND, h_ND, weights_NK, idx_NK, ids_S, stack: ExpertWeights, *, impl: str | None = None):
    """`add_experts`' decode branch over one stack of S slots (each array of `stack` [S, ...]; slot s holds expert
    ids_S[s], -1: none, never read): acc (None: zeros) plus every token through each slot's expert, weighted. The
    kernels' stacked form takes all slots in two launches, the reference path one batched computation: the code
    does not grow with S. Their separate-buffer form has a branch per slot, and a handoff program of 16 slots took
    20-60 s to compile on the H100 machine (benchmarks/offload.md, runs 64-66)."""
    N, D = h_ND.shape
    S = ids_S.shape[0]
    acc_ND = jnp.zeros((N, D), jnp.float32) if acc_ND is None else acc_ND
    wt_NS = slot_weights(weights_NK, idx_NK, ids_S)
    path = _kernel_path(h_ND, (stack,), impl)  # by its format alone, as for one expert
    if path != "reference":
        return kernels.experts_pallas(h_ND, stack.w, wt_NS, acc_ND, layout=stack.fmt.packed,
                                      ids_K=jnp.arange(S, dtype=jnp.int32), interpret=path == "interpret")
    y_SND = jax.vmap(lambda ex: expert_ffn(h_ND, ex, impl=impl))(stack)
    for s in range(S):  # in slot order, as the kernels add them
        acc_ND = add_weighted(acc_ND, y_SND[s], wt_NS[:, s:s + 1])
    return acc_ND


def slot_weights(weights_NK, idx_NK, ids_C):
    """float32 [N, C]: each token's routing weight for the expert in slot c (ids_C[c]; 0 where not routed there)."""
    ids_C = jnp.asarray(ids_C)
    return jnp.where(idx_NK[:, :, None] == ids_C[None, None, :], weights_NK[:, :, None], 0).sum(1).astype(jnp.float32)


def add_weighted(acc_ND, y_ND, wt_N1):
    """acc plus an expert's outputs, weighted: only where the weight is not 0, for a slot no token chose may hold
    anything (a handoff program's unfilled slot), and 0 * NaN is NaN."""
    return acc_ND + jnp.where(wt_N1 != 0, y_ND * wt_N1, 0)


# The compiled form, run on its own between transfers (inside another program, call add_experts).
experts_segment = jax.jit(add_experts, static_argnames=("capacity", "impl"), donate_argnums=0)
