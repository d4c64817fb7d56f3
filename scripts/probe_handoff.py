"""Can a batch-1 decode step's MoE layers run as one XLA program whose stream waits for the host CPU's experts
(`runtime/offload/handoff.py`), as KTransformers' CUDA graphs do? Today each layer is driven from Python
(`moe_block.fused_moe`), and ~1 ms of a ~3 ms R1-share layer passes outside the experts' two paths (offload.md, runs
26-41): the attention program's call, the routing's way back, the copies' and the device share's calls. Here 4
layers are one program, launched at once by another thread: per layer, attention and routing; the routing handed to
the host (a copy and a flag queued on the stream); the split made on the device by a rule the host applies alike
(the link takes the last of a token's hosted experts), the link experts copied from a pinned stack of the layer's
host experts; the device's share; then the stream waits for the host's answer and reads it. This thread spins on
the flags, computes the host's share, and answers. No program call, no callback, no round trip a layer.

The forms compute the same fixed experts of one full-size layer (4 on the host CPU, 2 over the link, 2 resident; an
R1-share layer's mean split), 4 times in a row as 4 layers, from the routing's h. Per layer, median of --reps
passes, every form once per pass in turn:

- the current form, as `fused_moe` drives a layer;
- the handoff program, this thread answering;
- the same with every answer given before the launch (the device's part alone: its floor);
- one program, the split by the host as now: it copies the device's experts (resident ones from device memory,
  link ones from pinned host memory) into the program's own buffers (`Handoff.hand_over(..., into=...)`, `fill`,
  `filled`) on a stream of its own, and the program's stream waits for them (the form an executor needs no expert
  stacks for);
- the host kernels alone, 4 times.

    python3 scripts/probe_handoff.py [--tiny] [--reps 30]
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_layer import decode_layer, probe_args  # noqa: E402

LAYERS = 4


def main() -> None:
    args = probe_args(__doc__, 30, **{"--splits": dict(default="4/2,5/1,6/0", help=(
        "host CPU/link experts of each split to time, comma-separated (with 2 resident)"))})

    import jax
    import jax.numpy as jnp

    from ktjax.experts.weights import ExpertWeights
    from ktjax.runtime.model import StepStats
    from ktjax.runtime.offload.handoff import Handoff
    from ktjax.runtime.offload.moe_block import fused_slots, padded
    from ktjax.runtime.offload.segments import Unsummed, packed, settle, unpacked
    from ktjax.runtime.offload.streaming import capacity_for

    layer = decode_layer(args.tiny)
    cfg, ex, i, seg, state, j = layer.cfg, layer.ex, layer.i, layer.seg, layer.state, layer.j
    rope, start_B, latent_rp = layer.rope, layer.start_B, layer.latent_rp
    D, K, E = cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    store, fmt = ex.store, ex.plan.expert_format

    hosted = [e for e in range(E) if store.is_hosted(i, e)]
    resident = [e for e in range(E) if not store.is_hosted(i, e)][:2]
    w_np = np.full((1, K), 1.0 / K, np.float32)
    w_NK = jnp.asarray(w_np)
    rows_A = np.zeros(1, np.int32)
    resident_w = tuple(store.experts[i][e] for e in resident)
    stats = StepStats()
    worker = ThreadPoolExecutor(1)
    handoff = Handoff(jax.devices()[0], slot_bytes=4 * (D + 2 * K) * 8)
    stack_ids = np.array(hosted[:K], np.int32)  # the layer's host experts in one pinned stack
    host_stack = jax.device_put(np.stack([np.asarray(store.experts[i][e].w) for e in stack_ids]), store.on_host)
    place_E = np.full(E, -1, np.int32)
    place_E[stack_ids] = np.arange(len(stack_ids))
    launched = []
    zeros = np.zeros((1, D), np.float32)
    h_ND = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)

    def attend_hand_over(state, x, rope, start_B, latent, rp, j, into=()):
        """A layer's attention and routing, the routing handed to the host ([1, D + 2K]: h, weights, ids' bits)
        (`into`: with arrays for the host to fill, `Handoff.hand_over`)."""
        x_BTD, routing, latent, rp = seg.attention_route.__wrapped__(state, x, rope, start_B, latent, rp, j)
        return x_BTD, routing, latent, rp, handoff.hand_over(packed(routing.h_ND, routing.w_NK, routing.idx_NK),
                                                             into=into)

    def split_forms(n_cpu: int, n_link: int) -> dict:
        """The forms for a layer whose token chose n_cpu experts for the host CPU, n_link for the link and the 2
        resident ones (the rest of its K hosted, computed by the host CPU)."""
        cpu_ids, link_ids = hosted[:n_cpu], hosted[n_cpu:n_cpu + n_link]
        chosen = cpu_ids + link_ids + resident
        idx_np = np.array([chosen + hosted[len(chosen):K]], np.int32)[:, :K]
        cpu_ids = [e for e in idx_np[0] if e not in link_ids + resident]
        idx_NK = jnp.asarray(idx_np)
        counts = np.bincount(idx_np.ravel(), minlength=E)
        device_ids = resident + link_ids
        capacity = capacity_for(1, counts[device_ids])
        L = len(link_ids)  # link slots a layer: static, so that no loop or condition reads the device back

        def host_share(ids, h_ND) -> np.ndarray:
            return ex.host.compute(i, ids, idx_np, w_np, np.asarray(h_ND, np.float32))

        # ---- the current form: one layer as `fused_moe` drives it ----------------------------------------
        def device_share(h_ND, landing):
            ids, slots = padded(device_ids, resident_w + tuple(landing))
            return seg.moe_device(state, h_ND, w_NK, idx_NK, rows_A, ids, slots, capacity=capacity)

        def current(x):
            return layer.fused_steps(x, LAYERS, link_ids, device_share, lambda h: host_share(cpu_ids, h), worker,
                                     stats)

        # ---- the handoff program ------------------------------------------------------------------------
        def device_split(idx_K):
            """The link's experts (places in the stack; -1 none): the last L of the token's hosted experts."""
            places_K = jnp.asarray(place_E)[idx_K]
            hosted_K = places_K >= 0
            n_hosted = jnp.sum(hosted_K)
            link_K = hosted_K & (jnp.cumsum(hosted_K) > n_hosted - L)
            order = jnp.argsort(jnp.where(link_K, 0, 1), stable=True)
            return jnp.where(jnp.arange(L) < jnp.minimum(n_hosted, L), places_K[order][:L], -1)

        def host_split(idx_K) -> list[int]:  # the host's experts by the same rule
            hosted_K = [int(e) for e in idx_K if place_E[e] >= 0]
            return hosted_K[:max(len(hosted_K) - L, 0)]

        def handoff_program(state, x, rope, start_B, latent, rp, j, host_stack, resident_w):
            for _ in range(LAYERS):
                x_BTD, routing, latent, rp, handed = attend_hand_over(state, x, rope, start_B, latent, rp, j)
                # The probe's experts are fixed; made to depend on the routing so that no copy starts before it.
                idx = idx_NK + (routing.idx_NK[:, :1] >= 1 << 30).astype(jnp.int32)
                h_ND = jax.lax.optimization_barrier((routing.h_ND, handed))[0]  # the device share after hand-over
                places_L = device_split(idx[0])
                landed = tuple(ExpertWeights(jax.device_put(jax.lax.dynamic_index_in_dim(
                    host_stack, jnp.maximum(places_L[k], 0), 0, False), jax.memory.Space.Device), None, fmt)
                    for k in range(L))
                ids_C = jnp.concatenate([jnp.asarray(resident, jnp.int32),
                                         jnp.where(places_L >= 0, jnp.asarray(stack_ids)[places_L], -1)])
                shared_ND, routed_ND = seg.moe_device.__wrapped__(state, h_ND, w_NK, idx, rows_A, ids_C,
                                                                  resident_w + landed, capacity=capacity)
                host_ND = handoff.take_back((1, D), jnp.float32, handed, shared_ND, routed_ND)
                x = Unsummed(x_BTD, shared_ND, routed_ND, host_ND)
            return x, latent, rp

        # ---- the same, the split by the host: it copies the device's experts into the program's own slots ---
        device_w = tuple(store.experts[i][e].w for e in device_ids)
        slots = fused_slots(len(device_ids))
        structs = [jax.ShapeDtypeStruct((slots,), jnp.int32)] + [jax.ShapeDtypeStruct(w.shape, w.dtype)
                                                                  for w in device_w[:1] * slots]

        def filled_program(state, x, rope, start_B, latent, rp, j, host_stack, resident_w):
            for _ in range(LAYERS):
                x_BTD, routing, latent, rp, (handed, slots_C) = attend_hand_over(state, x, rope, start_B, latent,
                                                                                 rp, j, into=structs)
                ids_C, *w_C = handoff.filled(slots_C)
                shared_ND, routed_ND = seg.moe_device.__wrapped__(
                    state, routing.h_ND, w_NK, idx_NK, rows_A, ids_C, tuple(ExpertWeights(w, None, fmt) for w in w_C),
                    capacity=capacity)
                host_ND = handoff.take_back((1, D), jnp.float32, handed, shared_ND, routed_ND)
                x = Unsummed(x_BTD, shared_ND, routed_ND, host_ND)
            return x, latent, rp

        def sources():  # the host's split: the device's experts (pads: the first again), their ids
            ids = np.full(slots, -1, np.int32)
            ids[:len(device_ids)] = device_ids
            chosen = device_w + device_w[:1] * (slots - len(device_w))
            return [(0, 0, *handoff.stage(ids))] + [(1 + k, 0, w.unsafe_buffer_pointer(), w.nbytes)
                                                    for k, w in enumerate(chosen)]

        def with_fills(x):
            job = launch(x, filled)
            for _ in range(LAYERS):
                # The routing read whole (its ids as a step reads them); the probe's experts are fixed.
                h_1D, _, _ = unpacked(handoff.receive((1, D + 2 * K), np.float32), K)
                handoff.fill(sources())
                handoff.answer(host_share(cpu_ids, h_1D))
            return finish(job)

        jitted = jax.jit(handoff_program, donate_argnums=(4, 5))
        filled = jax.jit(filled_program, donate_argnums=(4, 5))

        def launch(x, program=jitted):
            def call():
                out = program(state, x, rope, start_B, *latent_rp, j, host_stack, resident_w)
                launched.append(time.perf_counter())
                return out
            return handoff.launch(call)

        def finish(job):
            x, *latent_rp[:] = job.result()
            return x

        def with_handoff(x):
            job = launch(x)
            for _ in range(LAYERS):
                h_1D, _, _ = unpacked(handoff.receive((1, D + 2 * K), np.float32), K)  # as in with_fills
                handoff.answer(host_share(host_split(idx_np[0]), h_1D))
            return finish(job)

        def answered_before(x):  # the device's part alone
            for _ in range(LAYERS):
                handoff.answer(zeros)
            job = launch(x)
            for _ in range(LAYERS):
                handoff.receive((1, D + 2 * K), np.float32)
            return finish(job)

        split = f"{len(cpu_ids)}/{L}/{len(resident)}"
        return {f"{split} the current form (fused_moe's steps)": lambda: current(layer.terms()),
                f"{split} one program, the stream waiting for the host": lambda: with_handoff(layer.terms()),
                f"{split} the same, answers given before (device alone)": lambda: answered_before(layer.terms()),
                f"{split} one program, the host's split and copies": lambda: with_fills(layer.terms()),
                f"{split} the host kernels alone": lambda: [host_share(cpu_ids, h_ND) for _ in range(LAYERS)]}

    forms = {}
    for split in args.splits.split(","):
        forms.update(split_forms(*map(int, split.split("/"))))
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer x {LAYERS}; splits (host "
          f"CPU/link/resident experts): {args.splits}; {args.reps} passes", flush=True)
    t = time.perf_counter()
    for name, form in forms.items():
        jax.block_until_ready(form())  # compiled
        print(f"  {name}: first call {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
    times = {name: [] for name in forms}
    launch_s = {name: [] for name in forms}
    for _ in range(args.reps):
        for name, form in forms.items():
            t = time.perf_counter()
            launched.clear()
            jax.block_until_ready(form())
            times[name].append((time.perf_counter() - t) / LAYERS)
            if launched:
                launch_s[name].append(launched[0] - t)
    for name, per_layer in times.items():
        us = np.array(per_layer) * 1e6
        print(f"  {name:52s} per layer median {np.median(us):7.0f} us   10th-90th percentile "
              f"{np.percentile(us, 10):7.0f}-{np.percentile(us, 90):7.0f} us", flush=True)
    for name, s in launch_s.items():
        if s:
            print(f"  {name}: launched {np.median(s) * 1e3:.2f} ms after the form's start (median)")

    a = jax.jit(settle)
    names = list(forms)
    for k in range(0, len(names), 5):
        first, second, third = (np.asarray(a(forms[names[k + m]]())) for m in (0, 1, 3))
        print(f"  {names[k].split()[0]}: outputs agree, max |difference| {np.abs(first - second).max():.3g} "
              f"(the device's split), {np.abs(first - third).max():.3g} (the host's; scale {np.abs(first).max():.3g})")

if __name__ == "__main__":
    main()
