"""Could the next layer's attention program be dispatched before the host CPU's share exists? At batch 1 a MoE layer
spends ~0.85 ms after its host share is done before the next layer's routing is on the host (offload.md, run 29):
the next `attention_route` call (~0.2-0.4 ms of the thread, its kernels launched then), the program on the device,
the routing's way back. Here the program takes the host share from a host callback inside it (`io_callback`, which
waits for the share), so that its call, and whatever of its launches come before the callback, overlap the host
kernels. Times, from the host share's end to the next layer's expert ids on the host (median of --reps):

- A, as a step does it now: the share put in a pinned buffer (`ShareLanding`), then the call on this thread;
- B, the call made by a worker thread as the host kernels start, the share handed to the program's callback;
- C, the host kernels run by the callback itself, inside the program (the whole layer from the call on).

Each form also prints the whole time from the host kernels' start, and the host kernels' own time in it.

One MoE layer of DeepSeek-V3's sizes (random weights; int4 experts, 4 of a token's 8 on the host CPU), or small
ones with --tiny:

    python3 scripts/probe_share_callback.py [--tiny] [--reps 30]
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


def main() -> None:
    args = probe_args(__doc__, 30)

    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    from ktjax.runtime.offload.segments import Unsummed

    layer = decode_layer(args.tiny)
    cfg, ex, i, seg, state, j = layer.cfg, layer.ex, layer.i, layer.seg, layer.state, layer.j
    x_BTD, rope, start_B, latent_rp = layer.x_BTD, layer.rope, layer.start_B, layer.latent_rp
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    shared_ND, routed_ND = layer.shared_ND, layer.routed_ND

    # A host share of 4 host experts for one token, as an R1-share layer computes on the host CPU.
    hosted = [e for e in range(cfg.n_routed_experts) if ex.store.is_hosted(i, e)]
    cpu_ids = hosted[:4]
    idx_NK = np.array([hosted[:K]], np.int32)
    w_NK = np.full((1, K), 1.0 / K, np.float32)
    h_ND = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)

    def host_work() -> np.ndarray:
        return ex.host.compute(i, cpu_ids, idx_NK, w_NK, h_ND)

    box: queue.Queue = queue.Queue(maxsize=1)
    share = jax.ShapeDtypeStruct((1, D), jnp.float32)

    def fed(take):  # attention_route, its host share from a callback inside the program
        def program(state, x_BTD, shared_ND, routed_ND, rope, start_B, latent, rp, j):
            host_ND = io_callback(take, share, ordered=False)
            return seg.attention_route.__wrapped__(state, Unsummed(x_BTD, shared_ND, routed_ND, host_ND), rope,
                                                   start_B, latent, rp, j)
        return jax.jit(program, donate_argnums=(6, 7))

    handed = fed(lambda: box.get())
    computed = fed(host_work)
    worker = ThreadPoolExecutor(1)

    def call(program, *terms):
        out = program(state, *terms, rope, start_B, *latent_rp, j)
        latent_rp[:] = out[-2:]
        return out

    def form_a():
        t0 = time.perf_counter()
        out_ND = host_work()
        t1 = time.perf_counter()
        out = call(seg.attention_route, layer.terms(ex.host.landing.put(out_ND)))
        out[1].start_copies(host_inputs=True)
        out[1].ids_on_host()
        return t0, t1, time.perf_counter(), out

    def form_b():
        t0 = time.perf_counter()
        job = worker.submit(call, handed, x_BTD, shared_ND, routed_ND)
        out_ND = host_work()
        t1 = time.perf_counter()
        box.put(out_ND)
        out = job.result()
        out[1].start_copies(host_inputs=True)
        out[1].ids_on_host()
        return t0, t1, time.perf_counter(), out

    def form_c():
        t0 = time.perf_counter()
        out = call(computed, x_BTD, shared_ND, routed_ND)
        out[1].start_copies(host_inputs=True)
        out[1].ids_on_host()
        t = time.perf_counter()
        return t0, None, t, out

    alone = []
    for _ in range(args.reps + 1):
        t = time.perf_counter()
        host_work()
        alone.append(time.perf_counter() - t)
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer, {len(cpu_ids)} int4 experts on "
          f"the host CPU, {args.reps} reps; the host kernels alone: median {np.median(alone[1:]) * 1e6:.0f} us")
    forms = {"A: host share, then the call (as now)": form_a,
             "B: the call by a worker, the share handed to its callback": form_b,
             "C: the host kernels inside the program's callback": form_c}
    rows = []
    for name, form in forms.items():
        jax.block_until_ready(form()[-1])  # compiled
        after, whole = [], []
        for _ in range(args.reps):
            t0, t1, t2, out = form()
            jax.block_until_ready(out)
            whole.append(t2 - t0)
            if t1 is not None:
                after.append(t2 - t1)
        rows.append((name, np.median(whole) * 1e6, np.median(after) * 1e6 if after else float("nan")))
        print(f"  {name:58s} whole {rows[-1][1]:7.0f} us   host share's end to the ids {rows[-1][2]:7.0f} us",
              flush=True)


if __name__ == "__main__":
    main()
