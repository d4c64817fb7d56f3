"""Are the host CPU's int4 and int8 kernels (int8 activations, 1 token) bound by memory or by their own
instructions? One thread and all (or --threads N), on 16 distinct full-size gate_up matrices (4096 x 7168;
together above the L3): int4 through the AVX2 kernel and the AVX-512 VNNI kernel where the CPU has it, int8
through its kernel, each beside a plain parallel sum over the same bytes (what memory gives those threads).
A bound beside the VNNI kernel: the same dot products with each row's scale work done once per 16 rows (wrong
numbers), which says how much of the kernel's time that per-row work takes.

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
MAX_GROUPS = hk.MAX_GROUPS  # a module constant: numba takes it as a literal (stack_f32 needs one)
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


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy")
def int4_vnni_scales_once(q_addr, sc_addr, mn_addr, d_addr, dmin_addr, R, C, xq_addr, xs_KTG, xsum_KTG, ntok_K,
                          out_KTR):
    """`hk.matvec_int4_q8_vnni` with each row's scales (`hk._int4_row_scales`) worked out once per 16 rows, not per
    row: wrong numbers, the same dot products, and the same bytes (each row's scale and minimum bytes are still
    read, one value per cache line, into out_KTR's sign). What the kernel would reach if its per-row scale work
    cost nothing (a bound, not a kernel)."""
    K, T = xs_KTG.shape[:2]
    G = C // hk.GROUP
    S = C // hk.SUPER
    blocks = (R + hk.ROWS - 1) // hk.ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * hk.ROWS
        sc, mn, d, dmin = hk._int4_scales(sc_addr[k], mn_addr[k], d_addr[k], dmin_addr[k], R, G, S)
        acc_p = host_simd.stack_f32(16)
        acc = numba.carray(acc_p, (16,))
        scale_p = host_simd.stack_f32(MAX_GROUPS)
        scale = numba.carray(scale_p, (MAX_GROUPS,))
        offset = hk._int4_row_scales(scale, sc, mn, d, dmin, r0, xs_KTG[k, 0], xsum_KTG[k, 0])
        for r in range(r0, min(R, r0 + hk.ROWS)):
            q_row = q_addr[k] + r * (C // 2)
            for t in range(ntok_K[k]):
                x_row = xq_addr + (k * T + t) * C
                for lane in range(16):
                    acc[lane] = 0
                for j in range(G // 4):
                    host_simd.int4_quad_dots(acc_p, q_row + j * 2 * hk.GROUP, x_row + j * 4 * hk.GROUP, scale_p, j)
                total = np.float32(0.0)
                for lane in range(16):
                    total += acc[lane]
                touched = 0
                for g in range(0, G, 64):  # one byte per 64-byte line of this row's scales and minimums
                    touched += sc[r, g] + mn[r, g]
                for g in range(0, S, 16):  # one float per line of its bases
                    touched += d[r, g] > 0
                    touched += dmin[r, g] > 0
                out_KTR[k, t, r] = total - offset if touched >= 0 else -total


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
        kernels["vnni, scales per 16 rows (bound)"] = int4_vnni_scales_once
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
    if len(outs) >= 2:
        a, b = list(outs.values())[:2]
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
