"""int8/int4 routed experts at decode sizes on the GPU: the XLA path (each matrix dequantized to bf16 in HBM,
then matmuls: `impl="reference"`) against the fused Pallas kernels (`ktjax.kernels.expert_ffn`, weights
dequantized in registers: `impl="pallas"`), both through `ktjax.experts.device.add_experts` as the executor
calls it, for a full-size DeepSeek-V3 expert (D=7168, F=2048).

    python3 scripts/bench_expert_kernel.py --out expert_kernel.json      # on the GPU machine (< 3 min)
    python3 scripts/bench_expert_kernel.py --smoke                       # small shapes, Pallas interpreter (CPU)

For each format and tokens C in --tokens: one expert per call (K=1) and a layer's 8 experts in one program
(K=8). Two times each:
- "gpu us": R chunks chained inside one jitted program (acc threaded through, so they run in order), divided
  by R: the device time of one chunk, launch overhead inside a program included. R x K of the 16 distinct
  experts, at least 200 MB (4x the 50 MB L2, so L2 never holds the next expert): XLA, R unrolled chunks of
  separate buffers; kernel, a `fori_loop` over the same experts stacked [16, nbytes], read by id in the
  kernel (one Triton compile per shape instead of R);
- "call us": one jitted `add_experts` call per chunk of separate buffers (the executor's form), back to back,
  cycling through the 16 experts: what a Python-side executor pays per streamed chunk (dispatch included).
GB/s = expert bytes (as stored) / gpu time; "of floor" = (bytes / HBM read ceiling) / gpu time, with the
ceiling the best of a device copy (read+write bytes) and a device reduction (read bytes) measured in this run.

Rows run C=1 first, then the largest C; a row starts only within --budget seconds (default 120, so the whole
run stays under 3 minutes; rows left out are listed). Before any timing every (format, C, K) is checked on
random experts: kernel against the XLA path (bf16, rel. max error), and once per format the kernel in float32
against float64 numpy from `quant`'s dequantization. If the Pallas lowering or a check fails, the error's
first lines are printed and the kernel's rows say so; the XLA path is still timed. Then, if the budget has
time left, a small tile sweep (`--sweep 1`) times the kernel chain with other tiles at C=1
(`--tokens 1` leaves it the time). The table is printed last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_offload import median_time  # noqa: E402 (one warm-up call, then the median)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fullsize import random_expert  # noqa: E402
from ktjax.experts import device  # noqa: E402
from ktjax.experts.weights import ExpertFormat  # noqa: E402
from ktjax.kernels.expert_ffn import Tiles, default_tiles, experts_pallas  # noqa: E402

N_EXPERTS = 16  # distinct experts per format (--smoke: 4)
CHAIN_BYTES = 200e6  # the XLA chain's unrolled chunks: at least this many bytes (4x L2)


class _Skip(Exception):
    pass


def routed_to_all(rng, E: int, C: int) -> jax.Array:
    """Expert ids [C, E]: every token routed to all E experts, so every slot of every chunk is chosen by every
    token. The kernel skips a slot no token chose, and a row must time the same work on every path."""
    return jnp.asarray(np.stack([rng.permutation(E) for _ in range(C)]), jnp.int32)


def first_lines(e: BaseException, n: int = 8) -> str:
    lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    return "\n".join(lines[:n])


def hbm_ceiling(smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 (read + write 4 GiB) / 1 GiB read
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 1.0001)
    copy_gbps = 2 * x.nbytes / median_time(lambda: copy(x), 10) / 1e9
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    read_gbps = x.nbytes / median_time(lambda: total(x), 10) / 1e9
    del x
    return {"copy_gbps": copy_gbps, "read_gbps": read_gbps, "hbm_gbps": max(copy_gbps, read_gbps)}


# dequantize then matmul (add_experts' reference path); the multiply-reduce forms of expert_ffn_matvec (split: int4)
XLA_FORMS = ("xla", "inline", "grouped", "split")


def add_form(form: str, acc, h, w, idx, ids, experts, N: int):
    """add_experts' decode-sized branch (every token through each expert, weighted) with each expert through
    one XLA form: "xla" `expert_ffn_reference`, else `expert_ffn_matvec` in that form."""
    acc = jnp.zeros(h.shape, jnp.float32) if acc is None else acc
    for c, ex in enumerate(experts):
        wt = jnp.where(idx == ids[c], w, 0).sum(-1)
        y = device.expert_ffn_reference(h, ex) if form == "xla" else device.expert_ffn_matvec(h, ex, form=form)
        acc = acc + y * wt[:, None]
    return acc


def chain_xla(K: int, R: int, N: int, form: str = "xla"):
    """One program: R chunks of K separate experts each through an XLA form, acc threaded through."""
    def f(h, w, idx, experts):
        acc = None
        for r in range(R):
            ids = jnp.arange(r * K, (r + 1) * K, dtype=jnp.int32)
            acc = add_form(form, acc, h, w, idx, ids, tuple(experts[r * K:(r + 1) * K]), N)
        return acc
    return jax.jit(f)


def chain_kernel(K: int, R: int, fmt: ExpertFormat, interpret: bool, tiles=None):
    """One program: a fori_loop over R chunks of K experts of the stack, the routing weights computed per chunk
    as add_experts does, acc threaded through."""
    def f(h, w, idx, stack):
        def body(r, acc):
            ids = r * K + jnp.arange(K, dtype=jnp.int32)
            wt = jnp.stack([jnp.where(idx == ids[c], w, 0).sum(-1) for c in range(K)], axis=-1).astype(jnp.float32)
            return experts_pallas(h, stack, wt, acc, layout=fmt.packed, ids_K=ids, tiles=tiles, interpret=interpret)
        return jax.lax.fori_loop(0, R, body, jnp.zeros(h.shape, jnp.float32))
    return jax.jit(f)


def call_fn(impl: str, N: int):
    if impl in XLA_FORMS:
        return jax.jit(lambda h, w, idx, ids, experts: add_form(impl, None, h, w, idx, ids, experts, N))
    return jax.jit(lambda h, w, idx, ids, experts: device.add_experts(None, h, w, idx, ids, experts, capacity=N,
                                                                      impl=impl))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.isnan(a).any():
        return float("nan")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def numpy_check(fmt: ExpertFormat, experts, impl: str) -> float:
    """A path in float32 against float64 numpy from quant's dequantization: 2 experts, C=2. impl: "inline" /
    "grouped" (the multiply-reduce forms) or the kernel's ("pallas" / "interpret"; IEEE dots)."""
    rng = np.random.default_rng(5)
    C = 2
    x = rng.standard_normal((C, fmt.D)).astype(np.float32)
    wt = rng.uniform(0.1, 1, (C, 2)).astype(np.float32)
    if impl in XLA_FORMS:
        out = jax.jit(lambda x, wt, exs: sum(device.expert_ffn_matvec(x, ex, form=impl) * wt[:, e:e + 1]
                                             for e, ex in enumerate(exs)))(jnp.asarray(x), jnp.asarray(wt), experts[:2])
    else:
        out = experts_pallas(jnp.asarray(x), tuple(ex.w for ex in experts[:2]), jnp.asarray(wt),
                             jnp.zeros((C, fmt.D), jnp.float32), layout=fmt.packed, interpret=impl == "interpret")
    ref = np.zeros((C, fmt.D))
    for e in range(2):
        gu, dn = fmt.packed.dequantize(np.asarray(experts[e].w))
        g, u = x.astype(np.float64) @ gu[:fmt.F].T, x.astype(np.float64) @ gu[fmt.F:].T
        ref += ((g / (1 + np.exp(-g)) * u) @ dn.T) * wt[:, e:e + 1]
    return rel_err(out, ref)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--formats", nargs="+", default=["int8", "int4"])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 8], help="experts per program (K), dividing 16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--impls", nargs="+", default=["xla", "inline", "grouped", "split", "kernel"],
                   help="paths to time: xla (dequantize, then matmul), inline / grouped (multiply-reduce over the "
                        "quantized bytes, expert_ffn_matvec), kernel (Pallas)")
    p.add_argument("--sweep", type=int, default=1, help="1: tile sweep at C=1 after the table's timings")
    p.add_argument("--tiles", nargs="+", default=[],
                   help="the sweep's tiles instead of its defaults, each BF,BK1,BR2,BK2,warps,stages[,vector_scales 0/1]")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[1], help="tokens of the sweep's calls")
    p.add_argument("--budget", type=float, default=120,
                   help="seconds: no new row or sweep point starts past this (rows run C=1 first)")
    p.add_argument("--smoke", action="store_true", help="small shapes, kernels in the Pallas interpreter")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="JSON file (or a folder for bench_expert_kernel.json)")
    args = p.parse_args()
    t_start = time.perf_counter()
    F, D = (64, 256) if args.smoke else (2048, 7168)
    tokens = [1, 4] if args.smoke else args.tokens
    reps = 2 if args.smoke else args.reps
    E = 4 if args.smoke else N_EXPERTS
    chunk_sizes = [1, 4] if args.smoke else args.chunks
    on_gpu = jax.default_backend() == "gpu"
    kernel_impl = "pallas" if on_gpu and not args.smoke else "interpret"
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"F={F} D={D}, kernel impl={kernel_impl}", flush=True)

    ceil = hbm_ceiling(args.smoke)
    print("CEILINGS " + json.dumps(ceil), flush=True)
    hbm = ceil["hbm_gbps"] * 1e9
    rows, checks, sweep, skipped = [], {}, [], []
    rng = np.random.default_rng(0)
    state = {}  # fmt -> (ExpertFormat, experts, stack, kernel_ok, why)
    for fmt_name in args.formats:
        fmt = ExpertFormat(fmt_name, F, D)
        experts = tuple(jax.block_until_ready([random_expert(jax.random.key(100 + e), fmt) for e in range(E)]))
        stack = jax.block_until_ready(jnp.stack([ex.w for ex in experts]))
        for form in ("inline", "grouped", "split"):
            if form in args.impls and (form != "split" or fmt_name == "int4"):
                err = numpy_check(fmt, experts, form)
                checks[f"{fmt_name} {form} f32 vs numpy"] = err
                print(f"{fmt_name}: {form} (float32) vs numpy float64: rel. max error {err:.2e}", flush=True)
        kernel_ok, why = "kernel" in args.impls, "not asked for"
        try:
            if not kernel_ok:
                raise _Skip()
            err = numpy_check(fmt, experts, kernel_impl)
            checks[f"{fmt_name} f32 vs numpy"] = err
            print(f"{fmt_name}: kernel (float32) vs numpy float64: rel. max error {err:.2e}", flush=True)
            if not err < 1e-4:
                kernel_ok, why = False, f"f32 check failed: {err:.2e}"
        except _Skip:
            pass
        except Exception as e:  # a lowering failure on the GPU: report and keep the XLA rows
            kernel_ok, why = False, "lowering/run failed: " + first_lines(e, 3).replace("\n", " | ")
            print(f"{fmt_name}: the Pallas kernel FAILED:\n{first_lines(e)}", flush=True)
        state[fmt_name] = [fmt, experts, stack, kernel_ok, why]

    # Rows in order of importance (decode: C=1 first, then the largest C), formats interleaved, so that a run cut
    # short by --budget still has the rows that matter.
    order = sorted(tokens, key=lambda C: (C != 1, -C))
    plan = [(C, K, f) for C in order for K in chunk_sizes for f in args.formats]
    for C, K, fmt_name in plan:
        if time.perf_counter() - t_start > args.budget:
            skipped.append(f"{fmt_name} K={K} C={C}")
            continue
        fmt, experts, stack, kernel_ok, why = state[fmt_name]
        R = E // K if args.smoke else min(E // K, max(1, -(-int(CHAIN_BYTES) // (K * fmt.nbytes))))
        h = jnp.asarray(rng.standard_normal((C, D)), jnp.bfloat16)
        idx = routed_to_all(rng, E, C)
        w = jnp.asarray(rng.uniform(0.05, 0.3, idx.shape), jnp.float32)
        nbytes = K * fmt.nbytes
        row = {"fmt": fmt_name, "K": K, "C": C, "bytes": nbytes, "chain": R}
        forms = [f for f in ("inline", "grouped", "split") if f in args.impls and (f != "split" or fmt_name == "int4")]
        impls = ["xla"] + forms + ([kernel_impl] if kernel_ok else [])
        outs = {}
        for impl in impls:
            tag = impl if impl in XLA_FORMS else "kernel"
            try:
                if tag in XLA_FORMS:
                    chain, arg = chain_xla(K, R, C, tag), experts
                else:
                    chain, arg = chain_kernel(K, R, fmt, impl == "interpret"), stack
                outs[tag] = jax.block_until_ready(chain(h, w, idx, arg))
                if tag != "xla":  # against the XLA path over the same R chunks
                    err = rel_err(outs[tag], outs["xla"])
                    row[f"{tag}_rel_err"] = err
                    if not err < 3e-2:
                        raise AssertionError(f"{tag} vs XLA path: rel. max error {err:.2e}")
                t = median_time(lambda: chain(h, w, idx, arg), reps) / R
                call = call_fn(tag if tag in XLA_FORMS else impl, C)
                chunks = [(jnp.arange(r * K, (r + 1) * K, dtype=jnp.int32), experts[r * K:(r + 1) * K])
                          for r in range(E // K)]
                jax.block_until_ready([call(h, w, idx, ids, ex) for ids, ex in chunks])

                def calls():
                    return [call(h, w, idx, ids, ex) for ids, ex in chunks]
                tc = median_time(calls, max(2, reps // 4)) / len(chunks)
                row[f"{tag}_gpu_us"] = t * 1e6
                row[f"{tag}_call_us"] = tc * 1e6
                row[f"{tag}_gbps"] = nbytes / t / 1e9
                row[f"{tag}_of_floor"] = nbytes / hbm / t
            except Exception as e:
                row[f"{tag}_error"] = first_lines(e, 3).replace("\n", " | ")
                print(f"{fmt_name} K={K} C={C} {tag}: FAILED\n{first_lines(e)}", flush=True)
                if tag == "kernel":
                    state[fmt_name][3:] = [False, row["kernel_error"]]
        if not state[fmt_name][3] and "kernel_error" not in row and "kernel" in args.impls:
            row["kernel_error"] = state[fmt_name][4]
        for tag in ("kernel", "inline", "grouped", "split"):
            if f"{tag}_gpu_us" in row and "xla_gpu_us" in row:
                row[f"{tag}_speedup"] = row["xla_gpu_us"] / row[f"{tag}_gpu_us"]
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
    if skipped:
        print(f"budget ({args.budget:.0f} s) reached: skipped rows " + ", ".join(skipped), flush=True)

    # Tile sweep: the kernel chain alone, C=1, a few tiles around the default, while the budget lasts.
    for fmt_name in args.formats if args.sweep else []:
        fmt, experts, stack, kernel_ok, why = state[fmt_name]
        if not kernel_ok:
            continue
        for K, C in [(K, C) for C in args.sweep_tokens for K in chunk_sizes]:
            R = E // K if args.smoke else min(E // K, max(1, -(-int(CHAIN_BYTES) // (K * fmt.nbytes))))
            base = default_tiles(fmt_name, K, C, F, D)
            v = base.__dict__
            cands = [base, Tiles(**{**v, "num_stages": 4}), Tiles(**{**v, "num_stages": 2}),
                     Tiles(**{**v, "num_warps": 8}),
                     Tiles(**{**v, "BK1": base.BK1 * 2, "BK2": base.BK2 * 2}),  # 16K weights per step
                     Tiles(**{**v, "BF": 32, "BR2": 64}), Tiles(**{**v, "BR2": 16}),
                     Tiles(**{**v, "BK1": base.BK1 // 2, "BK2": base.BK2 // 2}), Tiles(**{**v, "num_warps": 2})]
            if args.tiles:
                cands = [base] + [Tiles(*map(int, t.split(","))) for t in args.tiles]
            if args.smoke:
                cands = cands[:2]
            h = jnp.asarray(rng.standard_normal((C, D)), jnp.bfloat16)
            idx = routed_to_all(rng, E, C)
            w = jnp.full(idx.shape, 0.2, jnp.float32)
            ref = None
            for tiles in dict.fromkeys(cands):
                if time.perf_counter() - t_start > args.budget:
                    print(f"sweep {fmt_name} K={K} C={C}: budget reached", flush=True)
                    break
                try:
                    tiles.check(fmt_name)
                    f = chain_kernel(K, R, fmt, kernel_impl == "interpret", tiles)
                    out = jax.block_until_ready(f(h, w, idx, stack))
                    ref = out if ref is None else ref
                    err = rel_err(out, ref)
                    if not err < 3e-2:
                        raise AssertionError(f"tiles {tiles}: rel. max error {err:.2e} against the default tiles")
                    t = median_time(lambda: f(h, w, idx, stack), reps) / R
                    s_ = {"fmt": fmt_name, "K": K, "C": C, "tiles": tiles.__dict__, "gpu_us": t * 1e6,
                          "gbps": K * fmt.nbytes / t / 1e9, "of_floor": K * fmt.nbytes / hbm / t,
                          "rel_err_vs_default": err}
                except Exception as e:
                    s_ = {"fmt": fmt_name, "K": K, "C": C, "tiles": tiles.__dict__, "error": first_lines(e, 3)}
                sweep.append(s_)
                print("SWEEP " + json.dumps(s_), flush=True)
    del state

    res = {"ceilings": ceil, "F": F, "D": D, "checks": checks, "rows": rows, "sweep": sweep, "skipped": skipped,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__, "seconds": time.perf_counter() - t_start}
    out = args.out if args.out.endswith(".json") else os.path.join(args.out, "bench_expert_kernel.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)

    def num(v, f):
        return f.format(v) if isinstance(v, (int, float)) else "-"

    print(f"\nHBM ceiling {ceil['hbm_gbps']:.0f} GB/s (copy {ceil['copy_gbps']:.0f}, read {ceil['read_gbps']:.0f}); "
          f"checks: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    if sweep:
        print("\n| fmt | K | C | tiles (BF, BK1, BR2, BK2, warps, stages, vector scales) | gpu us | GB/s | of floor |\n| --- | ---: | ---: | --- | ---: | ---: | ---: |")
        for s in sweep:
            t = s["tiles"]
            print(f"| {s['fmt']} | {s['K']} | {s['C']} | {t['BF']}, {t['BK1']}, {t['BR2']}, {t['BK2']}, {t['num_warps']}, "
                  f"{t['num_stages']}, {int(t.get('vector_scales', False))} | {num(s.get('gpu_us'), '{:.1f}')} | {num(s.get('gbps'), '{:.0f}')} | "
                  f"{num(s.get('of_floor'), '{:.0%}')} |" + (f" {s['error'][:80]}" if "error" in s else ""))
    tags = ["xla"] + [t for t in ("inline", "grouped", "split", "kernel") if any(f"{t}_gpu_us" in r for r in rows)]
    print("\nGPU time of one chunk (K experts, C tokens) inside a chained program; GB/s of the experts' stored bytes; "
          "x: speed-up over xla (dequantize, then matmul)")
    print("| fmt | K | C | MB | " + " | ".join(f"{t} us | {t} GB/s" + ("" if t == "xla" else f" | {t} x")
                                              for t in tags) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" + ("" if t == "xla" else " | ---:")
                                                     for t in tags) + " |")
    for r in rows:
        cells = []
        for t in tags:
            cells += [num(r.get(f"{t}_gpu_us"), "{:.1f}"), num(r.get(f"{t}_gbps"), "{:.0f}")]
            if t != "xla":
                cells.append(num(r.get(f"{t}_speedup"), "{:.2f}"))
        print(f"| {r['fmt']} | {r['K']} | {r['C']} | {r['bytes'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    errs = {k: v for r in rows for k, v in r.items() if k.endswith("_error")}
    if errs:
        print("errors: " + "; ".join(f"{k}: {v[:100]}" for k, v in errs.items()))
    print(f"\n{time.perf_counter() - t_start:.0f} s; JSON: {out}")


if __name__ == "__main__":
    main()
