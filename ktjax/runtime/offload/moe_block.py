"""One MoE layer of the offloaded executor's forward pass: the layer's chosen experts on their paths
(resident on the device, streamed over the link, or computed by the host CPU where they live), split by
`scheduler.split`, beside the shared expert.

Decode-sized layers with few chosen experts take the "fused" form (`fused_moe`: transfers start, the host
CPU computes its share, one program computes the device's); others the "streamed" form (a program per
expert chunk as it lands, dispatched by a worker thread beside the host CPU's kernels). Decode-sized layers
return their output as its terms (`segments.Unsummed`), which the next layer's first program sums. Over
several devices the layer goes to `devices.moe_over_devices`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

from ktjax.experts.device import experts_segment
from ktjax.experts.weights import ExpertWeights
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.devices import moe_over_devices
from ktjax.runtime.offload.host_path import HostPath
from ktjax.runtime.offload.scheduler import early_fetches, split
from ktjax.runtime.offload.segments import (FUSED_MAX_TOKENS, LayerSegments, Routing, Segments, Unsummed,
                                            combine_segment, mask_routes_segment)
from ktjax.runtime.offload.streaming import Prefetch, capacity_for, pow2, routing_counts, streams_everything

if TYPE_CHECKING:
    from ktjax.runtime.offload.executor import OffloadedExecutor

FUSED_MAX_EXPERTS = 8  # batch 1's; more in one program compiled slowly and each variant is a compile


@dataclasses.dataclass
class Lookahead:
    """A decode step's experts fetched one MoE layer early (`OffloadedExecutor.lookahead` per layer): the next
    MoE layer's router, applied to this layer's residual after attention, names its likely experts, and their
    transfers queue behind this layer's own, where the link would idle while the host CPU, attention and
    routing run. Those the next layer then chooses are on the device by then; the others were wasted link time.
    The same experts are computed; only where changes (as with any split: with int8 host activations, an expert
    the device computes instead of the host CPU loses that path's ~0.5% rounding).

    experts: the most fetched per layer; fetched: per layer, the experts fetched early and their device arrays.
    A layer's guess (`Guess`) comes with its routing."""

    experts: int
    fetched: dict[int, dict[int, ExpertWeights]] = dataclasses.field(default_factory=dict)


# A layer's guess at the next MoE layer's experts: (that layer, its routing weights and expert ids [N, K] on this
# layer's residual after attention).
Guess = tuple[int, jax.Array, jax.Array]


def moe_block(ex: OffloadedExecutor, i: int, seg: LayerSegments, state, x_BTD, routing: Routing,
              prefetched: list[list[Prefetch]], stats: StepStats, run: Segments, active_N: np.ndarray | None = None,
              lookahead: Lookahead | None = None, guess: Guess | None = None):
    """The MoE block of layer i: its routing brought to the host, then the shared expert and the chosen experts
    on their paths, in the fused form (`fused_moe`) or the streamed one (`streamed_moe`), or over several devices
    (`devices.moe_over_devices`); its output unsummed where it is decode-sized on one device, else summed.
    active_N: the tokens whose experts are chosen (None: all); the others may meet a chosen expert but
    never bring one in. lookahead: experts fetched a layer early; guess: this layer's at the next one's (decode-sized
    layers; prefill-sized ones, which stream whole layers, drop both)."""
    cfg = ex.config
    h_ND, w_NK, idx_NK = routing.h_ND, routing.w_NK, routing.idx_NK
    early = lookahead.fetched.pop(i, {}) if lookahead is not None else {}
    if ex.mesh is not None:
        if active_N is not None:  # inactive tokens routed to expert E, which no chunk holds
            idx_NK = run("mask_routes", mask_routes_segment, idx_NK, active_N, cfg.n_routed_experts)
        return moe_over_devices(ex, i, seg, state, x_BTD, h_ND, w_NK, idx_NK, prefetched, stats, run)
    prefetched = prefetched[0]
    N = h_ND.shape[0]
    n_active = N if active_N is None else int(active_N.sum())
    stream_all = streams_everything(cfg, n_active)
    everything = stream_all and ex.expert_compute != "cpu"
    host = None if everything else ex.host
    routing.start_copies(host_inputs=host is not None)  # queued behind the routing: no host round trip before it
    if guess is not None:
        for a in guess[1:]:  # behind this layer's own routing, which the host waits for first
            a.copy_to_host_async()
    moved_before = stats.bytes_from_host
    idx_host, counts = routing_counts(cfg, i, routing, stats, active_N)  # masked here, on the host
    if (ex.fuses_decode and not everything and N <= FUSED_MAX_TOKENS
            and np.count_nonzero(counts) <= FUSED_MAX_EXPERTS):
        x_BTD = fused_moe(ex, i, seg, state, x_BTD, routing, idx_host, counts, host, stats, run, active_N,
                          lookahead, guess, early)
    else:
        x_BTD = streamed_moe(ex, i, seg, state, x_BTD, routing, idx_host, counts, host, stats, run,
                             active_N, prefetched, stream_all, lookahead, guess, early)
    stats.link_bytes.append(stats.bytes_from_host - moved_before)
    return x_BTD


def streamed_moe(ex: OffloadedExecutor, i: int, seg: LayerSegments, state, x_BTD, routing: Routing, idx_host,
                 counts, host: HostPath | None, stats: StepStats, run: Segments, active_N: np.ndarray | None,
                 prefetched: list[Prefetch], stream_all: bool, lookahead: Lookahead | None, guess: Guess | None,
                 early: dict[int, ExpertWeights]):
    """A MoE layer's device share as its experts land, a program per chunk (`ExpertStore.stream`), beside the
    host CPU's share where it has one (the worker thread dispatches the device's work meanwhile); the shared
    expert while the first transfer runs. Prefill-sized layers stream every expert (stream_all) and return
    the layer's output summed; decode-sized ones return its terms (`segments.Unsummed`)."""
    cfg = ex.config
    h_ND, w_NK, idx_NK = routing.h_ND, routing.w_NK, routing.idx_NK
    N = h_ND.shape[0]
    if active_N is not None:  # on the device too: inactive tokens routed to expert E, which no chunk holds
        idx_NK = run("mask_routes", mask_routes_segment, idx_NK, active_N, cfg.n_routed_experts)
    shared = []

    def run_shared():
        shared.append(run("shared_expert", seg.shared, state, h_ND))

    def compute(acc, ids_C, slots, capacity):
        return run("experts", experts_segment, acc, h_ND, w_NK, idx_NK, ids_C, slots, capacity=capacity)

    if stream_all:  # whole layers stream: nothing fetched early is of use, nor is a guess at the next layer
        early, guess = {}, None
    rows = active_rows(active_N, N) if guess is not None else None  # whom the guess is for
    resident, cpu_ids, link_ids = paths(ex, i, counts, host, early)
    if host is None:
        on_gpu = ex.store.stream(i, counts, N, compute, None, stats, prefetched=prefetched, started=run_shared,
                                 stream_all=stream_all, early=early)
        look_ahead(ex, lookahead, guess, rows, stats, counts[cpu_ids], len(link_ids))
        on_host = None
    else:
        gpu_ids = resident + link_ids
        # The host kernels run on this thread (numba's parallel loops measured 52 GB/s here
        # against 36 from a worker thread, benchmarks/host_experts.md); the worker dispatches
        # the layer's GPU work meanwhile (asynchronous, so it is queued well before the CPU is done).
        then = functools.partial(look_ahead, ex, lookahead, guess, rows, stats, counts[cpu_ids], len(link_ids))
        job = ex.dispatcher.submit(gpu_part, ex, i, counts, N, compute, stats, gpu_ids, run_shared, stream_all, early,
                                   then)
        on_host = host_share(ex, i, cpu_ids, idx_host, routing, stats) if cpu_ids else None
        on_gpu = joined(job, stats)
    if N > FUSED_MAX_TOKENS:  # prefill-sized: summed here (zeros standing for a missing term would cost a transfer)
        return run("combine", combine_segment, x_BTD, shared[0], tuple(p for p in (on_gpu, on_host) if p is not None))
    return Unsummed(x_BTD, shared[0], ex.zeros(h_ND.shape) if on_gpu is None else on_gpu,
                    ex.no_host_share(h_ND.shape) if on_host is None else on_host)


def gpu_part(ex: OffloadedExecutor, i: int, counts, N: int, compute, stats: StepStats, gpu_ids: list[int], run_shared,
             stream_all: bool | None = None, early: dict[int, ExpertWeights] | None = None,
             then: Callable[[], None] | None = None) -> jax.Array | None:
    """A MoE layer's device work beside the host CPU's: the shared expert, and the chosen experts
    that are resident, fetched early or streamed (their f32 sum; None when there are none); then `then`, once
    the layer's transfers are queued."""
    if not gpu_ids:
        run_shared()
        out = None
    else:
        out = ex.store.stream(i, counts, N, compute, None, stats, ids=gpu_ids, started=run_shared,
                              stream_all=stream_all, early=early)
    if then is not None:
        then()
    return out


def fused_moe(ex: OffloadedExecutor, i: int, seg: LayerSegments, state, x_BTD, routing: Routing, idx_host, counts,
              host: HostPath | None, stats: StepStats, run: Segments, active_N: np.ndarray | None = None,
              lookahead: Lookahead | None = None, guess: Guess | None = None,
              early: dict[int, ExpertWeights] | None = None):
    """A decode-sized MoE layer's device share in one program after routing: the streamed experts' transfers
    start (one program, the executor's `fused_copies` "program"; or `moe_device` moves them itself, "in_program"),
    then `moe_device` computes them with the shared expert and the resident experts once they have landed. With the
    executor's `resident_apart` (and both kinds in the layer), `moe_device` takes only the resident ones, which
    need not wait for the link, and `moe_landed` adds the streamed ones once they have landed. Where the host CPU
    has a share, the worker thread dispatches these (or, "in_program_here", this thread before the host kernels),
    and they run while this thread computes the host's. Few programs per MoE layer whatever the experts' number (a
    dispatch costs ~0.25 ms of this thread, offload.md run 8, more than a decode-sized expert's compute); the next
    layer's first program sums. early: this layer's experts the previous one fetched (`Lookahead`), which count as
    resident."""
    early = early or {}
    h_ND, w_NK, idx_NK = routing.h_ND, routing.w_NK, routing.idx_NK
    t = time.perf_counter()
    resident, cpu_ids, link_ids = paths(ex, i, counts, host, early)
    stats.span("split", t)
    # The active tokens (all when active_N is None), padded to a power of two with row N (none).
    N = h_ND.shape[0]
    rows = active_rows(active_N, N)

    # The link experts moved by the device share's own program (the executor's `fused_copies` "in_program..."),
    # where one program computes them: one call fewer.
    in_program = ex.fused_copies.startswith("in_program") and not (ex.resident_apart and resident and link_ids)

    def start_transfers() -> tuple[ExpertWeights, ...]:
        # Asynchronous: the link works from here. As one program, where the device share waits for them all.
        landing = tuple(ex.store.fetch(i, link_ids, stats, move="none" if in_program else
                                       "program" if ex.fused_copies == "program" else "put"))
        if not in_program:
            run.watch("landed", landing)
        return landing

    def device_share(landing: tuple[ExpertWeights, ...]):
        resident_slots = tuple(ex.store.fetch(i, resident, stats, early))
        # The device's programs, each (expert ids, their arrays): the first also computes the shared expert.
        programs = ([(resident, resident_slots), (link_ids, landing)] if ex.resident_apart and resident and link_ids
                    else [(resident + link_ids, resident_slots + landing)])
        rows_A = np.full(pow2(len(rows)), N, np.int32)
        rows_A[:len(rows)] = rows
        (ids, slots), *landed = programs
        ids_C, slots_C = (padded_apart(resident, resident_slots, link_ids, landing, ex.store.device_pad)
                          if in_program else padded(ids, slots))
        capacity = capacity_for(len(rows_A), counts[ids])
        shared_ND, routed_ND = run("moe_device", seg.moe_device, state, h_ND, w_NK, idx_NK,
                                   *indices(ex, rows_A, ids_C), slots_C, capacity=capacity)
        for ids, slots in landed:
            routed_ND = run("moe_landed", seg.moe_landed, routed_ND, h_ND, w_NK, idx_NK, rows_A, *padded(ids, slots),
                            capacity=capacity_for(len(rows_A), counts[ids]))
        run.watch("device_share", routed_ND)
        # The next layer's likely experts: their transfers queue behind `landing`; where the worker runs this (the
        # host CPU has a share, and not "in_program_here"), its dispatch does not hold up the host kernels.
        look_ahead(ex, lookahead, guess, rows, stats, counts[cpu_ids], len(link_ids))
        return shared_ND, routed_ND

    if not cpu_ids:  # zeros for the host's share, not None: one compiled variant of the next program
        return Unsummed(x_BTD, *device_share(start_transfers()), ex.no_host_share(h_ND.shape))
    if in_program and ex.fused_copies == "in_program_here":  # called before the host kernels: no worker
        on_device = device_share(start_transfers())
        return Unsummed(x_BTD, *on_device, host_share(ex, i, cpu_ids, idx_host, routing, stats))
    # The transfers start here, before the host kernels: started by the worker instead, the host kernels began 0.3 ms
    # sooner but ran longer beside it, and the transfers landed later (benchmarks/offload.md, run 24).
    on_gpu = ex.dispatcher.submit(device_share, start_transfers())
    host_ND = host_share(ex, i, cpu_ids, idx_host, routing, stats)
    return Unsummed(x_BTD, *joined(on_gpu, stats), host_ND)


def indices(ex: OffloadedExecutor, rows_A: np.ndarray, ids_C: np.ndarray) -> tuple:
    """A fused device program's rows and expert ids as it takes them: in pinned buffers it reads in place where the
    executor says so (`indices_in_place`), else the numpy arrays. Not where resident experts may run apart (a second
    program's ids could take a buffer of the same ring before the first program has read it)."""
    if not ex.indices_in_place or ex.resident_apart:
        return rows_A, ids_C
    return ex.index_landing.put(rows_A), ex.index_landing.put(ids_C)


def paths(ex: OffloadedExecutor, i: int, counts, host: HostPath | None,
          early: dict[int, ExpertWeights]) -> tuple[list[int], list[int], list[int]]:
    """Layer i's chosen experts (counts: tokens per expert) by path: (on the device already, resident or fetched
    early; for the host CPU; for the link). `scheduler.split` divides the host experts between the last two where
    the host CPU computes (host), else the link takes them all."""
    cpu_ids, on_device, n = split(counts, ex.store.hosted_mask(i, apart_from=early), ex.plan.expert_bytes, ex.rates,
                                  ex.expert_compute if host is not None else "gpu")
    return on_device[:n].tolist(), cpu_ids.tolist(), on_device[n:].tolist()


def active_rows(active_N: np.ndarray | None, N: int) -> np.ndarray:
    """The rows of the N tokens whose experts are chosen (active_N None: all)."""
    return np.arange(N) if active_N is None else np.flatnonzero(active_N)


def look_ahead(ex: OffloadedExecutor, lookahead: Lookahead | None, guess: Guess | None, rows: np.ndarray | None,
               stats: StepStats, cpu_tokens: np.ndarray, n_link: int) -> None:
    """Where this layer guessed the next one's experts, fetch the likeliest early (`Lookahead`), for the active
    tokens `rows`: as many as the link has room for beside this layer's share (`scheduler.early_fetches`;
    cpu_tokens: the tokens of each expert the host CPU computes here, n_link: the experts the link carries here)."""
    if lookahead is not None and guess is not None:
        most = early_fetches(ex.rates, ex.plan.expert_bytes, cpu_tokens, n_link, lookahead.experts)
        lookahead.fetched[guess[0]] = fetch_ahead(ex, guess, rows, stats, most)


def fetch_ahead(ex: OffloadedExecutor, guess: Guess, rows: np.ndarray, stats: StepStats,
                most: int, move: str = "put") -> dict[int, ExpertWeights]:
    """Start the transfers of the next MoE layer's `most` likeliest host experts (`Lookahead`, `likeliest`), counted
    as fetched early; move: as `ExpertStore.fetch` ("none": only counted, for the caller to copy)."""
    likely = likeliest(ex, guess, rows, most)
    stats.experts_early += len(likely)
    return dict(zip(likely, ex.store.fetch(guess[0], likely, stats, move=move)))


def likeliest(ex: OffloadedExecutor, guess: Guess, rows: np.ndarray, most: int) -> list[int]:
    """The next MoE layer's `most` likeliest host experts by its guess: the largest summed routing weight over the
    active tokens `rows`, among those it keeps in host memory."""
    j, w_NK, idx_NK = guess
    E = ex.config.n_routed_experts
    idx_R, w_R = np.asarray(idx_NK)[rows].ravel(), np.asarray(w_NK, np.float64)[rows].ravel()
    score_E = np.bincount(idx_R, weights=w_R, minlength=E)[:E]
    likely = [int(e) for e in np.argsort(-score_E, kind="stable") if score_E[e] > 0 and ex.store.is_hosted(j, e)]
    return likely[:most]


def padded(ids: list[int], slots: tuple) -> tuple[np.ndarray, tuple]:
    """A fused program's expert ids and their arrays (one each) padded to `fused_slots` (id -1, a fetched array
    reused; each still costs its compute where XLA's path runs). Few compiled variants: each is a compile the first
    time a step meets it, a serving batch's stall."""
    return padded_apart(ids, slots, [], (), None)


def padded_apart(device_ids: list[int], on_device: tuple, host_ids: list[int], on_host: tuple,
                 pad: ExpertWeights | None) -> tuple[np.ndarray, tuple]:
    """As `padded`, for a program that moves the experts still in host memory itself: the device's experts and
    pads (the first of them, else `pad`, an expert on the device) first, the host's last, so that a program's variant
    is keyed by its slots and how many it moves (a compile each, `compile_fused`), not also by how many of the rest
    are pads."""
    n = len(device_ids) + len(host_ids)
    pads = fused_slots(n) - n if n else 0
    return (np.array(device_ids + [-1] * pads + host_ids, np.int32),
            on_device + (on_device[0] if on_device else pad,) * pads + on_host)


def fused_slots(n: int) -> int:
    """The expert slots of a fused MoE program for n chosen experts: 2, 4 or 8 up to FUSED_MAX_EXPERTS,
    powers of two beyond. Each variant is a compile that a serving batch meets mid-stream the first time
    (bench_serve run 4: 1-2 s stalls with six slot sizes), so few sizes. A padded slot costs nothing where
    the expert kernels run (they skip a slot no token chose); XLA's path computes it (~60 us for a
    full-size int4 expert at one token)."""
    return max(2, pow2(n))


def host_share(ex: OffloadedExecutor, i: int, cpu_ids: list[int], idx_host, routing: Routing,
               stats: StepStats) -> jax.Array | np.ndarray:
    """Layer i's experts cpu_ids computed by the host CPU on this thread (timed into stats): their sum, in host
    memory. Decode-sized, in a pinned buffer that the program adding it reads in place (`host_path.ShareLanding`);
    larger, a numpy array, which that program's call moves."""
    t = time.perf_counter()
    w_NK, h_ND = routing.inputs_on_host()  # their copies were started after routing
    stats.span("host_inputs", t)
    out_ND = host_sum(ex, i, cpu_ids, idx_host, w_NK, h_ND, stats)
    return ex.host.landing.put(out_ND) if out_ND.shape[0] <= FUSED_MAX_TOKENS else out_ND


def host_sum(ex: OffloadedExecutor, i: int, cpu_ids: list[int], idx_host, w_NK, h_ND, stats: StepStats) -> np.ndarray:
    """Layer i's experts cpu_ids computed by the host CPU on this thread from its routing on the host, timed into
    stats: their weighted sum [N, D] float32."""
    t = time.perf_counter()
    out_ND = ex.host.compute(i, cpu_ids, idx_host, w_NK, h_ND)
    stats.host_cpu_seconds.append(time.perf_counter() - t)
    stats.span("host_share", t)
    stats.experts_on_host_cpu += len(cpu_ids)
    return out_ND


def joined(job, stats: StepStats):
    """The worker's result (the device's share of a layer, dispatched), its wait in the timeline."""
    t = time.perf_counter()
    out = job.result()
    stats.span("join", t)
    return out
