"""A small batch's decode step launched whole, each MoE layer's program waiting on its stream for the host CPU
(the executor's decode_form "handoff"; `handoff.Handoff`).

The fused form (`moe_block.fused_moe`) drives each MoE layer from Python: the attention program's call, the
routing's way to the host, the copies' and the device share's calls, ~1 ms of a ~3 ms R1-share layer outside the
experts' two paths (benchmarks/offload.md, runs 26-41). Here a launching thread calls every layer's program at once,
and each MoE layer's program hands its routing to the host, waits for the device's experts the host copies into its
own buffers (resident ones from device memory first, then the link's from pinned host memory; `Handoff.fill`),
computes the resident ones while the link's land and then the link's, with the shared expert, then waits for the
host CPU's share. This thread serves the layers in turn: it reads a layer's routing, splits its experts as the fused
form does (`scheduler.split`), queues the copies, computes the host's share and answers. No program call, callback
or round trip of the step's thread sits on a layer's path.

Up to MAX_ROWS rows: the programs are launched before any routing is known, so each holds a slot for every expert
its rows may choose (`HandoffLayers.slots`; the kernels skip those the host leaves empty) and computes each row
through each slot's expert, weighted. One device, with a host path (int8/int4 experts).

With the executor's lookahead (`moe_block.Lookahead`), each layer's program also hands over the next MoE layer's
router applied to its residual, and the host, its own copies queued, copies the likeliest of that layer's host experts
into device buffers of its own (`HandoffLayers.early`) while the link would otherwise idle: through the host CPU's
share, the device's work after it and the next layer's attention and routing. The next layer's fill copies those of
them it chose from there, on the device, as it does resident experts.
"""

from __future__ import annotations

import functools
import time
from concurrent import futures
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from numba import njit

from ktjax.experts.device import add_slot_experts
from ktjax.kernels import expert_path
from ktjax.models import KVCache, LayerCache
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.handoff import SIDE_EFFECT, Handoff
from ktjax.runtime.offload.moe_block import active_rows, fetch_ahead, host_sum
from ktjax.runtime.offload.scheduler import HANDOFF_LOOKAHEAD_WINDOW_S, early_fetches, split
from ktjax.runtime.offload.segments import (Segments, Unsummed, attend_cached, embed_segment, packed, route, routing,
                                            settle, shared, unpacked)
from ktjax.runtime.offload.streaming import counted

if TYPE_CHECKING:
    from ktjax.runtime.offload.executor import OffloadedExecutor

Sources = list[tuple[int, int]]  # an expert's arrays as copies read them: (address, bytes) each
MAX_ROWS = 4  # decode rows a step may have in this form (its programs hold a slot for every expert its rows choose)
WITHOUT_GRAPHS = {"xla_gpu_enable_command_buffer": ""}  # XLA's option: a program's kernels launched one by one


class HandoffLayers:
    """The executor's MoE layers in the handoff form: a program per layer kind and number of rows N, bound to one
    `Handoff`, whose slots hold the rows' routing ([N, D + 2K] float32: h, weights, the ids' bits; with a guess at
    the next layer's, [N, D + 4K]) one way and their host share ([N, D] float32) the other."""

    def __init__(self, ex: OffloadedExecutor):
        cfg = ex.config
        D, K = cfg.hidden_size, cfg.num_experts_per_tok
        # A step's launch runs ahead of the host by up to all its MoE layers' hand-overs.
        self.handoff = Handoff(ex.devices[0], slot_bytes=4 * MAX_ROWS * (D + 4 * K),
                               slots=max(64, 2 * len(cfg.moe_layers)))
        self.leaves, self.treedef = jax.tree.flatten(ex.store.device_pad)
        self.leaf_bytes = np.array([a.nbytes for a in self.leaves], np.int64)  # an expert's arrays, a slot of each
        # The device's experts through the kernels wherever they run (int8's too, which "auto" gives XLA's path): a
        # batch-1 layer fills 1-5 of its 8 slots at R1's share, and the kernels skip the rest where XLA's path
        # computes all 8 (~50-60 us each on the H200, benchmarks/kernels.md). Unmeasured in a step: bench_offload's
        # --r1-variants handoff+xla-experts runs XLA's path. Unfilled slots hold garbage; either path adds nothing
        # from them (`add_slot_experts`).
        fmt = ex.plan.expert_format
        covered = expert_path(np.zeros((1, D), ex.dtype), fmt.name, fmt.F, fmt.D, impl="pallas") == "pallas"
        self.expert_impl = "pallas" if covered and ex.devices[0].platform == "gpu" else None
        self.graphdefs = {kind: seg.graphdef for kind, seg in ex.segments.items() if kind != "dense"}
        self.K, self.n_experts = K, cfg.n_routed_experts
        self.programs: dict[tuple[str, int], Callable] = {}  # (layer kind, rows): made on the launching thread
        self.side_effect = SIDE_EFFECT  # the handoff's calls declared so (a benchmark's variant flips it)
        self.donate_cache = True  # the layer's cache arrays given to its program (a benchmark's variant keeps them)
        # XLA's options for the programs: their kernels launched one by one, not as CUDA graphs. At full size that
        # was as fast or faster in 7 of 8 comparisons within one process (int4 8.98 against 9.20 ms, int8 13.68
        # against 13.98 at R1's share on a fast host; int4 14.50 against 16.22 on a slow one), with first steps
        # 0.3-0.8 s shorter (offload.md runs 69-71; within noise in run 47). The embedded model's one row decoded
        # 18% slower warm (369 against 448 tokens/s), its first token 4 s sooner (run 71). A benchmark's variant
        # (`graphs`) turns the graphs back on.
        self.compiler_options: dict | None = WITHOUT_GRAPHS
        # Whether a layer's copies are queued by a thread of their own while the host CPU's share starts (the fill
        # took ~0.13 ms a layer then): no gain in run 50 (11.94 against 11.80 ms), off.
        self.fill_apart = False
        # Whether a layer's experts already on the device land as the fill's first part, computed while the link's
        # land (run 54's trace: all after the link's last copy, ~0.4 ms); a benchmark's variant turns it off.
        self.resident_first = True
        self._source_tables: dict[int, np.ndarray] = {}
        self.experts = ex.store.experts
        self._early: list[tuple[list[jax.Array], Sources]] = []  # the lookahead's buffers: an expert's arrays each
        self.device = ex.devices[0]
        self._states: dict[int, dict] = {}
        self._zeros: dict[int, Unsummed] = {}

    @functools.cached_property
    def filler(self) -> futures.ThreadPoolExecutor:  # the copies' thread (`fill_apart`)
        return futures.ThreadPoolExecutor(1, thread_name_prefix="ktjax-handoff-fill")

    def state(self, ex: OffloadedExecutor, i: int) -> dict:
        """Layer i's arrays, committed to the device (the same buffers). A jitted program is compiled again for
        arguments committed where they were not before (run 45: 3 compiles of one MoE program in a step, 2 more in
        the next, ~20 s each at full size), and programs' outputs are committed or not after their inputs."""
        if i not in self._states:
            self._states[i] = jax.device_put(ex.layers[i], self.device)
        return self._states[i]

    def unsummed(self, x_BTD, dtype) -> Unsummed:
        """A plain layer output as a MoE layer's terms (the others zero), so that the first MoE layer takes the
        same program as the rest."""
        B, T, D = x_BTD.shape
        if B * T not in self._zeros:
            zeros = [jnp.zeros((B * T, D), dt, device=self.device) for dt in (dtype, jnp.float32, jnp.float32)]
            self._zeros[B * T] = Unsummed(None, *zeros)
        return self._zeros[B * T]._replace(x_BTD=x_BTD)

    def make_early(self, n: int) -> None:
        """At least n device buffers for experts fetched a layer early, each as its arrays' (address, bytes), as
        `sources` gives them; the same buffers every layer (the host's copies in and out of them are queued in
        order). Made before a step's launch: their zeros' kernel runs on XLA's stream, which a launched MoE program
        holds until the host answers it, so waiting for them while serving a layer never ends (run 50, an H100)."""
        while len(self._early) < n:
            arrays = jax.block_until_ready([jnp.zeros(a.shape, a.dtype, device=a.sharding) for a in self.leaves])
            self._early.append((arrays, [(a.unsafe_buffer_pointer(), a.nbytes) for a in arrays]))

    def early(self, n: int) -> list[Sources]:
        """The first n early buffers (`make_early`), which a step made before its launch."""
        if n > len(self._early):
            raise RuntimeError(f"{n} early buffers asked for while serving a layer, {len(self._early)} made before "
                               "the launch: making them now would wait behind the program that waits for the host")
        return [sources for _, sources in self._early[:n]]

    def source_table(self, i: int) -> np.ndarray:
        """Every expert of layer i as `Handoff.fill` copies it: each array's (address, bytes), int64 [E, L, 2]. Kept:
        the store's arrays stay where they are for the executor's life (`with_placement` makes another executor)."""
        if i not in self._source_tables:
            self._source_tables[i] = np.array([[(a.unsafe_buffer_pointer(), a.nbytes) for a in jax.tree.leaves(ex)]
                                               for ex in self.experts[i]], np.int64)
        return self._source_tables[i]

    def slots(self, rows: int) -> int:
        """A program's expert slots at this many rows: every expert they may choose."""
        return min(rows * self.K, self.n_experts)

    def program(self, kind: str, rows: int) -> Callable:
        if (kind, rows) not in self.programs:
            self.programs[(kind, rows)] = jax.jit(functools.partial(self.moe_layer, self.graphdefs[kind],
                                                                    self.slots(rows)),
                                                  donate_argnums=(5, 6) if self.donate_cache else (),
                                                  compiler_options=self.compiler_options)
        return self.programs[(kind, rows)]

    def moe_layer(self, graphdef, S: int, state, ahead, x_BTD, rope, start_B, latent, rp, j):
        """Attention, routing handed to the host (with ahead, the next MoE layer's arrays: its router's guess on
        this layer's residual too), the device's experts (up to S) as the host fills them in, the shared expert, the
        host's share taken back: the layer's output as its terms."""
        handoff = self.handoff
        # The slots' ids, then a stack of S of each of an expert's arrays, read by the kernels' stacked form
        # (`add_slot_experts`). As S separate experts (`add_experts`, a kernel branch per slot) the program compiled
        # for 22-27 s at one row and over 200 s at four, full size, against 2.5-3.4 and 13 s stacked, and its steps
        # were no faster in one process (int4 16.57 against 16.18 ms, 15.56 against 16.22; int8 25.80 against 23.30,
        # 21.06 against 20.97 at R1's share; offload.md runs 65-70).
        slots = [jax.ShapeDtypeStruct((S, *a.shape), a.dtype) for a in self.leaves]
        structs = [jax.ShapeDtypeStruct((2, S), jnp.int32), *slots]
        layer = nnx.merge(graphdef, state)
        x_BTD, latent, rp = attend_cached(layer, settle(x_BTD), rope, start_B, latent, rp, j)
        h_ND, w_NK, idx_NK, for_host = routing(layer, x_BTD)  # for_host: the three packed, [N, D + 2K]
        if ahead is not None:
            _, guess_w_NK, guess_idx_NK = route(nnx.merge(graphdef, ahead), x_BTD)
            for_host = jnp.concatenate([for_host, packed(h_ND[:, :0], guess_w_NK, guess_idx_NK)], axis=1)
        effect = self.side_effect
        handed, to_fill = handoff.hand_over(for_host, into=structs, side_effect=effect)
        shared_ND = shared(layer, h_ND)  # ordered before the waits below: computed while the host copies

        def add(acc_ND, ids_S, arrays):  # the experts of the slots ids_S names (-1: none, never read)
            return add_slot_experts(acc_ND, h_ND, w_NK, idx_NK, ids_S, jax.tree.unflatten(self.treedef, arrays),
                                    impl=self.expert_impl)

        # The experts already on the device (their copies device to device) land first and are computed while the
        # link's land, then the link's: the device's work after the link's last copy is theirs alone.
        # Every array read after the first wait comes out of it: XLA orders a read of the hand-over's own outputs
        # only behind the hand-over, and the experts' products are computed before the ids mask them.
        # ids_2C: the slots' experts of the first part, then of the rest (-1: none).
        ids_2C, *arrays = handoff.filled_first(to_fill, shared_ND, side_effect=effect)
        first_ND = add(None, ids_2C[0], arrays)
        ids_2C, *arrays = handoff.filled([ids_2C, *arrays], first_ND, side_effect=effect)
        routed_ND = add(first_ND, ids_2C[1], arrays)
        host_ND = handoff.take_back(shared_ND.shape, jnp.float32, handed, shared_ND, routed_ND, side_effect=effect)
        return Unsummed(x_BTD, shared_ND, routed_ND, host_ND), latent, rp


def applies(ex: OffloadedExecutor, tokens_BT, run: Segments) -> bool:
    """Whether a forward pass takes the handoff form: a decode step on one device with a host path, not profiled
    (profiling waits for each program), of up to MAX_ROWS rows where the executor's decode_form is "handoff", or
    "auto" on a GPU. There it decoded faster than the forms driven from Python in every measured case at full
    size: one row (runs 47-48, 70: 17.06 against the fused form's 18.41 ms at R1's share), two and four rows
    (run 70, the same process: 13.86 against 19.50 ms, 21.50 against 33.69), and one row of the embedded model
    (290-406 against 176-278 tokens/s, runs 58-60). The embedded model's four rows: 1602 against 1442 tokens/s
    (run 71), 1016 against 1087 (run 67). On the CPU backend the waits spin on the cores the host's kernels need
    (84 against 196 tokens/s on the dev box)."""
    one_token = np.ndim(tokens_BT) == 1 or np.shape(tokens_BT)[1] == 1
    rows = np.size(tokens_BT)
    chosen = ex.decode_form == "handoff" or (ex.decode_form == "auto" and ex.devices[0].platform == "gpu")
    return chosen and ex.mesh is None and ex.host is not None and one_token and rows <= MAX_ROWS and not run.profile


def handoff_forward(ex: OffloadedExecutor, cache: KVCache, tokens_BT, start_B, stats: StepStats, run: Segments,
                    active_N: np.ndarray | None):
    """`OffloadedExecutor.forward` in the handoff form: the layers launched by the handoff's thread, their host
    work served here. Returns (the last layer's output, the cache)."""
    cfg, layers = ex.config, ex.handoff_layers
    x_BTD, rope, start_B = run("embed", embed_segment, cfg, ex.top["embed_tokens"], tokens_BT, start_B)
    rows = np.size(tokens_BT)
    layers.make_early(ex.lookahead)  # before the launch (`HandoffLayers.make_early`): at most these are fetched
    job = layers.handoff.launch(launch_layers, ex, layers, rows, x_BTD, rope, start_B, dict(cache.groups), run)
    try:
        early: dict[int, Sources] = {}  # the layer's experts fetched early, by their buffers
        for i in cfg.moe_layers:
            early = serve_layer(ex, layers, i, rows, stats, active_N, early)
    except BaseException:
        layers.handoff.abandon(job)
        raise
    x_BTD, groups = job.result()
    return x_BTD, KVCache(groups)


def launch_layers(ex: OffloadedExecutor, layers: HandoffLayers, rows: int, x_BTD, rope, start_B, groups: dict,
                  run: Segments):
    """Every layer's program, called in turn (the handoff's launching thread): dense layers as the fused form runs
    them, MoE layers in the handoff form (with the lookahead, each given the next MoE layer's arrays; the last its
    own, so that one program serves them all: the host ignores that guess)."""
    last = ex.config.moe_layers[-1]
    ahead_of = {**ex.config.next_moe_layer, last: last} if ex.lookahead else {}
    # Every argument committed to the device, as the programs' outputs are (`HandoffLayers.state`).
    x_BTD, rope, start_B, groups = jax.device_put((x_BTD, rope, start_B, groups), layers.device)
    for i, kind in enumerate(ex.config.layer_kinds):
        seg, state, j = ex.segments[kind], layers.state(ex, i), ex._stack_index[i]
        latent, rp = groups[kind]
        if kind == "dense":
            x_BTD, latent, rp = run("dense_layer", seg.dense_layer, state, x_BTD, rope, start_B, latent, rp, j)
        else:
            program = layers.program(kind, rows)
            if not isinstance(x_BTD, Unsummed):
                x_BTD = layers.unsummed(x_BTD, ex.dtype)
            ahead = layers.state(ex, ahead_of[i]) if ahead_of else None
            x_BTD, latent, rp = run("moe_layer", program, state, ahead, x_BTD, rope, start_B, latent, rp, j)
        groups[kind] = LayerCache(latent, rp)
    return x_BTD, groups


def serve_layer(ex: OffloadedExecutor, layers: HandoffLayers, i: int, rows: int, stats: StepStats,
                active_N: np.ndarray | None, early: dict[int, Sources]) -> dict[int, Sources]:
    """MoE layer i's host work: its routing read, its experts split by path (`scheduler.split`; early: those fetched
    a layer early, by their buffers), the device's copied into its program, the next layer's likeliest fetched early
    (with the lookahead), the host CPU's share computed and handed back. Returns the next layer's early experts."""
    cfg, handoff = ex.config, layers.handoff
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    t = time.perf_counter()
    guessed = bool(ex.lookahead)
    handed = handoff.receive((rows, D + 2 * K + 2 * K * guessed), np.float32)
    h_ND, w_NK, idx_NK = unpacked(handed[:, :D + 2 * K], K)
    stats.span("routing_wait", t)
    idx_NK, counts = counted(cfg, i, idx_NK, stats, active_N)
    t = time.perf_counter()
    moved_before = stats.bytes_from_host
    cpu_array, on_array, n_resident = split(counts, ex.store.hosted_mask(i, apart_from=early), ex.plan.expert_bytes,
                                            ex.rates, ex.expert_compute)
    cpu_ids, on_device = cpu_array.tolist(), on_array.tolist()  # the device's: in slot order (`moe_layer`)
    first = n_resident if layers.resident_first else 0
    ids_2C = np.full((2, layers.slots(rows)), -1, np.int32)  # of the fill's first part, then of the rest (-1: none)
    ids_2C[0, :first] = on_array[:first]
    ids_2C[1, first:len(on_array)] = on_array[first:]
    stats.span("split", t)
    ahead = cfg.next_moe_layer.get(i)

    def queue_copies() -> dict[int, Sources]:  # this layer's into its program, then (lookahead) the next's early
        t = time.perf_counter()
        copies = slot_copies(*handoff.stage(ids_2C), layers.source_table(i), on_array, layers.leaf_bytes)
        L = len(layers.leaves)
        for k in range(n_resident) if early else ():  # those fetched early: from their buffers
            if on_device[k] in early:
                copies[1 + k * L:1 + (k + 1) * L, 2:] = early[on_device[k]]
        handoff.fill(copies, first=1 + L * first)
        stats.span("fill", t)
        if guessed and ahead is not None:
            return fetch_early(ex, layers, (ahead, *unpacked(handed[:, D + 2 * K:], K)[1:]),
                               active_rows(active_N, rows), counts[cpu_ids], len(on_device) - n_resident, stats)
        return {}

    def host_share() -> np.ndarray:
        return host_sum(ex, i, cpu_ids, idx_NK, w_NK, h_ND, stats) if cpu_ids else np.zeros((rows, D), np.float32)

    if layers.fill_apart:  # the copies queued by another thread while this one starts the host CPU's share
        job = layers.filler.submit(queue_copies)
        try:
            host_ND = host_share()
        finally:
            futures.wait([job])  # before a failure's clean-up counts the fills
        next_early = job.result()
    else:
        next_early = queue_copies()
        host_ND = host_share()
    handoff.answer(host_ND)
    # Counted (the copies were queued above) once answered: off both paths' way, while the device goes on.
    ex.store.fetch(i, on_device, stats, early=early, move="none")
    stats.link_bytes.append(stats.bytes_from_host - moved_before)
    return next_early


@njit(nogil=True, cache=True)
def slot_copies(ids_address, ids_bytes, sources_EL2, on_device, leaf_bytes):
    """A handoff layer's fill (`Handoff.fill`'s rows: array, offset, address, bytes): the slots' ids (staged) into
    the first array, then slot j's expert (on_device[j], its arrays' sources_EL2) into its place in each array's
    stack. One compiled call: a layer's fill is on the host CPU's way (offload.md runs 67-68: 0.06-0.08 ms a layer,
    against 0.20 in numpy)."""
    n, L = on_device.shape[0], sources_EL2.shape[1]
    copies = np.empty((1 + n * L, 4), np.int64)
    copies[0, 0], copies[0, 1], copies[0, 2], copies[0, 3] = 0, 0, ids_address, ids_bytes
    for j in range(n):
        for leaf in range(L):
            r = 1 + j * L + leaf
            copies[r, 0], copies[r, 1] = 1 + leaf, j * leaf_bytes[leaf]
            copies[r, 2], copies[r, 3] = sources_EL2[on_device[j], leaf, 0], sources_EL2[on_device[j], leaf, 1]
    return copies


def fetch_early(ex: OffloadedExecutor, layers: HandoffLayers, guess, rows: np.ndarray, cpu_tokens: np.ndarray,
                n_link: int, stats: StepStats) -> dict[int, Sources]:
    """Queue the copies of the next MoE layer's likeliest host experts by guess (`moe_block.Guess`, for the active
    rows) into the early buffers, behind this layer's: as many as the link carries while it would idle
    (`scheduler.early_fetches`), at most the executor's lookahead. Returns them, by their buffers' sources."""
    t = time.perf_counter()
    most = early_fetches(ex.rates, ex.plan.expert_bytes, cpu_tokens, n_link, ex.lookahead, HANDOFF_LOOKAHEAD_WINDOW_S)
    j, likely = guess[0], list(fetch_ahead(ex, guess, rows, stats, most, move="none"))
    buffers = layers.early(len(likely))
    layers.handoff.copy_ahead([(dest, source, nbytes) for e, buffer in zip(likely, buffers)
                               for (dest, _), (source, nbytes) in zip(buffer, layers.source_table(j)[e])])
    stats.span("fetch_early", t)
    return dict(zip(likely, buffers))
