"""Where the dispatch of a decode step's attention program goes. On the H100 machine the call of the next MoE
layer's `attention_route` took ~0.5 ms of the step's thread after the host CPU's share (benchmarks/offload.md, runs
23-25), ~0.1 ms on the dev box's CPU backend, and it sits on the step's critical path: the program needs the host
share's sum. This times that call alone, the device idle before each (median and 90th percentile of --reps calls),
in forms that take one cost away at a time:

- as a decode step makes it: the previous MoE layer's terms (`Unsummed`, the host share in a pinned host buffer,
  `host_path.ShareLanding`) and the layer's cache stacks donated; and with the host share a numpy array, as steps
  passed it up to run 28;
- the host share already on the device (`jax.device_put` beforehand, untimed);
- the terms summed beforehand: one array for the hidden states;
- a program that only sums the same arguments (what passing them costs, without attention's kernels);
- a program of one small argument (a dispatch's floor);
- `jax.device_put` of the host share alone;
- the copies to the host a MoE layer starts before it waits for its routing: h, the weights and the ids apart, the
  ids alone, and the three packed in one array (`segments.Routing`, as a step copies them since run 26);
- the whole round trip a step waits for: the call, its outputs ready, its routing on the host;
- on a GPU, the program compiled without XLA's CUDA graphs (command buffers), whose update a call may pay;
- a MoE layer's link transfers of 3 host experts started: by `jax.device_put` of their pinned host buffers (as
  `ExpertStore.fetch` did up to run 26), or by one program (`fetch(..., move="program")`, as a fused layer's
  transfers start since); each also until landed.

- as a decode step makes it, with the device still busy with earlier work (as in a step: the layer's device share
  may still run when the next layer's attention is called);
- the program's own time on the device: queued behind ~1 ms of work, so that its kernels were all launched before
  the device reached them, less that work alone;
- the routing written to pinned host memory by the program itself (`jax.device_put(..., jax.memory.Space.Host)`
  inside it), no copy started after the call: the round trip;
- on a GPU, the program compiled with XLA's CUDA graphs forced on for every run of kernels
  (`xla_gpu_graph_min_graph_size` 1): is the call's time its kernels' launches?

It also prints how many fusions and custom calls the compiled program has.

One MoE layer of DeepSeek-V3's sizes (random weights; int4 routed experts in host memory, not used here), or small
ones with --tiny:

    python3 scripts/probe_dispatch.py [--tiny] [--reps 50]
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_layer import decode_layer, probe_args  # noqa: E402


def main() -> None:
    args = probe_args(__doc__, 50)

    import jax
    import jax.numpy as jnp

    from ktjax.runtime.model import StepStats
    from ktjax.runtime.offload.segments import settle

    layer = decode_layer(args.tiny)
    cfg, ex, i, seg, state, j = layer.cfg, layer.ex, layer.i, layer.seg, layer.state, layer.j
    rope, start_B, latent_rp = layer.rope, layer.start_B, layer.latent_rp
    dtype = jnp.bfloat16
    D = cfg.hidden_size
    host_np = np.zeros((1, D), np.float32)
    host_dev = jax.device_put(host_np)
    host_pinned = ex.host.landing.put(host_np)  # as a step passes it since run 28 (`host_path.ShareLanding`)
    summed = jax.jit(settle)(layer.terms(host_dev))
    sum_args = jax.jit(lambda state, x, rope, start_B, latent, rp, j: settle(x).sum())
    one_arg = jax.jit(lambda a: a + 1)
    small = jnp.zeros((8,), jnp.float32)

    def attention(x):
        return lambda: layer.call(seg.attention_route, x)

    def copies(which):  # what a MoE layer starts before it waits for its routing on the host
        def call():
            out = jax.block_until_ready(layer.call(seg.attention_route, summed))
            t = time.perf_counter()
            for a in which(out[1]):
                a.copy_to_host_async()
            return time.perf_counter() - t, out
        return call

    def round_trip(x, program=None):
        def call():
            out = layer.call(program or seg.attention_route, x)
            out[1].start_copies(host_inputs=True)
            out[1].ids_on_host()  # what the split waits for
            return out
        return call

    hosted = [e for e in range(cfg.n_routed_experts) if ex.store.is_hosted(i, e)][:3]
    fetched = StepStats()

    def fetch(by_program: bool):  # a fused layer's transfers, as `moe_block.fused_moe` starts them
        return lambda: ex.store.fetch(i, hosted, fetched, move="program" if by_program else "put")
    step_args = (state, layer.terms(host_pinned), rope, start_B, *latent_rp, j)
    print(kernel_counts(seg.attention_route.lower(*step_args).compile().as_text()))
    busy_DD = jnp.ones((4096, 4096), dtype)
    busy = jax.jit(lambda a: functools.reduce(lambda acc, _: (acc @ a) * 1e-3, range(8), a))

    def while_busy(call):
        def run():
            busy(busy_DD)  # ~1 ms queued ahead of the call, not waited for
            t = time.perf_counter()
            out = call()
            return time.perf_counter() - t, out
        return run

    def program_time(call):  # the device's time for the call's program, its launches ahead of the device
        def run():
            jax.block_until_ready(busy(busy_DD))
            t = time.perf_counter()
            jax.block_until_ready(busy(busy_DD))
            alone = time.perf_counter() - t
            t = time.perf_counter()
            busy(busy_DD)
            jax.block_until_ready(call())
            return time.perf_counter() - t - alone, None
        return run

    def routing_to_host(*a):  # the packed routing written to pinned host memory by the program
        x, r, latent, rp = seg.attention_route.__wrapped__(*a)
        return x, r._replace(for_host=jax.device_put(r.for_host, jax.memory.Space.Host)), latent, rp

    to_host = jax.jit(routing_to_host, donate_argnums=(4, 5))

    def round_trip_to_host():
        out = layer.call(to_host, layer.terms(host_pinned))
        out[1].ids_on_host()
        return out

    forms = {
        "as a decode step calls it (host share in a pinned buffer)": attention(
            layer.terms(host_pinned)),
        "the same, the host share a numpy array (steps to run 28)": attention(
            layer.terms(host_np)),
        "the same with the device still busy": while_busy(attention(
            layer.terms(host_pinned))),
        "the host share already on the device": attention(layer.terms(host_dev)),
        "the terms summed beforehand (one array)": attention(summed),
        "a program that only sums the same arguments": lambda: sum_args(
            state, layer.terms(host_pinned), rope, start_B, *latent_rp, j),
        "a program of one small argument": lambda: one_arg(small),
        "jax.device_put of the host share": lambda: jax.device_put(host_np),
        "copy_to_host_async of the routing's h, w, ids (three)": copies(lambda r: (r.h_ND, r.w_NK, r.idx_NK)),
        "copy_to_host_async of the expert ids alone": copies(lambda r: (r.idx_NK,)),
        "copy_to_host_async of the three packed (the step's)": copies(lambda r: (r.for_host,)),
        "the call until its outputs are ready": lambda: jax.block_until_ready(
            attention(layer.terms(host_pinned))()),
        "round trip: the call to its expert ids on the host": round_trip(
            layer.terms(host_pinned)),
        "the program's time on the device (its launches ahead)": program_time(attention(
            layer.terms(host_pinned))),
        "round trip, the program writing its routing to the host": round_trip_to_host,
        f"jax.device_put of {len(hosted)} host experts": fetch(False),
        f"a program copying {len(hosted)} host experts to the device": fetch(True),
        f"jax.device_put of {len(hosted)} host experts, until landed": lambda: jax.block_until_ready(fetch(False)()),
        f"a program copying {len(hosted)} host experts, until landed": lambda: jax.block_until_ready(fetch(True)()),
    }
    if jax.default_backend() == "gpu":
        no_graphs = jax.jit(seg.attention_route.__wrapped__, donate_argnums=(4, 5),
                            compiler_options={"xla_gpu_enable_command_buffer": ""})
        print("without CUDA graphs:", kernel_counts(no_graphs.lower(*step_args).compile().as_text()))

        def attention_no_graphs():
            return layer.call(no_graphs, layer.terms(host_pinned))

        forms["without CUDA graphs: as a decode step calls it"] = attention_no_graphs
        forms["without CUDA graphs: round trip to the expert ids"] = round_trip(
            layer.terms(host_pinned), no_graphs)
        forced = jax.jit(seg.attention_route.__wrapped__, donate_argnums=(4, 5), compiler_options={
            "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL", "xla_gpu_graph_min_graph_size": 1})
        try:
            print("CUDA graphs forced:", kernel_counts(forced.lower(*step_args).compile().as_text()))
        except Exception as e:  # an option this XLA does not know
            print(f"CUDA graphs forced: not compiled ({type(e).__name__}: {str(e)[:200]})")
        else:
            def attention_forced():
                return layer.call(forced, layer.terms(host_pinned))

            forms["CUDA graphs forced: as a decode step calls it"] = attention_forced
            forms["CUDA graphs forced: the call until ready"] = lambda: jax.block_until_ready(attention_forced())
            forms["CUDA graphs forced: round trip to the expert ids"] = round_trip(
                layer.terms(host_pinned), forced)
            forms["CUDA graphs forced: the program's time on the device"] = program_time(attention_forced)
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer, {args.reps} calls each, "
          f"the device idle before each; host shares land in place: {ex.host.landing.in_place}")
    for name, call in forms.items():
        jax.block_until_ready(call())  # compiled
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            out = call()
            took = time.perf_counter() - t
            if isinstance(out, tuple) and isinstance(out[0], float):  # it timed its own part
                took, out = out
            times.append(took)
            jax.block_until_ready(out)
        us = np.array(times) * 1e6
        print(f"  {name:55s} median {np.median(us):7.1f} us   90th percentile {np.percentile(us, 90):7.1f} us",
              flush=True)


def kernel_counts(hlo: str) -> str:
    """What a compiled program launches, from its optimized HLO: fusions and custom calls (cuBLAS, Pallas). Which of
    them XLA puts in CUDA graphs is decided past this text (run 26 found no trace of them here)."""
    lines = [line for line in hlo.splitlines() if " = " in line]
    count = {kind: sum(f" {kind}(" in line for line in lines) for kind in ("fusion", "custom-call")}
    return f"compiled attention_route: {count['fusion']} fusions, {count['custom-call']} custom calls"


if __name__ == "__main__":
    main()
