"""How long the handoff protocol's round trip takes with no work on either side: a program of --rounds hand-overs,
each followed by a take-back of the host's answer, which the next hand-over depends on; this thread receives each
and answers at once (`runtime/offload/handoff.py`). In a handoff decode step (offload.md run 56, int4 at R1's share)
0.56 ms pass from the host's answer to the next layer's routing on the host, of which the device's own work
(attention, routing, the adds: run 54's trace) is ~0.27 ms: this measures what the protocol itself costs of the rest.

Per round, medians of --reps launches: the round trip (between the host's successive receives), and the device's
part alone (a second launch with every answer written before it, so that its waits find their flags set); the
difference is what the protocol's waits cost a round.

    python3 scripts/probe_handoff_latency.py [--rounds 200] [--reps 5] [--width 7232]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.runtime.offload.handoff import Handoff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200, help="hand-overs per program")
    p.add_argument("--reps", type=int, default=5, help="launches of each program")
    p.add_argument("--width", type=int, default=7168 + 64, help="float32 values handed over each way per round")
    args = p.parse_args()
    device, R = jax.devices()[0], args.rounds
    handoff = Handoff(device, slot_bytes=4 * args.width, slots=max(64, 2 * R + 2))
    x = jax.device_put(jnp.zeros((1, args.width), jnp.float32), device)

    def rounds(x):
        for _ in range(R):
            back = handoff.take_back(x.shape, jnp.float32, handoff.hand_over(x))
            x = x + back
        return x

    program = jax.jit(rounds)
    answer = np.ones((1, args.width), np.float32)
    trips, alone = [], []
    for rep in range(args.reps + 1):  # the first: the compile
        job = handoff.launch(program, x)
        seen = []
        for _ in range(R):
            handoff.receive((1, args.width), np.float32)
            seen.append(time.perf_counter())
            handoff.answer(answer)
        out = job.result()
        assert float(np.asarray(out)[0, 0]) == R, "the answers did not all reach the program"
        if rep:
            trips.append(statistics.median(np.diff(seen)))
        # The device alone: every answer written before the launch, so no wait holds its stream.
        for _ in range(R):
            handoff.answer(answer)
        t = time.perf_counter()
        job = handoff.launch(program, x)
        for _ in range(R):
            handoff.receive((1, args.width), np.float32)
        jax.block_until_ready(job.result())
        if rep:
            alone.append((time.perf_counter() - t) / R)
    trip, dev = statistics.median(trips), statistics.median(alone)
    print(f"{device.device_kind}, {R} rounds of {4 * args.width} bytes each way, median of {args.reps} launches:")
    print("| round trip (host receive to receive) | device alone, answers ready | the protocol's waits |")
    print("| ---: | ---: | ---: |")
    print(f"| {trip * 1e6:.1f} us | {dev * 1e6:.1f} us | {(trip - dev) * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
