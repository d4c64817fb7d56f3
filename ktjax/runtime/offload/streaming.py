"""Routed experts held apart from the model: where each lives, and the link path that streams host
experts to the device in chunks, one chunk ahead of their compute.

Prefill-sized batches route to nearly every expert, so they stream whole layers, continuing into
the next MoE layer's first chunk while the current one finishes; decode-sized batches stream only
the experts chosen, computing each as soon as it lands. At most two chunks of experts are on the
device at a time (what the placement plan's workspace holds).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.config import ModelConfig
from ktjax.experts.weights import ExpertWeights
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.segments import Routing
from ktjax.runtime.placement import PlacementPlan


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Above 2 tokens an expert is dequantized, then multiplied: up to this many tokens cost the same (the
# dequantization's memory traffic dominates), so capacities 3 .. MATMUL_MIN_CAPACITY share one compiled variant.
MATMUL_MIN_CAPACITY = 16


def capacity_for(n_tokens: int, counts) -> int:
    """Tokens gathered per expert of a chunk (counts: its experts' token counts): the busiest expert's
    count, 1 or 2 as it is (an expert that one token of a wide batch meets, as a serving batch's masked
    free slots leave it, runs at 1 token, where int8/int4 experts take their in-place form:
    `ktjax.experts.device.MATVEC_FORMS`), larger ones up to a power of two of at least
    MATMUL_MIN_CAPACITY; every token (each expert on all of them, weighted, without the gather) once
    that reaches the batch. Each capacity is a compiled variant, so few of them."""
    capacity = pow2(int(np.max(counts, initial=0)))
    if capacity > 2:
        capacity = max(capacity, MATMUL_MIN_CAPACITY)
    return capacity if capacity < n_tokens else pow2(n_tokens)


def streams_everything(cfg: ModelConfig, n_tokens: int) -> bool:
    """Prefill-sized chunks route to nearly every expert: stream whole layers, ahead of routing."""
    return n_tokens * cfg.num_experts_per_tok >= 2 * cfg.n_routed_experts


def routing_counts(cfg: ModelConfig, layer: int, idx_NK: jax.Array | Routing, stats: StepStats,
                   active_N: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The layer's expert ids on the host (the one device->host sync per MoE layer) and each expert's
    token count, recorded in the step's stats (ids past the last expert, masked tokens, count nowhere).
    active_N (host bools): the tokens whose routes count; the others' ids become n_routed_experts."""
    t = time.perf_counter()
    idx_host = idx_NK.ids_on_host() if isinstance(idx_NK, Routing) else np.asarray(idx_NK)
    stats.span("routing_wait", t)  # the device's work up to the routing, and its copy to the host
    return counted(cfg, layer, idx_host, stats, active_N)


def counted(cfg: ModelConfig, layer: int, idx_host: np.ndarray, stats: StepStats,
            active_N: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`routing_counts` for expert ids already on the host: the ids masked by active_N, and each expert's count."""
    if active_N is not None:
        idx_host = np.where(active_N[:, None], idx_host, cfg.n_routed_experts).astype(idx_host.dtype)
    stats.routed_at.append(time.perf_counter() - stats.started)
    counts = np.bincount(idx_host.ravel(), minlength=cfg.n_routed_experts + 1)[:cfg.n_routed_experts]
    stats.expert_counts[layer] = counts
    return idx_host, counts


MOVES = ("put", "program", "none")  # how `ExpertStore.fetch` moves host experts


@dataclasses.dataclass
class Prefetch:
    """A chunk of the next MoE layer fetched ahead (its transfer overlaps the end of this layer)."""

    layer: int
    ids: list[int]
    arrays: list[ExpertWeights]


class ExpertStore:
    """The routed experts one device owns (`experts[layer][e]`; every expert on one device, None in
    the slots of other devices' experts over several), on the device or in pinned host memory behind
    it as the plan says, and the link path over them. index: the device's place on the expert axis."""

    def __init__(self, cfg: ModelConfig, plan: PlacementPlan, experts: dict[int, list[ExpertWeights | None]],
                 device: jax.Device, index: int = 0):
        self.cfg, self.plan = cfg, plan
        self.index = index
        self.owned = [e for e in range(cfg.n_routed_experts) if plan.owner(e) == index]
        self._hosted = {i: np.array([(i, e) in plan.host_experts for e in range(cfg.n_routed_experts)])
                        for i in cfg.moe_layers}
        self.on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        self.on_host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        # Device experts get the very sharding fetched ones have: a segment's compiled variant is keyed
        # on its arguments' shardings, and a mix of kinds per step would recompile it.
        self.experts = {i: [ex if (i, e) in plan.host_experts else jax.device_put(ex, self.on_device)
                            for e, ex in enumerate(slots)] for i, slots in experts.items()}
        # Host experts moved by one program (`fetch(..., move="program")`): for 3 full-size int4 experts on the H100
        # machine, 84 us of the calling thread against 135 for `jax.device_put`, and landed in 1.60 ms against 1.70
        # (benchmarks/offload.md, run 27). Its copies run on the device's stream of programs, so only where the next
        # program waits for them anyway (a fused layer's); device_put's overlap the programs before them.
        self._moved = jax.jit(lambda arrays: jax.device_put(arrays, self.on_device), out_shardings=self.on_device)

    def is_hosted(self, layer: int, e: int) -> bool:  # the plan, as `hosted_mask` reads it
        return bool(self._hosted[layer][e])

    def hosted_mask(self, layer: int, apart_from: Mapping[int, object] | Sequence[int] = ()) -> np.ndarray:
        """bool [E]: which of the layer's experts are in host memory, those apart_from names (experts already
        fetched) counted as on the device."""
        if not len(apart_from):
            return self._hosted[layer]
        mask = self._hosted[layer].copy()
        mask[list(apart_from)] = False
        return mask

    @functools.cached_property
    def device_pad(self) -> ExpertWeights:
        """An expert's arrays on the device, any layer's (zeros where none is there), for a program's slots that no
        token chooses: the slot must hold an expert's shapes, and one in host memory would cross the link."""
        for i, slots in self.experts.items():
            for e, ex in enumerate(slots):
                if ex is not None and not self.is_hosted(i, e):
                    return ex
        some = next(ex for slots in self.experts.values() for ex in slots if ex is not None)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=self.on_device), some)

    def chunks(self, layer: int, ids: Sequence[int],
               early: Mapping[int, ExpertWeights] | None = None) -> list[list[int]]:
        """Chunks of the plan's size, experts already on the device first (resident, or fetched early: their
        compute need not wait)."""
        early = early or {}
        waits = [self.is_hosted(layer, e) and e not in early for e in ids]
        ordered = [e for e, w in zip(ids, waits) if not w] + [e for e, w in zip(ids, waits) if w]
        size = self.plan.expert_chunk
        return [ordered[k:k + size] for k in range(0, len(ordered), size)]

    def fetch(self, layer: int, ids: Sequence[int], stats: StepStats,
              early: Mapping[int, ExpertWeights] | None = None, move: str = "put") -> list[ExpertWeights]:
        """Start the transfers of a chunk's host experts (asynchronous); device experts as they are, and those
        fetched early (`moe_block.Lookahead`: their arrays in `early`) as they were. move: how host experts reach
        the device, one of MOVES: "put", by `jax.device_put`; "program", as one program, which the device's later
        programs queue behind (see __init__); "none", their pinned arrays as they are, for whatever takes them to
        move them (`segments`' moe_device, `handoff_step`), counted as fetched."""
        if move not in MOVES:
            raise ValueError(f"move={move!r}: use one of {', '.join(MOVES)}")
        early = early or {}
        slots = self.experts[layer]
        hosted = [e for e in ids if self.is_hosted(layer, e) and e not in early]
        moved = []
        if hosted:
            t = time.perf_counter()
            arrays = [slots[e] for e in hosted]
            moved = (arrays if move == "none" else self._moved(arrays) if move == "program"
                     else jax.device_put(arrays, self.on_device))
            stats.span("link_put", t)
        by_id = {**early, **dict(zip(hosted, moved))}
        stats.experts_fetched += len(hosted)
        stats.experts_on_device += sum(not self.is_hosted(layer, e) for e in ids)
        stats.experts_early_used += sum(e in early for e in ids)
        stats.bytes_from_host += sum(slots[e].nbytes for e in hosted)
        return [by_id.get(e, slots[e]) for e in ids]

    def stream(self, layer: int, counts: np.ndarray, n_tokens: int, compute: Callable, acc, stats: StepStats, *,
               ids: Sequence[int] | None = None, group: int = 1, prefetched: list[Prefetch] | None = None,
               started: Callable[[], None] | None = None, stream_all: bool | None = None,
               early: Mapping[int, ExpertWeights] | None = None):
        """acc = compute(acc, ids_C, experts, capacity) over the experts of `layer` that `ids` lists
        (default: every expert for a prefill-sized batch, else those routed to), in groups.

        Host experts are fetched one chunk ahead of the compute, and at most two chunks live on the
        device: no chunk's arrays are referenced here once its compute is issued, and the chunk after
        next is fetched only when that compute is done. Decode computes groups of `group` experts as
        they land; prefill whole chunks.
        prefetched: a list holding at most one `Prefetch`; taken, and refilled with the next MoE
        layer's first chunk. started: called once the first transfer is under way. stream_all:
        whether the chunk is prefill-sized (default: from n_tokens; the caller knows better when
        some tokens route nowhere). early: experts of this layer fetched a layer early (`moe_block.Lookahead`),
        computed from those arrays.
        """
        stream_all = streams_everything(self.cfg, n_tokens) if stream_all is None else stream_all
        if ids is None:
            ids = self.owned if stream_all else [e for e in np.flatnonzero(counts) if self.plan.owner(e) == self.index]
        chunks = self.chunks(layer, [int(e) for e in ids], early)
        ahead = prefetched.pop() if prefetched else None
        if ahead is not None and ahead.layer == layer and chunks and chunks[0] == ahead.ids:
            fetched = ahead.arrays
        else:
            fetched = self.fetch(layer, chunks[0], stats, early) if chunks else []
        del ahead
        if started is not None:
            started()
        group = self.plan.expert_chunk if stream_all else group
        for c, ids_c in enumerate(chunks):
            # Issue the next transfer before this chunk's compute, so the copy engine never idles.
            upcoming = self.fetch(layer, chunks[c + 1], stats, early) if c + 1 < len(chunks) else None
            nxt = self.cfg.next_moe_layer.get(layer)
            if upcoming is None and stream_all and prefetched is not None and nxt is not None:
                if c > 0:
                    jax.block_until_ready(acc)  # the previous chunk's compute done: two chunks on the device
                first = self.chunks(nxt, self.owned)[0]
                prefetched.append(Prefetch(nxt, first, self.fetch(nxt, first, stats)))
            # Few static shapes: slots padded to a power of two (full groups when there are several),
            # capacities powers of two.
            capacity = capacity_for(n_tokens, counts[list(ids_c)])
            size = pow2(len(ids_c)) if len(ids_c) <= group else group
            for g in range(0, len(ids_c), size):
                ids_g, slots = list(ids_c[g:g + size]), tuple(fetched[g:g + size])
                pad = size - len(ids_g)
                slots += (slots[0],) * pad  # padding reuses a fetched array: no transfer
                acc = compute(acc, np.array(ids_g + [-1] * pad, np.int32), slots, capacity)
            del slots, fetched  # drop this chunk's arrays, so they free once its compute is done
            if upcoming is not None and c + 2 < len(chunks):
                jax.block_until_ready(acc)  # bound device memory: at most two chunks in flight
            fetched = upcoming
        return acc
