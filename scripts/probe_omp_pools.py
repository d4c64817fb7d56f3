"""Numba parallel loops called from a second thread while the main thread's thread pool lives, against a thread
alone: median microseconds per call of a small parallel loop (64 rows x 4000 float32 sums).

    python3 scripts/probe_omp_pools.py main-first    # main thread, then a second thread, then main again
    python3 scripts/probe_omp_pools.py thread-only   # a second thread, the main thread never ran parallel code

Under numba's OpenMP layer each calling thread keeps a pool of its own; `ktjax serve` therefore runs the model's
loop on the main thread (`ktjax.serve.scheduler`). Dev box, 2 cores, 2026-12-04, three runs of each: main-first
thread 164-192 us (main 146-151, main again 143-153); thread-only 146-155 us.
"""

import sys
import threading
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True)
def work(a, out):
    for i in prange(out.shape[0]):
        s = 0.0
        for j in range(a.shape[1]):
            s += a[i, j]
        out[i] = s


def timed(a, out, n=2000) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        work(a, out)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


def in_thread(a, out) -> float:
    r = []
    th = threading.Thread(target=lambda: r.append(timed(a, out)))
    th.start()
    th.join()
    return r[0]


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "main-first"
    if mode not in ("main-first", "thread-only"):
        print(__doc__)
        return 2
    a, out = np.ones((64, 4000), np.float32), np.zeros(64, np.float32)
    if mode == "thread-only":
        print(f"thread, no main pool: {in_thread(a, out):.1f} us")
    else:
        work(a, out)  # the main thread's pool now exists
        print(f"main: {timed(a, out):.1f} us")
        print(f"thread, main pool alive: {in_thread(a, out):.1f} us")
        print(f"main again: {timed(a, out):.1f} us")
    print(f"threading layer: {numba.threading_layer()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
