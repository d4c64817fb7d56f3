"""Mixture of experts: the router (every DeepSeek routing method) and the routed experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.layers import MLP, Dtype, matmul, normal_init, swiglu


def route(x_ND: jax.Array, gate_ED: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Choose cfg.num_experts_per_tok experts per token. Returns (weights [N, K] f32, indices [N, K])."""
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    logits_NE = jnp.einsum("nd,ed->ne", x_ND.astype(jnp.float32), gate_ED.astype(jnp.float32))
    if cfg.scoring_func == "sigmoid":
        scores_NE = jax.nn.sigmoid(logits_NE)
    else:
        scores_NE = jax.nn.softmax(logits_NE, axis=-1)
    N = scores_NE.shape[0]

    def keep_top_groups(choice_NE: jax.Array, group_score_NG: jax.Array, fill: float) -> jax.Array:
        _, top_groups = jax.lax.top_k(group_score_NG, cfg.topk_group)
        group_mask_NG = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], top_groups].set(True)
        expert_mask_NE = jnp.repeat(group_mask_NG, E // G, axis=1)
        return jnp.where(expert_mask_NE, choice_NE, fill)

    if cfg.topk_method == "noaux_tc":
        # The correction bias steers the choice only; weights are the unbiased scores.
        choice_NE = scores_NE if bias_E is None else scores_NE + bias_E.astype(jnp.float32)
        top2_NG2, _ = jax.lax.top_k(choice_NE.reshape(N, G, E // G), 2)
        choice_NE = keep_top_groups(choice_NE, top2_NG2.sum(-1), -jnp.inf)
        _, idx_NK = jax.lax.top_k(choice_NE, K)
        weights_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=1)
    elif cfg.topk_method == "group_limited_greedy":
        choice_NE = keep_top_groups(scores_NE, scores_NE.reshape(N, G, E // G).max(-1), 0.0)
        weights_NK, idx_NK = jax.lax.top_k(choice_NE, K)
    else:  # greedy
        weights_NK, idx_NK = jax.lax.top_k(scores_NE, K)

    if cfg.model_type == "deepseek_v2":
        # DeepSeek-V2 either normalises or scales, never both.
        if cfg.norm_topk_prob and K > 1:
            return weights_NK / (weights_NK.sum(-1, keepdims=True) + 1e-20), idx_NK
        return weights_NK * cfg.routed_scaling_factor, idx_NK
    if cfg.norm_topk_prob:
        weights_NK = weights_NK / (weights_NK.sum(-1, keepdims=True) + 1e-20)
    return weights_NK * cfg.routed_scaling_factor, idx_NK


def experts_gathered(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF) -> jax.Array:
    """Per-token gather of the chosen experts' weights: the decode path (N*K small)."""
    dt = x_ND.dtype
    f32 = jnp.float32
    g = matmul("nd,nkfd->nkf", x_ND, gate_EFD[idx_NK]).astype(f32)
    u = matmul("nd,nkfd->nkf", x_ND, up_EFD[idx_NK]).astype(f32)
    y = matmul("nkf,nkdf->nkd", swiglu(g, u).astype(dt), down_EDF[idx_NK]).astype(f32)
    return jnp.einsum("nkd,nk->nd", y, weights_NK).astype(dt)


def experts_sorted(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF) -> jax.Array:
    """Dropless grouped matmul over token-expert pairs sorted by expert: the prefill path."""
    N, K = idx_NK.shape
    E = gate_EFD.shape[0]
    dt = x_ND.dtype
    f32 = jnp.float32
    order = jnp.argsort(idx_NK.reshape(-1), stable=True)
    token_of_pair = order // K
    xs_PD = x_ND[token_of_pair]
    sizes_E = jnp.bincount(idx_NK.reshape(-1), length=E).astype(jnp.int32)
    # Outputs in dt, then float32: the backward's matmuls stay in dt (see `layers.matmul`).
    g = jax.lax.ragged_dot(xs_PD, jnp.swapaxes(gate_EFD, 1, 2).astype(dt), sizes_E).astype(f32)
    u = jax.lax.ragged_dot(xs_PD, jnp.swapaxes(up_EFD, 1, 2).astype(dt), sizes_E).astype(f32)
    y_PD = jax.lax.ragged_dot(swiglu(g, u).astype(dt), jnp.swapaxes(down_EDF, 1, 2).astype(dt), sizes_E).astype(f32)
    y_PD = y_PD * weights_NK.reshape(-1)[order][:, None]
    return jnp.zeros((N, x_ND.shape[1]), f32).at[token_of_pair].add(y_PD).astype(dt)


def experts_dense(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF) -> jax.Array:
    """Every expert on every token, weighted by the (mostly zero) routing weights: E/K times the
    FLOPs, but plain batched matmuls, which for a tiny model on a GPU beat sorting by expert."""
    N, E = x_ND.shape[0], gate_EFD.shape[0]
    dt, f32 = x_ND.dtype, jnp.float32
    combine_NE = jnp.zeros((N, E), f32).at[jnp.arange(N)[:, None], idx_NK].add(weights_NK)
    g = matmul("nd,efd->nef", x_ND, gate_EFD).astype(f32)
    u = matmul("nd,efd->nef", x_ND, up_EFD).astype(f32)
    h = (swiglu(g, u) * combine_NE[:, :, None]).astype(dt)
    return matmul("nef,edf->nd", h, down_EDF)


DISPATCHES = ("auto", "gathered", "sorted", "dense")


def routed_experts(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF, dispatch: str = "auto") -> jax.Array:
    """The weighted sum of the chosen experts' outputs [N, D]; dispatch picks how tokens meet their
    experts (same function each way). auto: gathering moves N*K experts' weights, so past E of
    them grouping by expert (sorted) is cheaper."""
    if dispatch == "auto":
        dispatch = "gathered" if idx_NK.size <= gate_EFD.shape[0] else "sorted"
    fn = {"gathered": experts_gathered, "sorted": experts_sorted, "dense": experts_dense}[dispatch]
    return fn(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF)


EXPERT_AXIS = "expert"  # the mesh axis routed experts are split over (expert parallelism)


def routed_experts_parallel(mesh: jax.sharding.Mesh, x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF,
                            dispatch: str = "auto") -> jax.Array:
    """`routed_experts` with the experts split over the mesh's `expert` axis, device d owning the
    contiguous block d*E/n .. (d+1)*E/n - 1: every device sees every token (replicated), computes
    its own experts' share of each token's weighted sum (pairs routed elsewhere weigh zero), and one
    psum adds the shares. Tokens meet the devices that own their experts; expert weights never move."""

    def own_share(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF):
        n_local = gate_EFD.shape[0]
        local_NK = idx_NK - jax.lax.axis_index(EXPERT_AXIS) * n_local
        mine_NK = (local_NK >= 0) & (local_NK < n_local)
        share_ND = routed_experts(x_ND, jnp.where(mine_NK, weights_NK, 0.0), jnp.where(mine_NK, local_NK, 0),
                                  gate_EFD, up_EFD, down_EDF, dispatch)
        # Summed in float32: the devices' shares add as the single-device sum over k would.
        return jax.lax.psum(share_ND.astype(jnp.float32), EXPERT_AXIS)

    P = jax.sharding.PartitionSpec
    experts = P(EXPERT_AXIS)
    summed = jax.shard_map(own_share, mesh=mesh, in_specs=(P(), P(), P(), experts, experts, experts), out_specs=P())
    return summed(x_ND, weights_NK, idx_NK, gate_EFD, up_EFD, down_EDF).astype(x_ND.dtype)


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # The router stays in float32 whatever the model dtype, as in the reference.
        self.weight = nnx.Param(normal_init(rngs, (cfg.n_routed_experts, cfg.hidden_size), jnp.float32))
        self.e_score_correction_bias = (
            nnx.Param(jnp.zeros((cfg.n_routed_experts,), jnp.float32)) if cfg.topk_method == "noaux_tc" else None)


class Experts(nnx.Module):
    """The routed experts of one layer, stacked: gate/up [E, F, D], down [E, D, F]."""

    def __init__(self, cfg: ModelConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nnx.Param(normal_init(rngs, (E, F, D), dtype))
        self.up_proj = nnx.Param(normal_init(rngs, (E, F, D), dtype))
        self.down_proj = nnx.Param(normal_init(rngs, (E, D, F), dtype))


class MoE(nnx.Module):
    """The MoE block as three phases that executors call separately (routing read on the host,
    experts fetched or computed elsewhere in between) and `__call__` composes: route, shared,
    routed. Executors that hold the routed experts apart build the block with experts=None.
    expert_mesh: a mesh with an `expert` axis the routed experts are split over (static structure;
    None: one device)."""

    def __init__(self, cfg: ModelConfig, *, dtype: Dtype, rngs: nnx.Rngs, dispatch: str = "auto",
                 expert_mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.dispatch = dispatch
        self.expert_mesh = expert_mesh
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype=dtype, rngs=rngs)
            if cfg.n_shared_experts else None)

    def route(self, h_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Routing weights [N, K] (float32) and chosen expert ids [N, K]."""
        bias = None if self.gate.e_score_correction_bias is None else self.gate.e_score_correction_bias[...]
        return route(h_ND, self.gate.weight[...], bias, self.cfg)

    def shared(self, h_ND: jax.Array) -> jax.Array | None:
        return None if self.shared_experts is None else self.shared_experts(h_ND)

    def routed(self, h_ND: jax.Array, weights_NK: jax.Array, idx_NK: jax.Array) -> jax.Array:
        ex = self.experts
        weights = (ex.gate_proj[...], ex.up_proj[...], ex.down_proj[...])
        if self.expert_mesh is not None:
            return routed_experts_parallel(self.expert_mesh, h_ND, weights_NK, idx_NK, *weights, self.dispatch)
        return routed_experts(h_ND, weights_NK, idx_NK, *weights, self.dispatch)

    def __call__(self, h_BTD: jax.Array) -> jax.Array:
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(B * T, D)
        return combine(None, self.shared(h_ND), self.routed(h_ND, *self.route(h_ND))).reshape(B, T, D)


def combine(x_ND: jax.Array | None, shared_ND: jax.Array | None, routed_ND: jax.Array) -> jax.Array:
    """The residual plus the MoE block's output, routed + shared, summed in the reference's order."""
    y_ND = routed_ND if shared_ND is None else routed_ND.astype(shared_ND.dtype) + shared_ND
    return y_ND if x_ND is None else x_ND + y_ND.astype(x_ND.dtype)
