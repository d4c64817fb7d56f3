"""Could a batch-1 decode step's MoE layers run as one XLA program, the host CPU's experts called from inside it?
Today each layer is driven from Python (`moe_block.fused_moe`): the attention program's call, the routing's way to
the host, the split, the transfers' program, the device share's program on a worker, the host kernels on this
thread; ~0.8 ms of a ~2.3-2.8 ms layer is outside the experts' two paths (offload.md, runs 29-33). Here the same
work for 4 layers is one program: attention and routing, a host callback that starts the host kernels on a thread
of their own and returns at once, the link experts' copies from pinned host memory (indexed inside the program),
the device share, a second callback that waits for the host share; then the next layer. Launches, routing round
trips and Python dispatch leave the layer's path; the host kernels and the copies overlap as they do now.

Each form computes the same fixed experts of one full-size layer (4 on the host CPU, 2 over the link, 2 resident;
an R1-share layer's mean split in runs 29-33), 4 times in a row as 4 layers, from the routing's h; the experts'
choice is fixed so all do the same work (the router still runs). Times per layer (median of --reps 4-layer
passes):

- the current form, as `fused_moe` drives a layer;
- one program for the 4 layers, host kernels on a thread of their own;
- the same program called by a worker thread, the host kernels on the main thread, which the callbacks hand the
  routing's h to and take the share from (the host kernels ran 25-40% slower off the main thread, run 34);
- the same with what a real step needs: the split made by the host in the first callback (the link experts'
  places in a pinned stack of the layer's host experts, and their number), the copies by a loop of that many, each
  of the device's slots computed under a condition;
- the split made on the device by a rule the host applies alike (no host round trip before the device's share):
  a second program after the attention program, or one program a layer with a callback handing h to this thread;
- the host's split as now, the copies and the device's share one program called by this thread before the host
  kernels (the executor's `fused_copies` "in_program_here"), or the copies' program and the device's both called
  by this thread;
- the host kernels alone, on this thread and on that thread; the 2 experts' copies alone, by `ExpertStore.fetch`.

Each pass times every form once, in turn (the machines' speed drifts within a run).

    python3 scripts/probe_layer_program.py [--tiny] [--reps 20]
"""

from __future__ import annotations

import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_layer import decode_layer, probe_args  # noqa: E402

LAYERS = 4


def main() -> None:
    args = probe_args(__doc__, 20)

    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    from ktjax.experts.device import add_experts
    from ktjax.experts.weights import ExpertWeights
    from ktjax.runtime.model import StepStats
    from ktjax.runtime.offload.moe_block import padded
    from ktjax.runtime.offload.segments import Unsummed, settle
    from ktjax.runtime.offload.streaming import capacity_for

    layer = decode_layer(args.tiny)
    cfg, ex, i, seg, state, j = layer.cfg, layer.ex, layer.i, layer.seg, layer.state, layer.j
    x_BTD, rope, start_B, latent_rp = layer.x_BTD, layer.rope, layer.start_B, layer.latent_rp
    D, K, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    store, fmt = ex.store, ex.plan.expert_format

    hosted = [e for e in range(E) if store.is_hosted(i, e)]
    resident = [e for e in range(E) if not store.is_hosted(i, e)][:2]
    cpu_ids, link_ids = hosted[:4], hosted[4:6]
    chosen = cpu_ids + link_ids + resident
    idx_np = np.array([chosen + hosted[6:6 + K - len(chosen)]], np.int32)[:, :K]
    w_np = np.full((1, K), 1.0 / K, np.float32)
    idx_NK, w_NK = jnp.asarray(idx_np), jnp.asarray(w_np)
    counts = np.bincount(idx_np.ravel(), minlength=E)
    rows_A = np.zeros(1, np.int32)
    device_ids = resident + link_ids
    ids_C, _ = padded(device_ids, tuple(range(len(device_ids))))
    capacity = capacity_for(1, counts[device_ids])
    resident_w = tuple(store.experts[i][e] for e in resident)
    stats = StepStats()
    worker, host_thread = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    def host_share_of(ids, h_ND) -> np.ndarray:
        return ex.host.compute(i, ids, idx_np, w_np, np.asarray(h_ND, np.float32))

    def host_share(h_ND) -> np.ndarray:
        return host_share_of(cpu_ids, h_ND)

    # ---- the current form: one layer as `fused_moe` drives it --------------------------------------------
    def device_share(h_ND, landing):
        ids, slots = padded(device_ids, resident_w + tuple(landing))
        return seg.moe_device(state, h_ND, w_NK, idx_NK, rows_A, ids, slots, capacity=capacity)

    def current(x):
        return layer.fused_steps(x, LAYERS, link_ids, device_share, host_share, worker, stats)

    # ---- one program for the layers ----------------------------------------------------------------------
    link_on_host = jax.device_put(np.stack([np.asarray(store.experts[i][e].w) for e in link_ids]), store.on_host)
    pending: list = []
    on_main = [False]  # D: the host kernels on the main thread, which waits for the callbacks' inputs
    inputs, shares = queue.Queue(), queue.Queue()

    def start_host(h_ND):  # the host kernels start on another thread; the program goes on
        if on_main[0]:
            inputs.put(np.asarray(h_ND, np.float32))
        else:
            pending.append(host_thread.submit(host_share, np.asarray(h_ND, np.float32)))
        return np.int32(0)

    def join_host(_):
        return shares.get() if on_main[0] else pending.pop(0).result()

    def joined_terms(x_BTD, shared_ND, routed_ND):  # the layer's terms, its host share from the second callback
        host_ND = io_callback(join_host, jax.ShapeDtypeStruct((1, D), jnp.float32), routed_ND[0, :1], ordered=False)
        return Unsummed(x_BTD, shared_ND, routed_ND, host_ND)

    def called(program, *arrays):  # a step's call of a program over the layers, the cache stacks donated
        jitted = jax.jit(program, donate_argnums=(4, 5))

        def call(x):
            x, *latent_rp[:] = jitted(state, x, rope, start_B, *latent_rp, j, *arrays)
            return x
        return call

    def program(state, x, rope, start_B, latent, rp, j, link_on_host, resident_w):
        for _ in range(LAYERS):
            x_BTD, routing, latent, rp = seg.attention_route.__wrapped__(state, x, rope, start_B, latent, rp, j)
            go = io_callback(start_host, jax.ShapeDtypeStruct((), jnp.int32), routing.h_ND, ordered=False)
            landed = tuple(ExpertWeights(jax.device_put(jax.lax.dynamic_index_in_dim(link_on_host, go + k, 0, False),
                                                        jax.memory.Space.Device), None, fmt)
                           for k in range(len(link_ids)))
            ids, slots = padded(device_ids, resident_w + landed)
            shared_ND, routed_ND = seg.moe_device.__wrapped__(state, routing.h_ND, w_NK, idx_NK, rows_A, ids, slots,
                                                              capacity=capacity)
            x = joined_terms(x_BTD, shared_ND, routed_ND)
        return x, latent, rp

    one_program = called(program, link_on_host, resident_w)

    def served(call, x):  # the program called by the worker; this thread serves its callbacks
        on_main[0] = True
        job = worker.submit(call, x)
        for _ in range(LAYERS):
            shares.put(host_share(inputs.get()))
        out = job.result()
        on_main[0] = False
        return out

    def one_program_main_computes(x):
        return served(one_program, x)

    # E: as a real step must, the host decides the split in the first callback (the link experts' places in the
    # layer's stack of host experts, and how many), the program copies that many by a loop and computes each
    # device slot under a condition (an empty one costs nothing).
    SLOTS = 4
    stack_ids = np.array(hosted[:8], np.int32)  # the layer's host experts stacked in one pinned array
    host_stack = jax.device_put(np.stack([np.asarray(store.experts[i][e].w) for e in stack_ids]), store.on_host)
    link_places = np.zeros(SLOTS, np.int32)
    link_places[:len(link_ids)] = [int(np.flatnonzero(stack_ids == e)[0]) for e in link_ids]

    def split_and_start(h_ND):
        inputs.put(np.asarray(h_ND, np.float32))
        return link_places, np.int32(len(link_ids))

    def link_and_device(state, h_ND, places_L, n, host_stack, stack_ids, resident_w):
        """The device's share in a program: n link experts copied from the pinned stack by a loop, the resident
        ones, and each link slot computed under a condition (an empty one costs nothing)."""
        def copy(k, buf):
            row = jax.lax.dynamic_index_in_dim(host_stack, places_L[k], 0, False)
            return jax.lax.dynamic_update_index_in_dim(buf, jax.device_put(row, jax.memory.Space.Device), k, 0)

        buf = jax.lax.fori_loop(0, n, copy, jnp.zeros((SLOTS, host_stack.shape[1]), host_stack.dtype))
        shared_ND, routed_ND = seg.moe_device.__wrapped__(state, h_ND, w_NK, idx_NK, rows_A,
                                                          np.array(resident, np.int32), resident_w, capacity=capacity)
        for k in range(SLOTS):
            def add(r, k=k):
                ids_C = jnp.reshape(stack_ids[places_L[k]], (1,))
                return add_experts(r, h_ND, w_NK, idx_NK, ids_C, (ExpertWeights(buf[k], None, fmt),),
                                   capacity=capacity)
            routed_ND = jax.lax.cond(k < n, add, lambda r: r, routed_ND)
        return shared_ND, routed_ND

    def dynamic_program(state, x, rope, start_B, latent, rp, j, host_stack, stack_ids, resident_w):
        for _ in range(LAYERS):
            x_BTD, routing, latent, rp = seg.attention_route.__wrapped__(state, x, rope, start_B, latent, rp, j)
            places_L, n = io_callback(split_and_start, (jax.ShapeDtypeStruct((SLOTS,), jnp.int32),
                                                        jax.ShapeDtypeStruct((), jnp.int32)), routing.h_ND,
                                      ordered=False)
            x = joined_terms(x_BTD, *link_and_device(state, routing.h_ND, places_L, n, host_stack, stack_ids,
                                                     resident_w))
        return x, latent, rp

    dynamic_program_call = called(dynamic_program, host_stack, stack_ids, resident_w)

    def dynamic_main_computes(x):
        return served(dynamic_program_call, x)

    # F and G: the split made on the device, by a rule the host applies alike to the ids it reads (the link takes
    # the last link_count[n] of a token's n hosted experts), so that the device's share needs no host round trip
    # and no callback waits for the host: F calls a second program after the attention program; G is one program
    # a layer, a callback handing the routing's h to this thread and returning at once. Each layer's call takes
    # the previous one's host share.
    place_E = np.full(E, -1, np.int32)
    place_E[stack_ids] = np.arange(len(stack_ids))
    link_count = np.array([round(n / 3) for n in range(K + 1)], np.int32)  # 6 hosted -> 2 over the link

    def device_split(idx_NK):
        places_K = jnp.asarray(place_E)[idx_NK[0]]
        hosted_K = places_K >= 0
        n_hosted = jnp.sum(hosted_K)
        n = jnp.asarray(link_count)[n_hosted]
        link_K = hosted_K & (jnp.cumsum(hosted_K) > n_hosted - n)
        order = jnp.argsort(jnp.where(link_K, 0, 1), stable=True)
        return jnp.pad(places_K[order], (0, SLOTS))[:SLOTS], n

    def host_split(idx_K) -> list[int]:  # the host's experts by the same rule
        hosted_K = [int(e) for e in idx_K if place_E[e] >= 0]
        return hosted_K[:len(hosted_K) - int(link_count[len(hosted_K)])]

    @jax.jit
    def split_device_program(state, h_ND, host_stack, stack_ids, resident_w):
        return link_and_device(state, h_ND, *device_split(idx_NK), host_stack, stack_ids, resident_w)

    def host_part(routing) -> jax.Array:
        routing.ids_on_host()  # waited for, as a step must; the probe's experts are fixed
        cpu = host_split(idx_np[0])
        _, h_host = routing.inputs_on_host()
        return ex.host.landing.put(ex.host.compute(i, cpu, idx_np, w_np, h_host))

    def split_on_device(x):
        for _ in range(LAYERS):
            x_BTD, routing = layer.call(seg.attention_route, x)[:2]
            terms = split_device_program(state, routing.h_ND, host_stack, stack_ids, resident_w)
            routing.start_copies(host_inputs=True)
            x = Unsummed(x_BTD, *terms, host_part(routing))
        return x

    sent = queue.Queue()

    def send(h_ND):
        sent.put(np.asarray(h_ND, np.float32))
        return np.int32(0)

    def callback_program(state, x, rope, start_B, latent, rp, j, host_stack, stack_ids, resident_w):
        x_BTD, routing, latent, rp = seg.attention_route.__wrapped__(state, x, rope, start_B, latent, rp, j)
        went = io_callback(send, jax.ShapeDtypeStruct((), jnp.int32), routing.h_ND, ordered=False)
        places_L, n = device_split(idx_NK)
        return (x_BTD, *link_and_device(state, routing.h_ND, places_L, n + went, host_stack, stack_ids,
                                        resident_w)), latent, rp

    callback_layer = called(callback_program, host_stack, stack_ids, resident_w)
    cpu_first = host_split(idx_np[0])

    def split_on_device_callback(x):
        for _ in range(LAYERS):
            terms = callback_layer(x)
            x = Unsummed(*terms, ex.host.landing.put(host_share_of(cpu_first, sent.get())))
        return x

    # H: as the current form, the split by the host, but the link experts' copies and the device's share one
    # program called by this thread before the host kernels (no transfers' program, no worker).
    link_w = tuple(store.experts[i][e] for e in link_ids)

    @jax.jit
    def moved_and_device(state, h_ND, link_w, resident_w):
        ids, slots = padded(device_ids, resident_w + jax.device_put(link_w, jax.memory.Space.Device))
        return seg.moe_device.__wrapped__(state, h_ND, w_NK, idx_NK, rows_A, ids, slots, capacity=capacity)

    def one_call_here(x):
        for _ in range(LAYERS):
            x_BTD, routing = layer.call(seg.attention_route, x)[:2]
            routing.start_copies(host_inputs=True)
            routing.ids_on_host()
            terms = moved_and_device(state, routing.h_ND, link_w, resident_w)
            _, h_host = routing.inputs_on_host()
            x = Unsummed(x_BTD, *terms, ex.host.landing.put(host_share(h_host)))
        return x

    def two_calls_here(x):  # H2: the copies' program and the device's, both called by this thread
        for _ in range(LAYERS):
            x_BTD, routing = layer.call(seg.attention_route, x)[:2]
            routing.start_copies(host_inputs=True)
            routing.ids_on_host()
            terms = device_share(routing.h_ND, store.fetch(i, link_ids, stats, move="program"))
            _, h_host = routing.inputs_on_host()
            x = Unsummed(x_BTD, *terms, ex.host.landing.put(host_share(h_host)))
        return x

    h_ND = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)
    forms = {
        "the current form (fused_moe's steps)": lambda: current(layer.terms()),
        "one program, host kernels on their own thread": lambda: one_program(layer.terms()),
        "one program called by a worker, host kernels here": lambda: one_program_main_computes(
            layer.terms()),
        "one program, the split by the host, a loop of copies": lambda: dynamic_main_computes(
            layer.terms()),
        "the split on the device, a second program": lambda: split_on_device(layer.terms()),
        "the split on the device, one program, a callback": lambda: split_on_device_callback(layer.terms()),
        "the host's split, one program here for copies and device": lambda: one_call_here(layer.terms()),
        "the host's split, copies' and device's programs here": lambda: two_calls_here(layer.terms()),
        "the host kernels alone, this thread": lambda: [host_share(h_ND) for _ in range(LAYERS)],
        "the host kernels alone, their own thread": lambda: [host_thread.submit(host_share, h_ND).result()
                                                             for _ in range(LAYERS)],
        f"{len(link_ids)} experts' copies alone (landed)": lambda: [jax.block_until_ready(
            store.fetch(i, link_ids, stats, move="program")) for _ in range(LAYERS)],
    }
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer x {LAYERS}; experts: "
          f"{len(cpu_ids)} host CPU, {len(link_ids)} link, {len(resident)} resident; {args.reps} passes")
    for form in forms.values():
        jax.block_until_ready(form())  # compiled
    # Each pass times every form once, in turn: the machines' speed drifts within a run (offload.md, run 35).
    times = {name: [] for name in forms}
    for _ in range(args.reps):
        for name, form in forms.items():
            t = time.perf_counter()
            jax.block_until_ready(form())
            times[name].append((time.perf_counter() - t) / LAYERS)
    for name, per_layer in times.items():
        us = np.array(per_layer) * 1e6
        print(f"  {name:52s} per layer median {np.median(us):7.0f} us   10th-90th percentile "
              f"{np.percentile(us, 10):7.0f}-{np.percentile(us, 90):7.0f} us", flush=True)

    # Both forms computed the same: the 4 layers' outputs agree.
    a = jax.jit(settle)
    first = np.asarray(a(current(layer.terms())))
    second = np.asarray(a(one_program(layer.terms())))
    third = np.asarray(a(one_program_main_computes(layer.terms())))
    fourth = np.asarray(a(dynamic_main_computes(layer.terms())))
    fifth = np.asarray(a(split_on_device(layer.terms())))
    sixth = np.asarray(a(split_on_device_callback(layer.terms())))
    seventh = np.asarray(a(one_call_here(layer.terms())))
    eighth = np.asarray(a(two_calls_here(layer.terms())))
    same = max(np.abs(first - second).max(), np.abs(first - third).max(), np.abs(first - seventh).max(),
               np.abs(first - eighth).max())
    print(f"  outputs agree: max |difference| {same:.3g}, "
          f"the split by the host {np.abs(first - fourth).max():.3g}, on the device {np.abs(first - fifth).max():.3g}"
          f" / {np.abs(first - sixth).max():.3g} (their sums in another order; scale {np.abs(first).max():.3g})")


if __name__ == "__main__":
    main()
