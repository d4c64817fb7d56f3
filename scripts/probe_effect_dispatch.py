"""What a jitted program's call costs the calling thread when the program hands data to the host
(`runtime/offload/handoff.py`), with the handoff's call declared free of side effects (jax's C++ dispatch) or with
them (jax's Python dispatch, as up to the twenty-second session), against the same program without it. The handoff
form's launching thread makes such a call per MoE layer and must stay ahead of the device (offload.md run 45: each
took 2.5-3.3 ms there). The program sums --arrays small arrays (a MoE layer's program takes ~25); each call's
median over --calls calls, the device left to finish after each (asynchronous dispatch: the call only).

    python3 scripts/probe_effect_dispatch.py [--arrays 25] [--calls 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.runtime.offload.handoff import Handoff


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arrays", type=int, default=25)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    device = jax.devices()[0]
    handoff = Handoff(device, slot_bytes=4096, slots=64)
    arrays = [jax.device_put(np.full((16, 16), k, np.float32), device) for k in range(args.arrays)]

    def plain(*a):
        return sum(x.sum() for x in a)

    def handing(side_effect):
        def program(*a):
            s = plain(*a)
            return s, handoff.hand_over(jnp.full((4,), s), side_effect=side_effect)
        return program

    forms = {"no handoff": plain, "handoff, no effect declared": handing(False),
             "handoff, side effect declared": handing(True)}
    print(f"{jax.devices()[0].device_kind}, {args.arrays} arrays, median of {args.calls} calls (us)")
    for name, fn in forms.items():
        program = jax.jit(fn)
        jax.block_until_ready(program(*arrays))
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            out = program(*arrays)
            times.append(time.perf_counter() - t)
            jax.block_until_ready(out)
        print(f"  {name}: {1e6 * statistics.median(times):.0f}")


if __name__ == "__main__":
    main()
