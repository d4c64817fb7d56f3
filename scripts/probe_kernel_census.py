"""What a batch-1 decode step's attention program launches, part by part, and what each part's call costs. The
next MoE layer's `attention_route` call took 0.2-0.35 ms of the step's thread on the H100 machine against ~0.15 ms
of device time (offload.md, run 30): the device waits on the launches. This compiles the program and its parts
apart (the previous layer's terms summed; attention with its cache update; the routing) and prints, for each, its
kernels by kind from the optimized HLO (fusions named by XLA after their root, custom calls, copies), and the median
call time of --reps calls, the device idle before each:

    python3 scripts/probe_kernel_census.py [--tiny] [--reps 40]
"""

from __future__ import annotations

import collections
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_layer import decode_layer, probe_args  # noqa: E402


def main() -> None:
    args = probe_args(__doc__, 40, **{"--hlo": dict(help="write each program's optimized HLO into this folder")})

    import jax
    import jax.numpy as jnp

    from ktjax.runtime.offload.segments import settle

    layer = decode_layer(args.tiny)
    cfg, ex, seg, state, j = layer.cfg, layer.ex, layer.seg, layer.state, layer.j
    rope, start_B, latent_rp = layer.rope, layer.start_B, layer.latent_rp
    D = cfg.hidden_size
    terms = layer.terms(ex.host.landing.put(np.zeros((1, D), np.float32)))
    summed = jax.jit(settle)(terms)

    def cached(program):  # the cache stacks donated: the next call takes the new ones
        return lambda x: layer.call(program, x)

    programs = {
        "attention_route (as a step calls it)": (seg.attention_route, cached(seg.attention_route), terms),
        "attention alone, its input summed": (seg.attention, cached(seg.attention), summed),
        "routing alone": (seg.route, lambda x: seg.route(state, x), summed),
        "the terms summed alone": (jax.jit(settle), jax.jit(settle), terms),
    }
    if jax.default_backend() == "gpu":  # every run of kernels in a CUDA graph, however short
        for option in ("FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL", ""):
            forced = jax.jit(seg.attention_route.__wrapped__, donate_argnums=(4, 5), compiler_options={
                "xla_gpu_enable_command_buffer": option, "xla_gpu_graph_min_graph_size": 1})
            programs[f"attention_route, command buffers '{option}'"] = (forced, cached(forced), terms)
    # A step calls one executable for every MoE layer, each with its own weights: does that cost the call (a CUDA
    # graph updated for new addresses), and would an executable per layer not?
    copies = [jax.tree.map(jnp.copy, state) for _ in range(4)]
    turn = [0]

    def in_turn(programs_of_layer):
        def call(x):
            k = turn[0] = (turn[0] + 1) % len(copies)
            return layer.call(programs_of_layer(k), x, copies[k])
        return call

    own = [jax.jit(lambda *a, _k=k: seg.attention_route.__wrapped__(*a), donate_argnums=(4, 5))
           for k in range(len(copies))]
    programs["attention_route, 4 layers' weights in turn"] = (seg.attention_route, in_turn(
        lambda k: seg.attention_route), terms)
    programs["attention_route, 4 layers' weights, an executable each"] = (seg.attention_route, in_turn(
        lambda k: own[k]), terms)
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer, {args.reps} calls each")
    for name, (jitted, call, x) in programs.items():
        lower_args = (x,) if jitted is programs["the terms summed alone"][0] else None
        if lower_args is None:
            lower_args = ((state, x) if jitted is seg.route else (state, x, rope, start_B, *latent_rp, j))
        hlo = jitted.lower(*lower_args).compile().as_text()
        if args.hlo:
            os.makedirs(args.hlo, exist_ok=True)
            with open(os.path.join(args.hlo, re.sub(r"\W+", "_", name) + ".txt"), "w") as f:
                f.write(hlo)
        for _ in range(len(copies)):  # every executable compiled
            jax.block_until_ready(call(x))
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            out = call(x)
            times.append(time.perf_counter() - t)
            jax.block_until_ready(out)
        kernels = census(hlo)
        print(f"  {name:40s} call median {np.median(times) * 1e6:6.0f} us; {sum(kernels.values())} kernels: "
              + ", ".join(f"{k} {n}" for k, n in kernels.most_common()), flush=True)


def census(hlo: str) -> collections.Counter:
    """The entry computation's launches by kind: fusions by XLA's name for them (their root op), custom calls by
    target, and copies, from the optimized HLO's ENTRY block."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    count: collections.Counter = collections.Counter()
    for line in entry.splitlines():
        m = re.search(r"= \S+ (fusion|custom-call|copy|copy-start|dynamic-update-slice|sort|scatter|gather)\(", line)
        if not m:
            m2 = re.search(r"= \S+ ([a-z-]+)\(", line)
            if m2 and m2.group(1) not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
                count[m2.group(1)] += 1
            continue
        op = m.group(1)
        if op == "fusion":
            name = re.match(r"\s*(?:ROOT )?%?([\w.-]+)", line).group(1)
            count[re.sub(r"[.\d]+$", "", name)] += 1
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            count[f"custom-call {target.group(1) if target else '?'}"] += 1
        else:
            count[op] += 1
    return count


if __name__ == "__main__":
    main()
