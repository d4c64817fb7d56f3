"""The compiled segments of the offloaded executor: a decoder layer's phases (`ktjax.models.decoder`)
grouped into the few programs that run between expert transfers.

Why per-layer segments: measured on the H200 (DESIGN.md), host->device transfers overlap compute
only across separately dispatched programs, not inside one. So each MoE layer is: attention and
routing (one program), the shared expert (issued once the first transfer is under way), the routed
experts in chunks as they land (`ktjax.experts.device.experts_segment`). Decode-sized batches instead
run the device's share of the MoE block after routing as one program (`moe_device`) once their few
experts have landed. A MoE layer's terms (x, shared, routed, the host CPU's share) are summed by the
next program that reads them (`Unsummed`), not by a program of their own: at batch 1 the step waits on
every dispatch between the host CPU's share and the next layer's attention.

The layer compositions below are pure functions of a merged layer; the training path differentiates
the same functions (`ktjax.train.offloaded`).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Executor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.experts.device import add_experts
from ktjax.models.decoder import DecoderLayer, final_logits
from ktjax.models.deepseek import positions
from ktjax.models.moe import combine
from ktjax.models.rope import cos_sin
from ktjax.runtime.model import StepStats
from ktjax.runtime.sampling import sample_rows


def attend_cached(layer: DecoderLayer, x_BTD, rope, start_B, latent_LBSD, rope_LBSD, j):
    """Attention with the layer's cache held in its group's stack (slice j, updated in place)."""
    x_BTD, latent, rp = layer.attend(x_BTD, rope, start_B, latent_LBSD[j], rope_LBSD[j])
    return (x_BTD, jax.lax.dynamic_update_index_in_dim(latent_LBSD, latent, j, 0),
            jax.lax.dynamic_update_index_in_dim(rope_LBSD, rp, j, 0))


def attend_fresh(layer: DecoderLayer, x_BTD, rope):
    """Attention of a chunk from position 0 with a cache of its own (training)."""
    B, T, _ = x_BTD.shape
    cfg = layer.self_attn.cfg
    x_BTD, _, _ = layer.attend(x_BTD, rope, jnp.zeros((B,), jnp.int32), jnp.zeros((B, T, cfg.kv_lora_rank), x_BTD.dtype),
                               jnp.zeros((B, T, cfg.qk_rope_head_dim), x_BTD.dtype))
    return x_BTD


def dense_mlp(layer: DecoderLayer, x_BTD):
    return x_BTD + layer.mlp(layer.mlp_in(x_BTD)).reshape(x_BTD.shape)


def route(layer: DecoderLayer, x_BTD):
    """(h [N, D], routing weights [N, K], expert ids [N, K]) of the MoE block's input."""
    h_ND = layer.mlp_in(x_BTD)
    return (h_ND, *layer.mlp.route(h_ND))


# Decode-sized layers: every token goes through each chosen expert, weighted (`moe_block.fused_moe`), their
# routing crosses to the host in one array (`Routing`), their host share lands in pinned buffers.
FUSED_MAX_TOKENS = 64


class Routing(NamedTuple):
    """A MoE layer's routing on the device (the block's input h, routing weights, expert ids), and for decode-sized
    layers the three in one f32 array for the host, [N, D + 2K]: h, the weights, the ids' bits (`for_host`). Each
    copy's call cost 50-70 us of the step's thread on the H100 machine, on the step's path (benchmarks/offload.md,
    runs 26-27): one array crosses, and where the program wrote it to host memory itself (`LayerSegments`'
    routing_to_host) no copy is started at all (the routing on the host ~0.25 ms sooner, runs 30-33)."""

    h_ND: jax.Array
    w_NK: jax.Array
    idx_NK: jax.Array
    for_host: jax.Array | None

    def start_copies(self, host_inputs: bool) -> None:
        """Start the copies to the host of the expert ids, and of h and the weights where host_inputs (the host CPU
        computes experts)."""
        if self.for_host is not None:
            if self.for_host.sharding.memory_kind == "device":
                self.for_host.copy_to_host_async()
            return
        for a in (self.idx_NK, self.w_NK, self.h_ND) if host_inputs else (self.idx_NK,):
            a.copy_to_host_async()

    def ids_on_host(self) -> np.ndarray:
        """The expert ids [N, K] on the host (waits for them)."""
        if self.for_host is None:
            return np.asarray(self.idx_NK)
        return unpacked(np.asarray(self.for_host), self.idx_NK.shape[1])[2]

    def inputs_on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """(routing weights [N, K], h [N, D] in float32) on the host (waits for them)."""
        if self.for_host is None:
            return np.asarray(self.w_NK), np.asarray(self.h_ND, np.float32)
        h_ND, w_NK, _ = unpacked(np.asarray(self.for_host), self.w_NK.shape[1])
        return w_NK, h_ND


def packed(h_ND, w_NK, idx_NK) -> jax.Array:
    """A layer's routing as one f32 array for the host (`Routing.for_host`): [N, D + 2K], h, the weights, the ids'
    bits (`unpacked` reads it)."""
    bits_NK = jax.lax.bitcast_convert_type(idx_NK.astype(jnp.int32), jnp.float32)
    return jnp.concatenate([h_ND.astype(jnp.float32), w_NK.astype(jnp.float32), bits_NK], axis=1)


def unpacked(both: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Routing.for_host` [N, D + 2K] on the host as (h [N, D] float32, routing weights [N, K], expert ids [N, K])."""
    D = both.shape[1] - 2 * K
    return both[:, :D], both[:, D:D + K], np.ascontiguousarray(both[:, D + K:]).view(np.int32)


def routing(layer: DecoderLayer, x_BTD, to_host: bool = False) -> Routing:
    """`route`'s outputs, and where decode-sized the same packed for the host (`Routing`); to_host: written to
    pinned host memory by this program."""
    h_ND, w_NK, idx_NK = route(layer, x_BTD)
    for_host = None
    if h_ND.shape[0] <= FUSED_MAX_TOKENS:
        for_host = packed(h_ND, w_NK, idx_NK)
        if to_host:
            for_host = jax.device_put(for_host, jax.memory.Space.Host)
    return Routing(h_ND, w_NK, idx_NK, for_host)


def shared(layer: DecoderLayer, h_ND):
    return layer.mlp.shared(h_ND)


@jax.jit
def combine_segment(x_BTD, shared_ND, routed_ND):
    """x + routed + shared; routed: the experts' f32 sums (a tuple of parts computed in different places; the host
    CPU's may be in pinned host memory, moved here)."""
    routed_ND = [jax.device_put(r, jax.memory.Space.Device) for r in routed_ND]
    total_ND = sum(routed_ND[1:], routed_ND[0])
    return combine(x_BTD.reshape(total_ND.shape), shared_ND, total_ND).reshape(x_BTD.shape)


class Unsummed(NamedTuple):
    """A MoE layer's output as its terms: x_BTD + shared_ND + routed_ND (the device's experts, f32) +
    host_ND (the host CPU's experts, f32, in pinned host memory where the host CPU may compute: the program that
    sums it moves it; zeros when it had none). Every segment that reads hidden states takes this or a plain
    array, and sums it first (`settle`)."""

    x_BTD: jax.Array
    shared_ND: jax.Array
    routed_ND: jax.Array
    host_ND: jax.Array | np.ndarray


def settle(x):
    """The hidden states [B, T, D] that x stands for (inside a program)."""
    if isinstance(x, Unsummed):
        return combine_segment(x.x_BTD, x.shared_ND, (x.routed_ND, x.host_ND))
    return x


def settled(x, run: Segments):
    """x as an array on the device, summed by a program of its own if it is `Unsummed` (for the few
    readers that slice it first: chunked prefill attention)."""
    return run("combine", settle, x) if isinstance(x, Unsummed) else x


class LayerSegments:
    """The compiled programs of one layer kind, with its structure bound in (no per-call hashing of
    the graph); layer parameters travel as plain dicts of arrays, which flatten fast. Cache arrays
    are a group's stacks [L, B, S, .] donated and updated at slice j. routing_to_host: a decode-sized layer's
    routing programs write its packed routing (`Routing.for_host`) to pinned host memory themselves, so that no
    copy is started after their call (one device; False: copied by `Routing.start_copies`)."""

    def __init__(self, graphdef: nnx.GraphDef, cfg: ModelConfig, routing_to_host: bool = False):
        self.graphdef, self.cfg, self.routing_to_host = graphdef, cfg, routing_to_host
        merge = functools.partial(nnx.merge, graphdef)

        # x_BTD: an array or `Unsummed` (the previous MoE layer's terms, summed here).
        def attention(state, x_BTD, rope, start_B, latent, rp, j):
            return attend_cached(merge(state), settle(x_BTD), rope, start_B, latent, rp, j)

        def dense_layer(state, x_BTD, rope, start_B, latent, rp, j):
            layer = merge(state)
            x_BTD, latent, rp = attend_cached(layer, settle(x_BTD), rope, start_B, latent, rp, j)
            return dense_mlp(layer, x_BTD), latent, rp

        def attention_route(state, x_BTD, rope, start_B, latent, rp, j):
            layer = merge(state)
            x_BTD, latent, rp = attend_cached(layer, settle(x_BTD), rope, start_B, latent, rp, j)
            return x_BTD, routing(layer, x_BTD, routing_to_host), latent, rp

        def attention_route_ahead(state, ahead_state, x_BTD, rope, start_B, latent, rp, j):
            # Also the next MoE layer's router (ahead_state: that layer's arrays) on this layer's residual after
            # attention: its likely experts, a layer before its own routing (the executor's lookahead).
            x_BTD, layer_routing, latent, rp = attention_route(state, x_BTD, rope, start_B, latent, rp, j)
            _, ahead_w_NK, ahead_idx_NK = route(merge(ahead_state), x_BTD)
            return x_BTD, layer_routing, ahead_w_NK, ahead_idx_NK, latent, rp

        self.attention = jax.jit(attention, donate_argnums=(4, 5))
        self.dense_layer = jax.jit(dense_layer, donate_argnums=(4, 5))
        self.attention_route = jax.jit(attention_route, donate_argnums=(4, 5))
        self.attention_route_ahead = jax.jit(attention_route_ahead, donate_argnums=(5, 6))
        self.dense_mlp = jax.jit(lambda state, x_BTD: dense_mlp(merge(state), x_BTD))
        self.route = jax.jit(lambda state, x_BTD: routing(merge(state), x_BTD, routing_to_host))
        self.shared = jax.jit(lambda state, h_ND: shared(merge(state), h_ND))

        def routed_rows(h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity):
            # Routed experts on the tokens that choose them only (rows_A; index N pads): a serving batch's one
            # decoding row among its free slots costs what a batch of one does.
            N = h_ND.shape[0]
            # In pinned host memory where the executor hands them over in place (`indices_in_place`): read here.
            rows_A, ids_C = jax.device_put((rows_A, ids_C), jax.memory.Space.Device)
            h_AD = jnp.take(h_ND, rows_A, axis=0, mode="fill", fill_value=0)
            idx_AK = jnp.take(idx_NK, rows_A, axis=0, mode="fill", fill_value=cfg.n_routed_experts)  # no expert
            w_AK = jnp.take(w_NK, rows_A, axis=0, mode="fill", fill_value=0)
            routed_AD = add_experts(None, h_AD, w_AK, idx_AK, ids_C, experts, capacity=capacity)
            return jnp.zeros((N, routed_AD.shape[1]), routed_AD.dtype).at[rows_A].add(routed_AD, mode="drop")

        def moe_device(state, h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity):
            # Experts still in pinned host memory are moved here, in this program (the executor's `fused_copies`
            # "in_program"); those on the device stay where they are.
            experts = tuple(jax.device_put(experts, jax.memory.Space.Device))
            return shared(merge(state), h_ND), routed_rows(h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity)

        def moe_landed(routed_ND, h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity):
            return routed_ND + routed_rows(h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity)

        # The device's share of the MoE block after routing (the executor's "fused" decode): the shared
        # expert and the chosen experts on the device (resident or just fetched; ids_C -1 pads) for the
        # active tokens rows_A. It runs while the host CPU computes its own share. With the executor's
        # `resident_apart`, where a layer has both resident and streamed experts, `moe_device` takes the
        # resident ones, which need not wait for the link, and `moe_landed` adds the streamed ones to its sum once
        # they have landed (a program starts only when all its inputs are there).
        self.moe_device = jax.jit(moe_device, static_argnames="capacity")
        self.moe_landed = jax.jit(moe_landed, static_argnames="capacity", donate_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def embed_segment(cfg: ModelConfig, embed_VD, tokens_BT, start_B):
    tokens_BT = tokens_BT.reshape(tokens_BT.shape[0], -1).astype(jnp.int32)  # [B] (a decode step) or [B, T]
    start_B = start_B.astype(jnp.int32)
    return embed_VD[tokens_BT], cos_sin(cfg, positions(start_B, tokens_BT.shape[1])), start_B


@functools.partial(jax.jit, static_argnums=2)
def logits_segment(norm_D, head_VD, eps: float, x_BTD):
    return final_logits(norm_D, head_VD, eps, settle(x_BTD))


@functools.partial(jax.jit, static_argnums=2)
def head_segment(norm_D, head_VD, eps: float, x_BTD, last_B, key, sampling):
    """Sample from row last_B[b] of each sequence (x_BTD: an array or `Unsummed`)."""
    x_BTD = settle(x_BTD)
    x_BD = jnp.take_along_axis(x_BTD, last_B.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    return sample_rows(final_logits(norm_D, head_VD, eps, x_BD), key, sampling)


@jax.jit
def mask_routes_segment(idx_NK: jax.Array, active_N: jax.Array, n_experts: int) -> jax.Array:
    """Routes of inactive tokens replaced by n_experts (an id no expert has)."""
    return jnp.where(active_N[:, None], idx_NK, n_experts).astype(idx_NK.dtype)


@jax.jit
def combine_shares_segment(x_BTD, shared_ND, shares_nND):
    """x + shared + the routed experts' f32 shares of the n devices (stacked [n * N, D], split over the
    expert axis): summing the split axis is the all-reduce."""
    N, D = shared_ND.shape
    return combine_segment(x_BTD, shared_ND, (shares_nND.reshape(-1, N, D).sum(0),))


class Segments:
    """Runs compiled segments; with profiling on, waits for each and adds its time to the step's stats.
    watcher (a thread pool, or None): where `watch` waits for arrays without holding up the step."""

    def __init__(self, stats: StepStats, profile: bool, watcher: Executor | None = None):
        self.stats, self.profile, self.watcher = stats, profile, watcher

    def watch(self, what: str, arrays) -> None:
        """With a watcher: (what, now, when `arrays` are ready on the device) into the step's timeline, which
        shows when a layer's transfers land and its device share is computed without waiting on either here."""
        if self.watcher is None or self.profile:
            return
        t = time.perf_counter()
        self.watcher.submit(lambda: (jax.block_until_ready(arrays), self.stats.span(what, t)))

    def __call__(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        if not self.profile:
            out = fn(*args, **kwargs)
            self.stats.span(name, t)  # its dispatch: the calling thread's time
            return out
        out = jax.block_until_ready(fn(*args, **kwargs))
        seg = self.stats.segment_seconds
        seg[name] = seg.get(name, 0.0) + time.perf_counter() - t
        return out
