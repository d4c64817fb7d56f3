"""Where a host-CPU expert call's time goes beyond its kernels. On the GPU machines' 14 threads the int4 VNNI
kernels alone read gate_up and down matrices at 88-102 GB/s (host_experts.md, run 5), while `HostExperts.compute`
on 8 experts reads them at ~54 GB/s. This times, on the same 8 int4 experts per call (rotating over 24, so the L3
holds none; int8 activations, 1 token, best of 7), from numpy memory:

- a plain parallel read of the experts' bytes;
- `HostExperts.compute`, the call a decode step makes;
- the same call with no token routed to any expert (its fixed cost: allocations, parallel regions, row loops);
- the gate_up kernel alone, the down kernel alone, and both back to back (their activations quantized beforehand);
- the call's parts beside the kernels at its shapes, each alone: the token copied per expert, the activations
  quantized for gate_up (per expert, as the call did up to the sixteenth session, and once per token, as it does
  since), SwiGLU and the activations quantized for down (single-threaded, as before, and the one parallel pass that
  does both since), the weighted sum, and the call's fresh arrays zeroed.

Run it again with glibc keeping freed memory (`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296`)
to see whether the call's fresh arrays cost page faults.

GB/s counts each row's own bytes (a matrix's rows with their scales; the call: whole experts).

    python3 scripts/probe_host_call_parts.py [--threads 14] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchparts import best_of  # noqa: E402
from probe_host_kernel_bound import plain_read  # noqa: E402

from ktjax.experts import host as host_experts  # noqa: E402
from ktjax.experts import host_kernels as hk  # noqa: E402
from ktjax.experts.host import HostExperts, assignments  # noqa: E402
from ktjax.experts.packed import PackedLayout  # noqa: E402

N_EXPERTS, PER_CALL = 24, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--small", action="store_true", help="small experts: a check of the script")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    F, D = (256, 1024) if args.small else (2048, 7168)
    rng = np.random.default_rng(0)
    L = PackedLayout("int4", F, D)
    proto = L.pack(*(rng.standard_normal(s).astype(np.float32) * 0.02 for s in ((F, D), (F, D), (D, F))))
    experts = [np.roll(proto, e) for e in range(N_EXPERTS)]
    bases = np.array([b.ctypes.data for b in experts], np.int64)
    kernels = HostExperts(L, "int8")
    if not kernels.vnni:
        sys.exit("this probe times the AVX-512 VNNI kernels, which this CPU does not have")
    x_1D = rng.standard_normal((1, D)).astype(np.float32)
    calls = [0]

    def chosen() -> np.ndarray:
        calls[0] += 1
        return np.arange(PER_CALL) + PER_CALL * (calls[0] % (N_EXPERTS // PER_CALL))

    weights = np.full((1, PER_CALL), 1 / PER_CALL, np.float32)

    def call(tokens: bool = True):
        ids = chosen()
        tok, w, ntok = assignments(ids[None, :], weights, ids)
        return kernels.compute(bases[ids], tok, ntok if tokens else np.zeros_like(ntok), w, x_1D)

    def read():
        return plain_read(bases[chosen()], L.nbytes // 8)

    def matrix(name: str):
        """The kernel on one matrix of each chosen expert, its activations quantized beforehand (as the call does)."""
        R, C, G = (int(v) for v in kernels._dims[name])
        x_KTC = rng.standard_normal((PER_CALL, 1, C)).astype(np.float32)
        ntok = np.ones(PER_CALL, np.int64)
        xq, xs, xsum = host_experts._quantized(x_KTC, ntok, G)
        out = np.zeros((PER_CALL, 1, R), np.float32)

        def run():
            a = bases[chosen()] + kernels._offsets[name]  # [arrays, K]
            hk.matvec_int4_q8_vnni(a[0], a[1], a[2], a[3], a[4], R, C, xq.ctypes.data, xs, xsum, ntok, out)
            return out
        return run, L.matrices[name]

    gate_up, gu = matrix("gate_up")
    down, dn = matrix("down")
    cells = {name: m.rows * m.padded_cols for name, m in (("gate_up", gu), ("down", dn))}
    gu_bytes = PER_CALL * L.nbytes * cells["gate_up"] // sum(cells.values())  # scales in proportion: about
    dn_bytes = PER_CALL * L.nbytes - gu_bytes

    def both():
        gate_up()
        return down()

    gu_R, gu_C, gu_G = (int(v) for v in kernels._dims["gate_up"])
    dn_R, dn_C, dn_G = (int(v) for v in kernels._dims["down"])
    ones, tok = np.ones(PER_CALL, np.int64), np.zeros((PER_CALL, 1), np.int64)
    x_KTC, h_KTC = np.zeros((PER_CALL, 1, gu_C), np.float32), np.zeros((PER_CALL, 1, dn_C), np.float32)
    gu_KTR = rng.standard_normal((PER_CALL, 1, gu_R)).astype(np.float32)
    y_KTD, out_ND = np.zeros((PER_CALL, 1, D), np.float32), np.zeros((1, D), np.float32)

    def gather():
        for k in range(PER_CALL):
            x_KTC[k, 0, :D] = x_1D[0]
        return x_KTC

    def fresh_arrays():
        return [np.zeros(s, np.float32) for s in (x_KTC.shape, gu_KTR.shape, h_KTC.shape, y_KTD.shape, (1, D))]

    hq = np.empty((PER_CALL, 1, dn_C), np.int8)
    hs, hsum = np.empty((PER_CALL, 1, dn_G), np.float32), np.empty((PER_CALL, 1, dn_G), np.float32)
    serial = [("  part: token copied per expert", gather),
              ("  part: quantize for gate_up, per expert", lambda: host_experts._quantized(x_KTC, ones, gu_G)),
              ("  part: quantize for gate_up, per token (the call's)",
               lambda: host_experts._routed_rows_quantized(x_1D, tok, ones, gu_C, gu_G)),
              ("  part: SwiGLU", lambda: hk.swiglu(gu_KTR, ones, F, h_KTC)),
              ("  part: quantize for down", lambda: host_experts._quantized(h_KTC, ones, dn_G)),
              ("  part: SwiGLU, quantize for down: parallel (the call's)",
               lambda: hk.swiglu_quantized(gu_KTR, ones, F, hq, hs, hsum)),
              ("  part: weighted sum", lambda: hk.scatter_add(y_KTD, weights.T.copy(), tok, ones, out_ND)),
              ("  part: its fresh arrays, zeroed", fresh_arrays)]
    rows = [("plain read", read, PER_CALL * L.nbytes), ("HostExperts.compute", call, PER_CALL * L.nbytes),
            ("the same, no tokens (fixed cost)", lambda: call(False), 0),
            ("gate_up kernel alone", gate_up, gu_bytes), ("down kernel alone", down, dn_bytes),
            ("gate_up then down kernels", both, PER_CALL * L.nbytes)] + [(n, f, 0) for n, f in serial]
    print(f"{args.threads} threads, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, "
          f"int4 {F}x{D}, {PER_CALL} experts per call of {N_EXPERTS}, 1 token, best of 7")
    for name, f, nbytes in rows:
        f()  # compiled
        s = best_of(f, reps=3 if nbytes else 20, rounds=7)
        print(f"  {name:56s} {s * 1e3:7.3f} ms" + (f"  {nbytes / s / 1e9:6.1f} GB/s" if nbytes else ""), flush=True)


if __name__ == "__main__":
    main()
