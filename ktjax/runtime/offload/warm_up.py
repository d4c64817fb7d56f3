"""The decode warm-up of the offloaded executor's MoE layers (`OffloadedExecutor.compile_decode`): every program
variant a decode step of N rows can meet by its routing and split, run once on zeros, so that a server's streams
never wait for one to compile mid-stream."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from ktjax.experts.device import experts_segment
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.moe_block import FUSED_MAX_EXPERTS, fused_slots, indices, padded_apart
from ktjax.runtime.offload.segments import mask_routes_segment
from ktjax.runtime.offload.streaming import capacity_for, pow2, streams_everything

if TYPE_CHECKING:
    from ktjax.runtime.offload.executor import OffloadedExecutor


def compile_fused(ex: OffloadedExecutor, N: int = 1) -> int:
    """Run every fused program a decode step of N rows (all in use) can meet once, so that none compiles
    mid-stream (none where N rows would choose more than twice `FUSED_MAX_EXPERTS` experts, the fused form's most,
    if no two chose the same): `moe_device` at each capacity and expert-slot count (none, 2, 4, 8), after the
    transfers of 1 to 8 host experts as one program (the executor's `fused_copies` "program"), or with
    "in_program..." at each number of them it moves from pinned host memory (`padded_apart`: each is a variant);
    `moe_landed` at each of its own where resident experts run apart (`resident_apart`). A step meets these by its
    routing and split, so a server's first steps would otherwise stall every stream for a compile now and then (~1 s
    each on the H200: bench_serve run 12); the programs around them (attention with the previous layer's terms, the
    head) every step meets. Zeros in, outputs dropped. Returns the number of programs run."""
    cfg = ex.config
    if not ex.fuses_decode or ex.mesh is not None or not cfg.moe_layers:
        return 0
    K = cfg.num_experts_per_tok
    if N * K > 2 * FUSED_MAX_EXPERTS:  # its rows rarely choose few enough experts for these
        return 0
    i, seg, state, h_ND, w_NK, idx_NK = zero_routing(ex, N)
    rows_A = np.arange(pow2(N), dtype=np.int32)
    stats, n = StepStats(), 0
    hosted = [e for e in range(cfg.n_routed_experts) if ex.store.is_hosted(i, e)][:FUSED_MAX_EXPERTS]
    slot_counts = sorted({fused_slots(k) for k in range(1, FUSED_MAX_EXPERTS + 1)})  # 2, 4, 8

    def moe_device(ids_C, slots, then_landed: bool):
        nonlocal n
        capacities = {capacity_for(len(rows_A), [c]) for c in (1, 2, N)} if len(ids_C) else {capacity_for(N, [])}
        for capacity in sorted(capacities):
            _, routed_ND = jax.block_until_ready(seg.moe_device(state, h_ND, w_NK, idx_NK,
                                                                *indices(ex, rows_A, ids_C), slots,
                                                                capacity=capacity))
            n += 1
            if then_landed:  # a layer's streamed experts, beside resident ones
                jax.block_until_ready(seg.moe_landed(routed_ND, h_ND, w_NK, idx_NK, rows_A, ids_C, slots,
                                                     capacity=capacity))
                n += 1

    if ex.fused_copies.startswith("in_program"):
        moe_device(np.zeros(0, np.int32), (), False)
        for S in slot_counts:
            for moved in range(min(S, len(hosted)) + 1):  # any experts: only their shapes and places matter
                ids = [e % cfg.n_routed_experts for e in range(S - moved)]
                moe_device(*padded_apart(ids, tuple(ex.store.fetch(i, ids, stats)), hosted[:moved],
                                         tuple(ex.store.fetch(i, hosted[:moved], stats, move="none")),
                                         ex.store.device_pad), False)
    if not ex.fused_copies.startswith("in_program") or ex.resident_apart:
        if ex.fused_copies == "program":  # a layer's transfers as one program, for each number of them
            for k in range(1, len(hosted) + 1):
                jax.block_until_ready(ex.store.fetch(i, hosted[:k], stats, move="program"))
                n += 1
        for S in [0] + slot_counts:
            ids = [e % cfg.n_routed_experts for e in range(S)]
            moe_device(np.array(ids, np.int32), tuple(ex.store.fetch(i, ids, stats)), bool(S) and ex.resident_apart)
    return n


def compile_streamed(ex: OffloadedExecutor, N: int) -> int:
    """Run every program a decode step of N rows can meet in the streamed form once (`streamed_moe`: where the
    fused form does not apply, or its rows choose more experts than it holds): the routes of rows not in use
    masked, the shared expert, and one expert at each capacity N tokens can take, first and added to a sum. A step
    meets these by its routing: at 3 rows of the embedded model's 4-slot batch the mask and two of them compiled
    mid-stream (0.02-0.3 s each on the dev box, `jax_log_compiles` in an inline check of 2026-12-05), every stream
    waiting. Zeros in, outputs dropped. Returns the number of programs run."""
    cfg = ex.config
    K = cfg.num_experts_per_tok
    if ex.mesh is not None or not cfg.moe_layers or streams_everything(cfg, N):
        return 0
    if ex.fuses_decode and N * K <= FUSED_MAX_EXPERTS:  # the fused form holds whatever its rows choose
        return 0
    i, seg, state, h_ND, w_NK, idx_NK = zero_routing(ex, N)
    n = 1
    jax.block_until_ready(seg.shared(state, h_ND))
    if N > 1:  # a batch with rows not in use
        jax.block_until_ready(mask_routes_segment(idx_NK, np.arange(N) > 0, cfg.n_routed_experts))
        n += 1
    slots, ids_C = tuple(ex.store.fetch(i, [0], StepStats())), np.zeros(1, np.int32)
    for capacity in sorted({capacity_for(N, [c]) for c in range(1, N + 1)}):
        acc = None
        for _ in range(2):  # a layer's first expert, then one added to the sum
            acc = experts_segment(acc, h_ND, w_NK, idx_NK, ids_C, slots, capacity=capacity)
            n += 1
        jax.block_until_ready(acc)
    return n


def zero_routing(ex: OffloadedExecutor, N: int):
    """(the first MoE layer, its segments and arrays, zeros for h [N, D], routing weights and expert ids [N, K] on
    the device): what the warm-ups run that layer's programs on."""
    cfg, on = ex.config, ex.store.on_device
    i = cfg.moe_layers[0]
    K = cfg.num_experts_per_tok
    zeros = (np.zeros((N, cfg.hidden_size), ex.dtype), np.zeros((N, K), np.float32), np.zeros((N, K), np.int32))
    return (i, ex.segments[cfg.layer_kinds[i]], ex.layers[i], *(jax.device_put(z, on) for z in zeros))

