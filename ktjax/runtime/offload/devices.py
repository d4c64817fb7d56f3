"""The offloaded executor over several devices (a mesh with an `expert` axis, `ktjax.runtime.mesh`):
the core segments run on replicated arrays, each device streams and computes the chosen experts it
owns from its own `ExpertStore` (its resident experts, and host experts in pinned memory behind it),
and one program sums the devices' shares (an all-reduce)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ktjax.experts.device import experts_segment
from ktjax.experts.weights import ExpertWeights
from ktjax.models.moe import EXPERT_AXIS
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.segments import LayerSegments, Segments, combine_shares_segment
from ktjax.runtime.offload.streaming import Prefetch, routing_counts, streams_everything
from ktjax.runtime.placement import PlacementPlan

if TYPE_CHECKING:
    from ktjax.runtime.offload.executor import OffloadedExecutor


def owned_by(experts: dict[int, list[ExpertWeights]], plan: PlacementPlan, device: int) -> dict[int, list]:
    """The experts `device` owns (None in the slots of other devices' experts)."""
    return {i: [ex if plan.owner(e) == device else None for e, ex in enumerate(slots)] for i, slots in experts.items()}


def shard_on(a: jax.Array, device: jax.Device) -> jax.Array:
    """The copy of a replicated array that lives on `device` (no transfer)."""
    return next(s.data for s in a.addressable_shards if s.device == device)


def moe_over_devices(ex: OffloadedExecutor, i: int, seg: LayerSegments, state, x_BTD, h_ND, w_NK, idx_NK,
                      prefetched: list[list[Prefetch]], stats: StepStats, run: Segments):
    """The MoE block of layer i on several devices: each device streams and computes the chosen
    experts it owns on its own copy of the tokens (prefill-sized batches: every expert it owns,
    its next layer's first chunk fetched ahead); the combine sums the devices' shares."""
    cfg = ex.config
    N, D = h_ND.shape
    moved_before = stats.bytes_from_host
    _, counts = routing_counts(cfg, i, idx_NK, stats)
    shared_ND = run("shared_expert", seg.shared, state, h_ND)
    # One thread per device: a device's stream waits on its own transfers (at most two chunks in
    # flight), never on another device's. Each keeps its own stats, added up below.
    own = [StepStats() for _ in ex.devices]
    jobs = [ex.device_threads.submit(_device_share, ex, i, d, counts, (h_ND, w_NK, idx_NK), prefetched[d],
                                       own[d], Segments(own[d], run.profile)) for d in range(len(ex.devices))]
    shares = [job.result() for job in jobs]
    for s in own:
        stats.add(s)
    stats.link_bytes.append(stats.bytes_from_host - moved_before)
    split = jax.sharding.NamedSharding(ex.mesh, jax.sharding.PartitionSpec(EXPERT_AXIS))
    stacked = jax.make_array_from_single_device_arrays((len(shares) * N, D), split, shares)
    return run("combine", combine_shares_segment, x_BTD, shared_ND, stacked)

def _device_share(ex: OffloadedExecutor, i: int, d: int, counts, tokens: tuple, prefetched: list[Prefetch], stats: StepStats,
                  run: Segments) -> jax.Array:
    """Device d's share of layer i's routed experts, f32 [N, D] on device d: the chosen experts it
    owns (every one for prefill-sized batches) on its own copy of h, weights and ids."""
    device, store = ex.devices[d], ex.stores[d]
    N, D = tokens[0].shape
    every = streams_everything(ex.config, N)
    owned = [e for e in store.owned if every or counts[e]]
    if not owned:
        return jnp.zeros((N, D), jnp.float32, device=device)
    local = [shard_on(a, device) for a in tokens]

    def compute(acc, ids_C, slots, capacity):
        return run("experts", experts_segment, acc, *local, ids_C, slots, capacity=capacity)

    return store.stream(i, counts, N, compute, None, stats, ids=owned, prefetched=prefetched)
