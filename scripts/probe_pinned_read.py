"""Does where an expert's buffer lives change how fast the host CPU reads it? The same int4 and int8 experts
(int8 activations, 1 token, 8 per call, rotating over 24 so the L3 holds none) read by a plain parallel sum and
computed by `HostExperts`, from three kinds of host memory:

- numpy arrays, which numpy backs with transparent huge pages where the kernel allows it (madvise);
- numpy arrays with huge pages refused (4 KiB pages);
- numpy arrays on memory mapped here with huge pages asked for (madvise), and the same registered with the CUDA
  driver (`cuMemHostRegister`: page-locked, so the link can copy from it directly);
- JAX's pinned host buffers (what ktjax keeps experts in, so the link can copy them), read through
  zero-copy views.

On a machine without a GPU the rows that need one are left out. Each row also times the link: `jax.device_put`
of 8 experts from that memory to the GPU.

benchmarks/host_experts.md (run 4) found the int4 kernel at 124 GB/s on numpy arrays and `HostExperts` at 63 GB/s
on pinned buffers, on the same 16 cores. This separates the memory from the call.

    python3 scripts/probe_pinned_read.py [--threads 14]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchparts import best_of  # noqa: E402
from probe_host_kernel_bound import plain_read  # noqa: E402

from ktjax.experts.host import HostExperts, assignments  # noqa: E402
from ktjax.experts.packed import PackedLayout  # noqa: E402

N_EXPERTS, PER_CALL = 24, 8


def huge_pages_used() -> int:
    with open("/proc/meminfo") as f:
        return next((int(line.split()[1]) << 10 for line in f if line.startswith("AnonHugePages")), 0)


def mapping_of(addr: int) -> str:
    """The /proc/self/smaps entry holding addr, condensed: its size, page sizes, huge pages, and flags."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            if lo <= addr < hi:
                info = {}
                for entry in lines[i + 1:]:
                    key = entry.split(":")[0]
                    if "-" in entry.split()[0] and " " in entry and ":" not in entry.split()[0]:
                        break
                    if key in ("Size", "KernelPageSize", "AnonHugePages", "Locked", "VmFlags"):
                        info[key] = entry.split(":", 1)[1].strip()
                    if key == "VmFlags":
                        break
                return f"{(hi - lo) >> 20} MiB {' '.join(head[1:])}; " + "; ".join(f"{k} {v}" for k, v in info.items())
    return "not found"


def small_pages(nbytes: int) -> np.ndarray:
    """A uint8 array on anonymous memory that refuses transparent huge pages."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, np.uint8)


def huge_pages(nbytes: int) -> np.ndarray:
    """A uint8 array on anonymous memory aligned to 2 MiB, with transparent huge pages asked for."""
    align = 2 << 20
    m = mmap.mmap(-1, nbytes + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    base = np.frombuffer(m, np.uint8)
    off = -base.ctypes.data % align
    return base[off:off + nbytes]


def cuda_register(a: np.ndarray) -> None:
    """Page-lock a host array and map it for the GPU (the CUDA driver's cuMemHostRegister, portable)."""
    cu = ctypes.CDLL("libcuda.so.1")

    def check(rc, what):
        if rc:
            raise RuntimeError(f"{what} failed with CUDA error {rc}")

    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check(cu.cuInit(0), "cuInit")
    check(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cu.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        check(cu.cuMemHostRegister_v2(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes), ctypes.c_uint(1)),
              "cuMemHostRegister")
    finally:
        cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def placements(proto: np.ndarray) -> dict[str, list[np.ndarray]]:
    out = {"numpy (numpy's own allocation)": [np.roll(proto, e) for e in range(N_EXPERTS)]}
    for name, alloc in (("4 KiB pages", small_pages), ("huge pages asked for", huge_pages)):
        out[name] = []
        for e in range(N_EXPERTS):
            a = alloc(proto.nbytes)
            a[:] = np.roll(proto, e)
            out[name].append(a)
    try:
        import jax
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            registered = []
            for e in range(N_EXPERTS):
                a = huge_pages(proto.nbytes)
                a[:] = np.roll(proto, e)
                cuda_register(a)
                registered.append(a)
            out["huge pages, cuMemHostRegister"] = registered
            host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
            bufs = [jax.device_put(np.roll(proto, e), host) for e in range(N_EXPERTS)]
            jax.block_until_ready(bufs)
            out["JAX pinned host (zero-copy views)"] = [np.asarray(b) for b in bufs]
            out["_keep"] = bufs  # the views borrow these buffers
    except Exception as err:  # noqa: BLE001 (a probe: say why the row is missing)
        print(f"no pinned row: {err}")
    return out


def link_rate(bufs: list, nbytes: int) -> float:
    """GB/s of `jax.device_put` of 8 of these experts at a time to the GPU (0 without one)."""
    import jax
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return 0.0
    dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")  # pinned buffers need the kind named
    calls = [0]

    def put():
        start = PER_CALL * (calls[0] % 3)
        calls[0] += 1
        return jax.device_put(bufs[start:start + PER_CALL], dev)

    jax.block_until_ready(put())
    return nbytes / best_of(put, reps=3, rounds=5) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--formats", nargs="+", default=["int4", "int8"])
    ap.add_argument("--small", action="store_true", help="small experts: a check of the script")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        print("transparent huge pages:", f.read().strip())
    F, D = (256, 1024) if args.small else (2048, 7168)
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads, {PER_CALL} experts per call of {N_EXPERTS}, 1 token, best of 7; GB/s of experts")
    print(f"{'format':6s} {'memory':36s} {'plain read':>10s} {'HostExperts':>11s} {'link':>6s}")
    for fmt in args.formats:
        L = PackedLayout(fmt, F, D)
        proto = L.pack(*(rng.standard_normal(s).astype(np.float32) * 0.02 for s in ((F, D), (F, D), (D, F))))
        kernels = HostExperts(L, "int8")
        x = rng.standard_normal((1, D)).astype(np.float32)
        before = huge_pages_used()
        experts = placements(proto)
        for name, bufs in experts.items():
            if name.startswith("_"):
                continue
            addrs = np.array([b.ctypes.data for b in bufs], np.int64)
            print(f"       {name}: {mapping_of(int(addrs[0]))}")
            calls = [0]

            def read():
                group = addrs[PER_CALL * (calls[0] % 3):PER_CALL * (calls[0] % 3 + 1)]
                calls[0] += 1
                return plain_read(group, L.nbytes // 8)

            def compute():
                chosen = np.arange(PER_CALL) + PER_CALL * (calls[0] % 3)
                calls[0] += 1
                tok, w, nt = assignments(chosen[None, :], np.full((1, PER_CALL), 1 / PER_CALL, np.float32), chosen)
                return kernels.compute(addrs[chosen], tok, nt, w, x)

            read(), compute()  # compiled
            nbytes = PER_CALL * L.nbytes
            r = nbytes / best_of(read, reps=3, rounds=7) / 1e9
            c = nbytes / best_of(compute, reps=3, rounds=7) / 1e9
            link = link_rate(bufs if not name.startswith("JAX") else experts["_keep"], nbytes)
            print(f"{fmt:6s} {name:36s} {r:10.1f} {c:11.1f} {link:6.1f}")
        grew = (huge_pages_used() - before) / 2**20
        print(f"       AnonHugePages grew by {grew:.0f} MiB while {fmt}'s buffers were made")


if __name__ == "__main__":
    main()
