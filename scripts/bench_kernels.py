"""Benchmark the Pallas MLA kernels against the measured hardware ceilings and the XLA references.

  python scripts/bench_kernels.py            # on the GPU machine (one H200)
  python scripts/bench_kernels.py --smoke    # tiny shapes, interpret mode: checks the script on a CPU

Decode: B in {1, 16, 64}, T in {1K, 4K, 32K}, H=128, Dl=512, Dr=64, every row full: GB/s of cache
(+ q, out) read, vs a large device copy measured in the same run, and vs the XLA reference.
Prefill: B=1, T=S in {4K, 16K}, H=128, qk=192, v=128, causal: TFLOP/s (causal half only) vs a
bf16 8192^3 matmul measured in the same run, and vs the reference (and cuDNN when it runs).
First checks the kernels against the references on this device, then tunes block sizes on the
target shapes. Prints a markdown table last; writes it (and raw JSON) to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Import only ktjax.kernels (no install needed, and the rest of the runtime stays out of the way).
ROOT = Path(__file__).resolve().parents[1]
if "ktjax" not in sys.modules:
    _pkg = types.ModuleType("ktjax")
    _pkg.__path__ = [str(ROOT / "ktjax")]
    sys.modules["ktjax"] = _pkg
from benchparts import best_of  # noqa: E402
from ktjax import kernels  # noqa: E402
from ktjax.kernels import mla_decode_pallas, mla_decode_reference, mla_prefill_pallas, mla_prefill_reference  # noqa: E402

P = argparse.ArgumentParser()
P.add_argument("--smoke", action="store_true")
P.add_argument("--no-tune", action="store_true")
P.add_argument("--skip-prefill", action="store_true")
P.add_argument("--diag", action="store_true", help="also: L2-sharing diagnostic and the B=1 split sweep")
ARGS = P.parse_args()
INTERPRET = jax.default_backend() == "cpu"
bf16 = jnp.bfloat16


def bench(f, *args, iters=None, min_time=0.3):
    """Median-free and simple: warm up (compile), then time back-to-back calls; best of 3 rounds."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    one = max(time.perf_counter() - t, 1e-6)
    n = iters or max(1, min(200, int(min_time / one)))
    return best_of(f, *args, reps=n, rounds=3 if not ARGS.smoke else 1)


def bench_looped(f, *args, n=20):
    """Seconds per call of f(*args), n calls inside one jit: times the kernel, not Python dispatch
    (which alone is tens of us, more than a small decode). The last arg (lengths / q_start) gets a
    dependence on the previous output that is never taken, so XLA cannot hoist the call out of the loop."""
    def many(*a):
        def body(i, c):
            dep = a[-1] + (c > 1e30).astype(a[-1].dtype)
            return c + jnp.sum(f(*a[:-1], dep).astype(jnp.float32))
        return lax.fori_loop(0, n, body, jnp.float32(0))
    return bench(jax.jit(many), *args) / n


def try_bench(f, *args, looped=False, **kw):
    try:
        return (bench_looped if looped else bench)(f, *args, **kw)
    except Exception as e:  # OOM for the reference at 16K, or a config that does not compile
        print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        return None


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if not np.isnan(a).any() else float("nan")


def rand(key, shape, dtype=bf16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ---------------------------------------------------------------- ceilings, measured in this run
def ceilings():
    n = (1 << 14) if ARGS.smoke else (1 << 30)  # 2 GiB of bf16 read + 2 GiB written
    x = jnp.ones((n,), bf16)
    t = bench(jax.jit(lambda x: x * 2), x)
    hbm = 2 * x.nbytes / t
    m = 256 if ARGS.smoke else 8192
    a, b = rand(jax.random.key(0), (m, m)), rand(jax.random.key(1), (m, m))
    t = bench(jax.jit(jnp.dot), a, b)
    return hbm, 2 * m**3 / t


# ---------------------------------------------------------------- correctness on this device
def guarded(f, ref):
    try:
        return rel_err(f(), ref)
    except Exception as e:
        print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        return float("nan")


def check():
    rows = []
    k = jax.random.split(jax.random.key(42), 8)
    B, H, L, R, T = 4, 128, 512, 64, 1000
    if ARGS.smoke:
        H, L, R, T = 16, 64, 16, 100
    lengths = jnp.asarray([1, T // 3 + 5, T - 1, T], jnp.int32)
    for dt in (bf16, jnp.float32):
        ql, qr, kv, kr = rand(k[0], (B, H, L), dt), rand(k[1], (B, H, R), dt), rand(k[2], (B, T, L), dt), rand(k[3], (B, T, R), dt)
        with jax.default_matmul_precision("highest"):  # XLA's default f32 dot on GPU is TF32
            ref = mla_decode_reference(ql, qr, kv, kr, lengths, sm_scale=0.05)
        dead = (jnp.arange(T)[None] >= lengths[:, None])[..., None]
        kvp, krp = jnp.where(dead, jnp.nan, kv), jnp.where(dead, jnp.nan, kr)  # garbage past length must be ignored
        for S in (1, None):
            f = lambda: mla_decode_pallas(ql, qr, kvp, krp, lengths, sm_scale=0.05, num_splits=S, interpret=INTERPRET)
            rows.append((f"decode {jnp.dtype(dt).name} splits={S or 'auto'}", guarded(f, ref)))
    B, T, S, H, K, V = 2, 1000, 1536, 16, 192, 128
    if ARGS.smoke:
        T, S, H = 40, 64, 2
    q_start = jnp.asarray([0, S - T], jnp.int32)
    for dt in (bf16, jnp.float32):
        q, kk, v = rand(k[4], (B, T, H, K), dt), rand(k[5], (B, S, H, K), dt), rand(k[6], (B, S, H, V), dt)
        with jax.default_matmul_precision("highest"):
            ref = mla_prefill_reference(q, kk, v, q_start, sm_scale=0.07)
        f = lambda: mla_prefill_pallas(q, kk, v, q_start, sm_scale=0.07, interpret=INTERPRET)
        rows.append((f"prefill {jnp.dtype(dt).name}", guarded(f, ref)))
    for name, e in rows:
        tol = 2e-2 if "bfloat16" in name else 1e-5
        print(f"check {name:32s} rel err {e:.2e} {'ok' if e < tol else 'FAIL'}", flush=True)
    return rows


# ---------------------------------------------------------------- decode
H, DL, DR = 128, 512, 64


def decode_inputs(B, T):
    k = jax.random.split(jax.random.key(B * 100003 + T), 4)
    return (rand(k[0], (B, H, DL)), rand(k[1], (B, H, DR)), rand(k[2], (B, T, DL)), rand(k[3], (B, T, DR)),
            jnp.full((B,), T, jnp.int32))


def decode_bytes(B, T):
    return 2 * (B * T * (DL + DR) + B * H * (DL + DR) + B * H * DL)


def tune_decode(B, T):
    args = decode_inputs(B, T)
    best = (None, {})
    # (first sweep on the H200: 64/32/8/2 771 GB/s, 64/32/8/3 939, 32/64/4/2 972, 16/64/4/3 442, 4 warps with
    # block_h=64 ~200: the [64, 512] f32 accumulator spills)
    # second sweep: 64/64/8/1 810, 64/128/8/1 927, 64/32/8/4 921, 32/128/4/2 668, 32/64/4/3 716, 32/64/8/2 620;
    # 64/64/8/2 stays best (1106-1114 GB/s). Third: 16 warps 64/64/16/2 445, 64/128/16/1 259, 64/32/16/3 278.
    configs = [dict(block_h=64, block_k=64, num_warps=8, num_stages=2), dict(block_h=64, block_k=64, num_warps=16, num_stages=2),
               dict(block_h=64, block_k=128, num_warps=16, num_stages=1), dict(block_h=64, block_k=32, num_warps=16, num_stages=3)]
    for cfg in configs:
        t = try_bench(lambda *a, c=cfg: mla_decode_pallas(*a, sm_scale=0.05, **c), *args, looped=True)
        print(f"tune decode B={B} T={T} {cfg}: {t and decode_bytes(B, T) / t / 1e9:.0f} GB/s" if t else f"  {cfg}", flush=True)
        if t and (best[0] is None or t < best[0]):
            best = (t, cfg)
    return best[1]


def run_decode(cfg, hbm):
    rows = []
    shapes = [(B, T) for B in (1, 16, 64) for T in (1024, 4096, 32768)]
    if ARGS.smoke:
        shapes = [(1, 64), (2, 128)]
    for B, T in shapes:
        args = decode_inputs(B, T)
        t_k = try_bench(lambda *a: mla_decode_pallas(*a, sm_scale=0.05, interpret=INTERPRET, **cfg), *args, looped=True)
        t_r = try_bench(lambda *a: mla_decode_reference(*a, sm_scale=0.05), *args, looped=True)
        nb, fl = decode_bytes(B, T), 2 * B * H * T * (DL + DR + DL)
        rows.append(dict(B=B, T=T, us=t_k and t_k * 1e6, GBs=t_k and nb / t_k / 1e9, pct_hbm=t_k and 100 * nb / t_k / hbm,
                         TFs=t_k and fl / t_k / 1e12, ref_us=t_r and t_r * 1e6, ref_GBs=t_r and nb / t_r / 1e9,
                         speedup=(t_k and t_r) and t_r / t_k))
        print("decode", rows[-1], flush=True)
    if ARGS.diag:  # diagnostic: same CTA count and per-CTA work, but no cache row shared by two head blocks
        k = jax.random.split(jax.random.key(7), 4)
        a64 = (rand(k[0], (128, 64, DL)), rand(k[1], (128, 64, DR)), rand(k[2], (128, 4096, DL)),
               rand(k[3], (128, 4096, DR)), jnp.full((128,), 4096, jnp.int32))
        t = try_bench(lambda *a: mla_decode_pallas(*a, sm_scale=0.05, **cfg), *a64, looped=True)
        print(f"diag decode H=64 B=128 T=4K (128 CTAs, cache rows read once): {t and t * 1e6:.0f} us, "
              f"{t and 2 * 128 * 4096 * (DL + DR) / t / 1e9:.0f} GB/s", flush=True)
    if ARGS.diag:  # B=1: how the split count trades SM fill against partial-output traffic
        args = decode_inputs(1, 32768)
        for S in (8, 16, 32, 64, 128):
            t = try_bench(lambda *a, S=S: mla_decode_pallas(*a, sm_scale=0.05, num_splits=S, **cfg), *args, looped=True)
            print(f"decode B=1 T=32K splits={S}: {t and decode_bytes(1, 32768) / t / 1e9:.0f} GB/s", flush=True)
    return rows


# ---------------------------------------------------------------- prefill
PH, PK, PV = 128, 192, 128


def prefill_inputs(T):
    k = jax.random.split(jax.random.key(T), 3)
    return rand(k[0], (1, T, PH, PK)), rand(k[1], (1, T, PH, PK)), rand(k[2], (1, T, PH, PV)), jnp.zeros((1,), jnp.int32)


def prefill_flops(T):
    return 2 * PH * (PK + PV) * T * (T + 1) // 2  # causal: only the visible half


def tune_prefill(T):
    args = prefill_inputs(T)
    best = (None, {})
    # Sweeps on the H200 at 4K, TFLOP/s: 128/64/8/2 283, 128/64/8/3 339, 128/128/8/2 325, 64/64/4/3 225,
    # 128/32/4/3 322, 64/128/4/2 308, 128/64/8/4 333, 128/32/8/4 297, 256/64/8/2 380, 128/128/8/3 smem overflow.
    configs = [dict(block_q=256, block_k=64, num_warps=8, num_stages=2), dict(block_q=128, block_k=64, num_warps=8, num_stages=3)]
    for cfg in configs:
        t = try_bench(jax.jit(lambda *a, c=cfg: mla_prefill_pallas(*a, sm_scale=0.07, **c)), *args)
        print(f"tune prefill T={T} {cfg}: {t and prefill_flops(T) / t / 1e12:.0f} TFLOP/s" if t else f"  {cfg}", flush=True)
        if t and (best[0] is None or t < best[0]):
            best = (t, cfg)
    return best[1]


def run_prefill(cfg, peak):
    rows = []
    for T in ((64, 128) if ARGS.smoke else (4096, 16384)):
        args = prefill_inputs(T)
        fl = prefill_flops(T)
        t_k = try_bench(jax.jit(lambda *a: mla_prefill_pallas(*a, sm_scale=0.07, interpret=INTERPRET, **cfg)), *args)
        t_r = None  # the reference materialises [H, T, T] f32 scores: 137 GB at 16K, more than the GPU has
        if PH * T * T * 4 < 40e9:
            t_r = try_bench(jax.jit(lambda *a: mla_prefill_reference(*a, sm_scale=0.07)), *args)
        t_c = None
        if not INTERPRET:  # cuDNN flash attention (qk 192 != v 128 may be unsupported: then n/a)
            t_c = try_bench(jax.jit(lambda q, k, v, _: jax.nn.dot_product_attention(
                q, k, jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, PK - PV))), scale=0.07, is_causal=True,
                implementation="cudnn")[..., :PV]), *args)
        rows.append(dict(T=T, ms=t_k and t_k * 1e3, TFs=t_k and fl / t_k / 1e12, pct_peak=t_k and 100 * fl / t_k / peak,
                         ref_ms=t_r and t_r * 1e3, ref_TFs=t_r and fl / t_r / 1e12, cudnn_TFs=t_c and fl / t_c / 1e12,
                         speedup=(t_k and t_r) and t_r / t_k))
        print("prefill", rows[-1], flush=True)
    return rows


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main():
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()}), interpret={INTERPRET}", flush=True)
    checks = check()
    hbm, peak = ceilings()
    print(f"HBM copy (read+write) {hbm / 1e9:.0f} GB/s; bf16 matmul 8192^3 {peak / 1e12:.0f} TFLOP/s", flush=True)
    tune = not (ARGS.no_tune or ARGS.smoke)
    dcfg = tune_decode(64, 4096) if tune else {}
    pcfg = tune_prefill(4096) if tune and not ARGS.skip_prefill else {}
    drows = run_decode(dcfg, hbm)
    prows = [] if ARGS.skip_prefill else run_prefill(pcfg, peak)

    fl_per_byte = 2 * H * (DL + DR + DL) / (2 * (DL + DR))
    md = [f"jax {jax.__version__}, {dev.device_kind}. Measured in this run: HBM copy {hbm / 1e9:.0f} GB/s (read+write), "
          f"bf16 matmul 8192^3 {peak / 1e12:.0f} TFLOP/s. Decode with H={H} does {fl_per_byte:.0f} flop per cache byte, "
          f"so at the matmul peak it cannot exceed {peak / fl_per_byte / 1e9:.0f} GB/s.", "",
          f"decode config {dcfg or 'default'}; prefill config {pcfg or 'default'}", "",
          "| check on device | rel err |", "| --- | --- |", *[f"| {n} | {e:.1e} |" for n, e in checks], "",
          "| decode B | T | kernel us | GB/s | % HBM | TFLOP/s | XLA ref us | ref GB/s | speedup |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in drows:
        md.append(f"| {r['B']} | {r['T']} | {fmt(r['us'], '.0f')} | {fmt(r['GBs'], '.0f')} | {fmt(r['pct_hbm'], '.0f')}% | "
                  f"{fmt(r['TFs'], '.0f')} | {fmt(r['ref_us'], '.0f')} | {fmt(r['ref_GBs'], '.0f')} | {fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} |")
    md += ["", "| prefill T (B=1, H=128, causal) | kernel ms | TFLOP/s | % matmul peak | XLA ref ms | ref TFLOP/s | cuDNN (v padded to 192) TFLOP/s | speedup |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in prows:
        md.append(f"| {r['T']} | {fmt(r['ms'], '.2f')} | {fmt(r['TFs'], '.0f')} | {fmt(r['pct_peak'], '.0f')}% | "
                  f"{fmt(r['ref_ms'], '.2f')} | {fmt(r['ref_TFs'], '.0f')} | {fmt(r['cudnn_TFs'], '.0f')} | {fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} |")
    text = "\n".join(md)
    print("\n" + text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.md").write_text(text + "\n")
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(
            dict(hbm=hbm, peak=peak, decode_cfg=dcfg, prefill_cfg=pcfg, checks=checks, decode=drows, prefill=prows), indent=1))


if __name__ == "__main__":
    main()
