"""Host-CPU expert kernels against the host link, on full-size DeepSeek-V3 experts (7168 x 2048):
how fast the numba int8/int4 kernels read the experts where they live, alone and while the link
streams other experts to the GPU (the two paths share host memory), and what a call costs.

    python3 scripts/bench_host_experts.py            # on the GPU machine; --tiny on a laptop

Prints one table last; the raw numbers go to $OUT/bench_host_experts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def median_s(f, n=7, warm=2):
    for _ in range(warm):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--experts", type=int, default=32, help="distinct experts in host memory (the CPU rows cycle through them: keep their bytes above the L3)")
    p.add_argument("--threads", type=int, nargs="*", default=[], help="numba thread counts to try")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    import jax
    import numba

    from ktjax.experts.host import HostExperts, assignments
    from ktjax.experts.packed import PackedLayout

    F, D = (64, 256) if args.tiny else (2048, 7168)
    res = {"numba": numba.__version__, "jax": jax.__version__, "numpy": np.__version__,
           "numba_threads": numba.config.NUMBA_NUM_THREADS, "cpus": os.cpu_count(),
           "devices": [str(d) for d in jax.devices()]}
    try:
        with open("/proc/cpuinfo") as f:
            res["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print("ENV " + json.dumps(res), flush=True)
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    rng = np.random.default_rng(0)
    rows = []

    # The link alone: per-expert device_put of 8 experts of each format.
    for fmt in ("int8", "int4"):
        L = PackedLayout(fmt, F, D)
        t = time.perf_counter()
        proto = L.pack(rng.standard_normal((F, D), np.float32) * 0.02, rng.standard_normal((F, D), np.float32) * 0.02,
                       rng.standard_normal((D, F), np.float32) * 0.02)
        res[f"{fmt}_pack_s"] = time.perf_counter() - t
        bufs = [jax.device_put(np.roll(proto, e), host) for e in range(args.experts)]
        jax.block_until_ready(bufs)
        views = [np.asarray(b) for b in bufs]  # zero-copy on a GPU machine's pinned memory
        bases = np.array([v.ctypes.data for v in views], np.int64)
        res[f"{fmt}_zero_copy"] = bool(views[0].ctypes.data == bufs[0].addressable_data(0).unsafe_buffer_pointer())
        he = HostExperts(L)
        x = rng.standard_normal((8, D)).astype(np.float32)

        def link(k=8, start=0):
            jax.block_until_ready(jax.device_put([bufs[(start + e) % len(bufs)] for e in range(k)], on_dev))

        t_link = median_s(link)
        rows.append((fmt, "link: 8 experts, device_put each", t_link, 8 * L.nbytes))

        calls = [0]

        def cpu(k, tokens=1, start=8, he=he):
            # The next k experts each call, around all of them: the same k again would be read from the
            # CPU's caches (the H200 host's L3 is 300 MiB; offload.md, run 14), a step's come from DRAM.
            chosen = (start + k * calls[0] + np.arange(k)) % len(bufs)
            calls[0] += 1
            idx = np.stack([np.roll(chosen, -n)[:min(k, 8)] for n in range(tokens)])
            w = np.full(idx.shape, 1.0 / idx.shape[1], np.float32)
            tok, wt, nt = assignments(idx, w, chosen)
            he.compute(bases[chosen], tok, nt, wt, x[:tokens])

        for k in (1, 2, 4, 8):
            rows.append((fmt, f"cpu: {k} experts, 1 token", median_s(lambda: cpu(k)), k * L.nbytes))
        # As the executor calls them: from one worker thread (the main thread dispatches GPU work meanwhile).
        worker = ThreadPoolExecutor(1)
        for k in (2, 4):
            rows.append((fmt, f"cpu: {k} experts, 1 token, from a worker thread",
                         median_s(lambda: worker.submit(cpu, k).result()), k * L.nbytes))
        worker.shutdown()
        res["numba_threading_layer"] = numba.threading_layer()
        rows.append((fmt, "cpu: 8 experts, 8 tokens (each expert 8)", median_s(lambda: cpu(8, 8)), 8 * L.nbytes))
        # The int8-activation kernels (integer dots), the same experts.
        q8 = HostExperts(L, activations="int8")
        res["int8_dots"] = q8.int_dots
        for k, tokens in ((1, 1), (8, 1), (8, 8)):
            rows.append((fmt, f"cpu, int8 activations: {k} experts, {tokens} token(s)",
                         median_s(lambda: cpu(k, tokens, he=q8)), k * L.nbytes))
        if q8.vnni:  # the default above took AVX-512 VNNI: the AVX2 kernel beside it, in the same run
            res["int4_vnni"] = True
            avx2 = HostExperts(L, activations="int8", vnni=False)
            for k, tokens in ((8, 1), (8, 8)):
                rows.append((fmt, f"cpu, int8 activations, AVX2 kernel: {k} experts, {tokens} token(s)",
                             median_s(lambda: cpu(k, tokens, he=avx2)), k * L.nbytes))
        for n in args.threads:
            numba.set_num_threads(n)
            rows.append((fmt, f"cpu, int8 activations: 8 experts, 1 token, {n} threads",
                         median_s(lambda: cpu(8, he=q8)), 8 * L.nbytes))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        for n in args.threads:
            numba.set_num_threads(n)
            rows.append((fmt, f"cpu: 8 experts, 1 token, {n} threads", median_s(lambda: cpu(8)), 8 * L.nbytes))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

        # Both paths at once: the link streams in a thread while the CPU computes.
        stop = threading.Event()
        moved = [0]

        def stream():
            i = 0
            while not stop.is_set():
                link(8, 16 + 8 * (i % 2))
                moved[0] += 8 * L.nbytes
                i += 1

        th = threading.Thread(target=stream)
        th.start()
        time.sleep(0.2)
        m0, t0 = moved[0], time.perf_counter()
        n_cpu = 0
        while time.perf_counter() - t0 < (0.5 if args.tiny else 2.0):
            cpu(8)
            n_cpu += 1
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        res[f"{fmt}_both_cpu_gbps"] = n_cpu * 8 * L.nbytes / dt / 1e9
        res[f"{fmt}_both_link_gbps"] = (moved[0] - m0) / dt / 1e9
        rows.append((fmt, f"both at once: cpu {res[f'{fmt}_both_cpu_gbps']:.1f} + link "
                          f"{res[f'{fmt}_both_link_gbps']:.1f} GB/s", dt / max(n_cpu, 1), 8 * L.nbytes))
        del bufs, views

    res["rows"] = [dict(format=f, what=w, seconds=s, bytes=b, gbps=b / s / 1e9) for f, w, s, b in rows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_host_experts.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("| format | what | time | GB/s |\n| --- | --- | ---: | ---: |")
    for f, w, s, b in rows:
        print(f"| {f} | {w} | {s * 1e3:.2f} ms | {b / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
