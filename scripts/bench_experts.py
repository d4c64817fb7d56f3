"""One chunk of routed experts (the unit that streaming and training compute at a time), timed
against its HBM floor: `ktjax.experts.device.experts_segment` and its backward, beside the variants it is
chosen from: the token dispatch (one stable sort per chunk, or a `nonzero` per expert as before,
kept below as `unrolled_nonzero`) x the expert FFN (gate and up in one matmul, or two as before).

    python3 scripts/bench_experts.py                 # on the GPU machine
    python3 scripts/bench_experts.py --tiny          # check the script on a CPU

DeepSeek-V3 sizes: 32 experts of 7168 x 2048 (bf16 and FP8 with 128-blocks), tokens routed top-8 of
256 at random, capacity = the chunk's largest count rounded up to a power of two (as streaming
chooses it). Floor: the chunk's weight bytes (bf16 or FP8 + scales) / measured HBM bandwidth, once
for the forward and twice for the backward (the rematerialised forward, then the input gradient),
or the matmul FLOPs / measured matmul rate when larger. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchparts import best_of, summarize_trace  # noqa: E402
from fullsize import random_expert  # noqa: E402
from ktjax.experts import device  # noqa: E402
from ktjax.experts.weights import ExpertFormat  # noqa: E402
from ktjax.models.layers import matmul, swiglu  # noqa: E402
from ktjax.runtime.offload.streaming import pow2  # noqa: E402


def unrolled_nonzero(acc_ND, h_ND, weights_NK, idx_NK, ids_C, experts, *, capacity: int):
    """The dispatch before: one `nonzero` and one weight reduction over all tokens per expert."""
    N, D = h_ND.shape
    if acc_ND is None:
        acc_ND = jnp.zeros((N, D), jnp.float32)
    h_pad = jnp.concatenate([h_ND, jnp.zeros((1, D), h_ND.dtype)])
    for c, ex in enumerate(experts):
        match_NK = idx_NK == ids_C[c]
        tok_C = jnp.nonzero(match_NK.any(-1), size=capacity, fill_value=N)[0]
        wt_C = jnp.concatenate([(weights_NK * match_NK).sum(-1), jnp.zeros((1,), jnp.float32)])[tok_C]
        acc_ND = acc_ND.at[tok_C].add(device.expert_ffn(h_pad[tok_C], ex) * wt_C[:, None], mode="drop")
    return acc_ND


def ffn_fused(x_CD, ex, *, impl=None):
    """Gate and up as one [2F, D] matmul."""
    dt, f32 = x_CD.dtype, jnp.float32
    g_CF, u_CF = jnp.split(matmul("cd,fd->cf", x_CD, ex.gate_up(dt)).astype(f32), 2, axis=-1)
    return matmul("cf,df->cd", swiglu(g_CF, u_CF).astype(dt), ex.down(dt)).astype(f32)


def ffn_separate(x_CD, ex, *, impl=None):
    """Gate and up as two [F, D] matmuls, each matrix dequantised alone."""
    dt, f32 = x_CD.dtype, jnp.float32
    gate, up = ex.gate_and_up(dt)
    g_CF, u_CF = matmul("cd,fd->cf", x_CD, gate).astype(f32), matmul("cd,fd->cf", x_CD, up).astype(f32)
    return matmul("cf,df->cd", swiglu(g_CF, u_CF).astype(dt), ex.down(dt)).astype(f32)


DISPATCH = {"sorted": device.add_experts, "nonzero": unrolled_nonzero}
FFN = {"gate+up fused": ffn_fused, "separate": ffn_separate}


@contextlib.contextmanager
def ffn_variant(name: str):
    """Trace with `device.expert_ffn` swapped for the variant (jit reads it while tracing)."""
    keep = device.expert_ffn
    device.expert_ffn = FFN[name]
    try:
        yield
    finally:
        device.expert_ffn = keep


def timed(f, *args, reps: int) -> float:
    jax.block_until_ready(f(*args))  # compile
    return best_of(f, *args, reps=reps)


def make_experts(C, F, D, fp8: bool, key):
    fmt = ExpertFormat("fp8" if fp8 else "bf16", F, D)
    return tuple(jax.block_until_ready([random_expert(jax.random.fold_in(key, c), fmt) for c in range(C)]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out, as DISPATCH:FFN")
    p.add_argument("--trace", action="store_true", help="profile the first backward; print its top GPU kernels")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    C, F, D, E, K = (4, 64, 128, 16, 4) if args.tiny else (32, 2048, 7168, 256, 8)
    tokens = [64, 128] if args.tiny else args.tokens
    skip = {tuple(v.split(":")) for v in args.skip}
    from bench_offload import ceilings
    ceil = ceilings(args.tiny)
    hbm, tflops = ceil["hbm_gbps"] * 1e9, ceil["matmul_tflops"] * 1e12
    print("CEILINGS " + json.dumps(ceil), flush=True)
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, traced = [], False
    for fp8 in (False, True):
        experts = make_experts(C, F, D, fp8, jax.random.key(1))
        nbytes = sum(ex.nbytes for ex in experts)
        ids = jnp.arange(C, dtype=jnp.int32)
        for N in tokens:
            idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
            capacity = pow2(int(np.bincount(idx.ravel(), minlength=E)[:C].max()))
            h = jax.random.normal(jax.random.key(2), (N, D), jnp.bfloat16)
            w = jnp.asarray(rng.uniform(size=(N, K)), jnp.float32)
            idx_j = jnp.asarray(idx)
            dacc = jax.random.normal(jax.random.key(3), (N, D), jnp.float32)
            flops = 2 * int((idx < C).sum()) * 3 * F * D
            floor_f = max(nbytes / hbm, flops / tflops)
            floor_b = max(2 * nbytes / hbm, 2 * flops / tflops)
            for (dispatch, impl), ffn in itertools.product(DISPATCH.items(), FFN):
                if (dispatch, ffn) in skip:
                    continue
                fwd = jax.jit(lambda h, w, i, ex, impl=impl, cap=capacity: impl(None, h, w, i, ids, ex, capacity=cap))

                @jax.jit
                def bwd(h, w, i, ex, dacc, impl=impl, cap=capacity):
                    _, vjp = jax.vjp(lambda h, w: impl(None, h, w, i, ids, ex, capacity=cap), h, w)
                    return vjp(dacc)

                reps = 3 if args.tiny else 20
                with ffn_variant(ffn):
                    t_f = timed(fwd, h, w, idx_j, experts, reps=reps)
                    t_b = timed(bwd, h, w, idx_j, experts, dacc, reps=reps)
                    if args.trace and not traced:
                        traced = True
                        trace_dir = os.path.join(args.out, "trace_bwd")
                        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                            jax.block_until_ready(bwd(h, w, idx_j, experts, dacc))
                        print(f"trace of one backward ({'fp8' if fp8 else 'bf16'}, N={N}, {dispatch}, {ffn}):")
                        summarize_trace(trace_dir, args.out)
                row = dict(experts="fp8" if fp8 else "bf16", tokens=N, capacity=capacity, dispatch=dispatch, ffn=ffn,
                           fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, floor_fwd_ms=floor_f * 1e3, floor_bwd_ms=floor_b * 1e3)
                rows.append(row)
                print("ROW " + json.dumps(row), flush=True)
    lines = [f"Ceilings: HBM {ceil['hbm_gbps']:.0f} GB/s, bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s. "
             f"One chunk: {C} experts of {F} x {D}.", "",
             "| experts | tokens | capacity | dispatch | FFN | forward | floor/fwd | backward | floor/bwd |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['tokens']} | {r['capacity']} | {r['dispatch']} | {r['ffn']} | "
                     f"{r['fwd_ms']:.2f} ms | {100 * r['floor_fwd_ms'] / r['fwd_ms']:.0f}% | {r['bwd_ms']:.2f} ms | "
                     f"{100 * r['floor_bwd_ms'] / r['bwd_ms']:.0f}% |")
    md = "\n".join(lines)
    with open(os.path.join(args.out, "bench_experts.json"), "w") as f:
        json.dump({"ceilings": ceil, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_experts.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
