"""How long a decode step's MoE layer takes from its routing reaching the host to its host kernels' first
instruction: the split, the transfers and the device's programs handed to the worker thread, and the host call's
own Python (all under the GIL), on the embedded model with every routed expert in host memory (int4, computed
by the host CPU).

    python scripts/probe_host_start.py [--threads 1] [--tokens 64] [--reps 3]

Prints, per repetition of a --tokens generation, the median and 90th percentile of that gap, the kernels' own
median time, and the time per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="host-kernel threads (0: the executor's default)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    import ktjax
    from ktjax.experts import host as host_experts
    from ktjax.runtime.offload import moe_block

    model = ktjax.load(None, experts="int4", expert_compute="cpu")
    model = dataclasses.replace(model, executor=model.executor.with_host_threads(args.threads or None))
    routed, started, ended = [], [], []

    def timed_kernels(kernels):  # the compiled call: its first instruction is the kernels'
        def call(*a):
            started.append(time.perf_counter())
            out = kernels(*a)
            ended.append(time.perf_counter())
            return out
        return call

    def timed_routing(*a, _routing_counts=moe_block.routing_counts, **k):
        out = _routing_counts(*a, **k)
        routed.append(time.perf_counter())
        return out

    moe_block.routing_counts = timed_routing
    host_experts.routed_sum = timed_kernels(host_experts.routed_sum)  # what HostExperts.compute calls
    ktjax.generate(model, "def main(", max_new_tokens=8)  # compile
    for _ in range(args.reps):
        for times in (routed, started, ended):
            times.clear()
        t = time.perf_counter()
        ktjax.generate(model, "def main(", max_new_tokens=args.tokens)
        per_token = (time.perf_counter() - t) / args.tokens
        n = min(len(routed), len(started))  # every MoE layer has a host share here
        gap = (np.array(started[:n]) - np.array(routed[:n])) * 1e6
        kernel = (np.array(ended[:n]) - np.array(started[:n])) * 1e6
        print(f"routing -> host kernels' start: median {np.median(gap):.0f} us, p90 {np.percentile(gap, 90):.0f} us; "
              f"kernels {np.median(kernel):.0f} us; {per_token * 1e3:.2f} ms per token ({n} MoE layers)", flush=True)


if __name__ == "__main__":
    main()
