"""What a handoff layer's fill costs the host's thread on a GPU, per driver call: the copies `Handoff.fill` queues
(`handoff_targets.queue_copies`) into a program's expert slots, 5 device-to-device (resident experts) and 1-3
host-to-device (the link's), each one expert of --expert-bytes. In the GPU timelines of offload.md runs 56-61 the fill
took 0.13-0.14 ms of a ~1.9 ms layer; run 61's trace shows its driver calls at ~0.02 ms each. Timed here: one
`queue_copies` call of the whole table through `cuMemcpyAsync` (which looks up each pointer's kind, as `fill` uses
now) against the typed entry points (`cuMemcpyDtoDAsync`, `cuMemcpyHtoDAsync`), the stream drained between
calls; and `cuCtxSetCurrent` (`CudaDriver.bind`, called once a fill since 01741c6, twice before). Medians of --reps
calls, host time.

    python3 scripts/probe_fill_calls.py [--reps 200] [--expert-bytes 23068672]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.runtime.offload.handoff_targets import CudaDriver, Pinned, queue_copies


def timed(fn, reps: int, drain) -> float:
    times = []
    for _ in range(reps + 3):  # the first 3: warm-up
        drain()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    drain()
    return statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--expert-bytes", type=int, default=22 * 2**20, help="one int4 expert is ~22 MiB")
    args = p.parse_args()
    device = jax.devices()[0]
    cuda, nb = CudaDriver(device.local_hardware_id), args.expert_bytes
    resident = [jnp.zeros(nb, jnp.uint8, device=device) for _ in range(5)]
    slots = [jnp.zeros(nb, jnp.uint8, device=device) for _ in range(8)]
    host = [Pinned(nb, cuda) for _ in range(3)]
    jax.block_until_ready(resident + slots)
    lib = cuda.lib

    def drain():
        cuda.check("cuStreamSynchronize", lib.cuStreamSynchronize(cuda.stream))

    rows = []
    for n_link in (1, 3):
        dests = [s.unsafe_buffer_pointer() for s in slots]
        table = np.array([(dests[k], r.unsafe_buffer_pointer(), nb) for k, r in enumerate(resident)]
                         + [(dests[5 + k], h.host, nb) for k, h in enumerate(host[:n_link])], np.int64)
        n = len(table)

        def untyped():
            cuda.check("queue_copies", queue_copies(cuda.copy, cuda.write_value, cuda.stream.value, table, n, 0, 0))

        def typed():  # device-to-device first, then host-to-device, as the table is ordered
            cuda.check("queue_copies", queue_copies(cuda.on_device, cuda.write_value, cuda.stream.value, table[:5], 5,
                                                    0, 0))
            cuda.check("queue_copies", queue_copies(cuda.to_device, cuda.write_value, cuda.stream.value, table[5:],
                                                    n - 5, 0, 0))

        rows.append((f"5 device + {n_link} host experts, cuMemcpyAsync", timed(untyped, args.reps, drain), n))
        rows.append((f"5 device + {n_link} host experts, typed entry points", timed(typed, args.reps, drain), n))
    rows.append(("cuCtxSetCurrent (`bind`)", timed(cuda.bind, args.reps, lambda: None), 1))
    ctypes_call = lambda: lib.cuCtxSetCurrent(cuda.ctx)  # noqa: E731
    rows.append(("cuCtxSetCurrent through ctypes alone", timed(ctypes_call, args.reps, lambda: None), 1))
    print(f"{device.device_kind}, {nb} bytes an expert, median of {args.reps} calls (host time):")
    print("| what | a call | per copy |")
    print("| --- | ---: | ---: |")
    for what, t, n in rows:
        print(f"| {what} | {t * 1e6:.1f} us | {t * 1e6 / n:.1f} us |")


if __name__ == "__main__":
    main()
