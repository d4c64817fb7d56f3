"""Converting routed experts while loading: time per full-size DeepSeek expert (gate and up 2048 x 7168,
down 7168 x 2048) read from a safetensors checkpoint -- FP8 with 128 x 128 block scales as DeepSeek
publishes R1/V3, or bf16 -- into the expert format a load asks for (`ktjax.io.experts.read_expert`, the
loader's own path), including the move to where the loader keeps experts (pinned host memory on a GPU
machine, host memory without one).

    python scripts/bench_expert_load.py [--experts 8] [--dir /tmp/bench_expert_load] [--out FILE.json]

The disk is left out by default: the file is read once before timing (page cache). With --cold the
page cache is dropped before each row (root only), and each row runs twice: reading each expert as it
comes, and asking for the next expert's bytes first, as `ktjax.load` does (`Checkpoint.prefetch`). The
ceiling beside each row is the file read from the page cache (or from the disk with --cold) in one
thread. R1 has 58 x 256 = 14,848 routed experts; the last column is that many times the per-expert time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

from ktjax.experts.weights import ExpertFormat
from ktjax.io.checkpoint import Checkpoint
from ktjax.io.experts import read_expert, stored_names, stored_nbytes

F, D, BLOCK = 2048, 7168, 128
R1_EXPERTS = 58 * 256
PROJ = {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}


def write_checkpoint(path: str, experts: int, source: str, rng) -> None:
    """Random experts of layer 0: FP8 values (every finite code) with realistic block scales, or bf16."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for e in range(experts):
        for proj, (r, c) in PROJ.items():
            name = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            if source == "fp8":
                codes = rng.integers(0, 256, (r, c), dtype=np.uint8)
                codes[(codes & 0x7F) == 0x7F] = 0  # NaN codes
                tensors[name] = codes.view(ml_dtypes.float8_e4m3fn)
                tensors[name + "_scale_inv"] = rng.uniform(1e-4, 1e-3, (r // BLOCK, c // BLOCK)).astype(np.float32)
            else:
                tensors[name] = (rng.standard_normal((r, c), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))


def drop_page_cache() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8, help="experts per source checkpoint (each timed once)")
    ap.add_argument("--dir", default="/tmp/bench_expert_load")
    ap.add_argument("--sources", nargs="+", default=["fp8", "bf16"])
    ap.add_argument("--formats", nargs="+", default=["int4", "int8", "bf16", "fp8"])
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each row (needs root)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    kind = "pinned_host" if jax.default_backend() == "gpu" else None
    target = jax.sharding.SingleDeviceSharding(device, memory_kind=kind) if kind else jax.sharding.SingleDeviceSharding(device)
    rows = []
    for source in args.sources:
        path = os.path.join(args.dir, source)
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            write_checkpoint(path, args.experts, source, rng)
        ckpt = Checkpoint(path)
        file = os.path.join(path, "model.safetensors")

        def mats_of(e):
            return [(f"model.layers.0.mlp.experts.{e}.{p}.weight",
                     f"model.layers.0.mlp.experts.{e}.{p}.weight_scale_inv" if source == "fp8" else None) for p in PROJ]

        for fmt_name in args.formats:
            if source == "bf16" and fmt_name == "fp8":
                continue
            fmt = ExpertFormat(fmt_name, F, D)
            if args.cold:  # compiled once before the cold rows, so they time reading and converting alone
                read_expert(ckpt, mats_of(0), fmt, (BLOCK, BLOCK))
            for prefetch in ((False, True) if args.cold else (False,)):
                if args.cold:
                    drop_page_cache()
                t = time.perf_counter()
                with open(file, "rb") as f:  # the rate of reading it (cold: from the disk), then in the page cache
                    while f.read(64 << 20):
                        pass
                read_gbs = os.path.getsize(file) / (time.perf_counter() - t) / 1e9
                if args.cold:
                    drop_page_cache()
                times = []
                for e in range(args.experts):
                    if prefetch and e + 1 < args.experts:
                        ckpt.prefetch(stored_names(mats_of(e + 1)))
                    t = time.perf_counter()
                    jax.block_until_ready(jax.device_put(read_expert(ckpt, mats_of(e), fmt, (BLOCK, BLOCK)), target))
                    times.append(time.perf_counter() - t)
                stored = stored_nbytes(ckpt, mats_of(0))
                # Warm, the first expert compiles and is left out; cold, every expert counts (compiled before).
                ms = float(np.median(times if args.cold or len(times) == 1 else times[1:])) * 1e3
                rows.append(dict(source=source, experts=fmt_name, cold=args.cold, prefetch=prefetch, ms_per_expert=ms,
                                 first_ms=times[0] * 1e3, stored_bytes=stored, gbs=stored / ms / 1e6,
                                 read_gbs=read_gbs, r1_minutes=ms * R1_EXPERTS / 6e4))
    meta = dict(machine=platform.node(), cpu_count=os.cpu_count(), backend=jax.default_backend(),
                device=str(device), jax=jax.__version__, experts=args.experts)
    print(f"per full-size expert, median; backend {jax.default_backend()}; "
          + ("page cache dropped before each row" if args.cold else "file in the page cache"))
    print(f"{'source':7s} {'experts':7s} {'prefetch':8s} {'ms':>8s} {'first ms':>9s} {'GB/s':>6s} {'read GB/s':>10s} "
          f"{'R1 min':>7s}")
    for r in rows:
        print(f"{r['source']:7s} {r['experts']:7s} {str(r['prefetch']):8s} {r['ms_per_expert']:8.1f} "
              f"{r['first_ms']:9.0f} {r['gbs']:6.2f} {r['read_gbs']:10.2f} {r['r1_minutes']:7.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
