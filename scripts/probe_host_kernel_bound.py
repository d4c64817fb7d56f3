"""Are the host CPU's int4 and int8 kernels (int8 activations, 1 token) bound by memory or by their own
instructions? One thread and all (or --threads N), on 16 distinct full-size gate_up matrices (4096 x 7168;
together above the L3): int4 through the AVX2 kernel and the AVX-512 VNNI kernel where the CPU has it, int8
through its kernel, each beside a plain parallel sum over the same bytes (what memory gives those threads).

    python scripts/probe_host_kernel_bound.py [--threads 1 2 16]
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from numba import njit, prange

from benchparts import best_of
from ktjax.experts import host_kernels as hk
from ktjax.experts import host_simd

K = 16
SHAPES = {"gate_up": (4096, 7168), "down": (7168, 2048)}  # an expert's two matrices (rows, columns)


@njit(parallel=True, nogil=True)
def plain_read(addrs, words):
    parts = 64
    tot = np.zeros(addrs.shape[0] * parts, np.uint64)
    for job in prange(addrs.shape[0] * parts):
        a = numba.carray(host_simd.voidptr(addrs[job // parts]), (words,), np.uint64)
        chunk = words // parts
        s = np.uint64(0)
        for i in range((job % parts) * chunk, (job % parts + 1) * chunk):
            s += a[i]
        tot[job] = s
    return tot.sum()


def best(f, n=5):
    """The fastest of n calls after one to compile (`benchparts.best_of`)."""
    f()
    return best_of(f, reps=1, rounds=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, numba.config.NUMBA_NUM_THREADS])
    ap.add_argument("--shapes", nargs="+", default=["gate_up"], choices=list(SHAPES),
                    help="which of an expert's matrices: gate_up (4096 x 7168) or down (7168 x 2048, short rows)")
    args = ap.parse_args()
    for shape in args.shapes:
        print(f"== {shape}")
        probe(*SHAPES[shape], args.threads)


def probe(R: int, C: int, thread_counts: list[int]) -> None:
    G, S = C // 32, C // 256
    rng = np.random.default_rng(0)
    arrays = dict(q=[rng.integers(0, 256, (R, C // 2), dtype=np.uint8) for _ in range(K)],
                  sc=[rng.integers(0, 64, (R, G), dtype=np.uint8) for _ in range(K)],
                  mn=[rng.integers(0, 64, (R, G), dtype=np.uint8) for _ in range(K)],
                  d=[rng.uniform(0, 1e-3, (R, S)).astype(np.float32) for _ in range(K)],
                  dmin=[rng.uniform(0, 1e-3, (R, S)).astype(np.float32) for _ in range(K)])
    addr = {n: np.array([a.ctypes.data for a in v], np.int64) for n, v in arrays.items()}
    nbytes = sum(a.nbytes for v in arrays.values() for a in v)
    xq = rng.integers(-127, 128, (K, 1, C), dtype=np.int8)
    xs = rng.uniform(0, 0.01, (K, 1, G)).astype(np.float32)
    xsum = rng.uniform(-1, 1, (K, 1, G)).astype(np.float32)
    ntok = np.ones(K, np.int64)
    kernels = {"avx2": hk.matvec_int4_q8}
    if hk.INT4_VNNI:
        kernels["avx512-vnni"] = hk.matvec_int4_q8_vnni
    outs = {}
    print(f"GB/s of int4 weights, {K} matrices {R} x {C}, 1 token, best of 5")
    for n in thread_counts:
        numba.set_num_threads(n)
        row = {"plain read": K * R * C // 2 / best(lambda: plain_read(addr["q"], R * C // 16)) / 1e9}
        for name, kernel in kernels.items():
            out = outs.setdefault(name, np.zeros((K, 1, R), np.float32))
            row[name] = nbytes / best(lambda: kernel(addr["q"], addr["sc"], addr["mn"], addr["d"], addr["dmin"], R, C,
                                                     xq.ctypes.data, xs, xsum, ntok, out)) / 1e9
        print(f"{n:3d} threads: " + "   ".join(f"{k} {v:.1f}" for k, v in row.items()))
    if len(outs) == 2:
        a, b = outs.values()
        print(f"int4 kernels agree to {float(np.abs(a - b).max() / np.abs(a).max()):.1e} (relative)")
    del arrays
    q8 = [rng.integers(-127, 128, (R, C), dtype=np.int8) for _ in range(K)]
    s8 = [(rng.uniform(0.5, 1, (R, G)) * 1e-3).astype(np.float16).view(np.uint16) for _ in range(K)]
    qa, sa = (np.array([a.ctypes.data for a in v], np.int64) for v in (q8, s8))
    out = np.zeros((K, 1, R), np.float32)
    nbytes = sum(a.nbytes for a in q8) + sum(a.nbytes for a in s8)
    print("GB/s of int8 weights, the same shapes")
    for n in thread_counts:
        numba.set_num_threads(n)
        read = K * R * C / best(lambda: plain_read(qa, R * C // 8)) / 1e9
        int8 = nbytes / best(lambda: hk.matvec_int8_q8(qa, sa, R, C, xq.ctypes.data, xs, ntok, out, hk.F16_POW2)) / 1e9
        print(f"{n:3d} threads: plain read {read:.1f}   int8 {int8:.1f}")


if __name__ == "__main__":
    main()
