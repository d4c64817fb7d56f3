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
    print(f"a round trip through 3 hand-overs, no effect declared: {round_trip(handoff)}")


def round_trip(handoff: Handoff) -> str:
    """A program of 3 steps, each handing x's sine to the host and adding the host's answer (its square plus k), with
    the calls declared free of effects: whether what comes back is what the host answered (the calls kept, in order)."""
    @jax.jit
    def program(x):
        for _ in range(3):
            y = jnp.sin(x)
            handed = handoff.hand_over(y, side_effect=False)
            x = y + handoff.take_back(x.shape, x.dtype, handed, y, side_effect=False)
        return x

    handoff.received, handoff.sent = (int(c) for c in handoff.counters[:2])  # the timed calls' hand-overs: unread
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    job, want = handoff.launch(program, jnp.asarray(x)), x
    for k in range(3):
        got = handoff.receive(x.shape, np.float32).copy()
        handoff.answer(got * got + k)
        want = np.sin(want) + np.sin(want) ** 2 + k
    err = float(np.abs(np.asarray(job.result()) - want).max())
    return f"max |difference| {err:.2e} ({'right' if err < 1e-4 else 'WRONG'})"


if __name__ == "__main__":
    main()
