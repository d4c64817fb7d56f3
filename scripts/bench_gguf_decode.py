"""GGML block decoding speed: ktjax's numba decoders (`ktjax.io.gguf_decode`) against
`gguf.quants.dequantize`, and the block copies into ktjax's integer expert formats
(`ktjax.io.gguf_blocks.expert_arrays`), on one full-size DeepSeek expert matrix (2048 x 7168) of
random blocks with realistic float16 scales (subnormal scales would time the CPU's slow path).

    python scripts/bench_gguf_decode.py [--rows 2048] [--cols 7168] [--repeat 3] [--out FILE.json]

The ceiling beside each rate is the rate at which the same threads fill a float32 array of the same
size (a numba parallel loop), measured in the same run: a decoder writes 4 bytes per value, so it
cannot run faster than memory takes them.
Prints one table; --out writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import warnings

import numba
import numpy as np

import gguf
from gguf import GGMLQuantizationType as GGML

from benchparts import best_of
from ktjax.io import gguf_blocks, gguf_decode

# Where each type keeps its float16 scales (byte ranges within a block), and a value's size per scale unit.
SCALES = {"Q8_0": ((0, 2),), "Q4_0": ((0, 2),), "Q4_1": ((0, 2), (2, 4)), "Q5_0": ((0, 2),),
          "Q5_1": ((0, 2), (2, 4)), "Q2_K": ((80, 82), (82, 84)), "Q3_K": ((108, 110),),
          "Q4_K": ((0, 2), (2, 4)), "Q5_K": ((0, 2), (2, 4)), "Q6_K": ((208, 210),),
          "IQ4_NL": ((0, 2),), "IQ4_XS": ((0, 2),), "IQ2_XXS": ((0, 2),), "IQ2_XS": ((0, 2),),
          "IQ3_XXS": ((0, 2),), "IQ1_S": ((0, 2),), "IQ1_M": ()}  # IQ1_M spreads d over four nibbles


def random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[GGML[type_name]]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for lo, hi in SCALES[type_name]:
        d = (rng.uniform(0.5, 1.0, (rows, cols // block)) * 1e-3).astype(np.float16)
        b[..., lo:hi] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return b.reshape(rows, -1)


@numba.njit(parallel=True)
def fill(out):
    for n in numba.prange(out.shape[0]):
        out[n, :] = 1.0


def best_seconds(fn, repeat: int) -> float:
    """The fastest of `repeat` calls (`benchparts.best_of`, one call a round)."""
    return best_of(fn, reps=1, rounds=repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168, help="a multiple of 256")
    ap.add_argument("--repeat", type=int, default=3, help="timings per figure (the best is kept)")
    ap.add_argument("--types", nargs="+", default=list(gguf_decode.DECODED))
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    rng = np.random.default_rng(0)
    n = args.rows * args.cols
    threads = numba.get_num_threads()
    filled = np.empty((args.rows, args.cols), np.float32)
    fill(filled)
    rows = [dict(type="fill f32", ours=n / best_seconds(lambda: fill(filled), args.repeat) / 1e9)]
    for name in args.types:
        raw = random_blocks(name, args.rows, args.cols, rng)
        ref = np.asarray(gguf.quants.dequantize(raw, GGML[name]), np.float32)
        out = np.empty_like(ref)
        gguf_decode.dequantize(raw, name, out)  # compiled (or loaded from numba's cache) before timing
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), name
        row = dict(type=name, stored_bytes=raw.nbytes,
                   gguf=n / best_seconds(lambda: gguf.quants.dequantize(raw, GGML[name]), args.repeat) / 1e9,
                   ours=n / best_seconds(lambda: gguf_decode.dequantize(raw, name, out), args.repeat) / 1e9)
        numba.set_num_threads(1)
        row["ours_1_thread"] = n / best_seconds(lambda: gguf_decode.dequantize(raw, name, out), args.repeat) / 1e9
        numba.set_num_threads(threads)
        if name in gguf_blocks.EXACT:
            row["exact_copy"] = n / best_seconds(lambda: gguf_blocks.expert_arrays(raw, name, args.cols),
                                                 args.repeat) / 1e9
        rows.append(row)
    meta = dict(machine=platform.node(), cpu_count=os.cpu_count(), numba_threads=threads,
                numba=numba.__version__, gguf=importlib.metadata.version("gguf"),
                rows=args.rows, cols=args.cols, repeat=args.repeat)
    print(f"G values/s, {args.rows} x {args.cols} matrix, {threads} numba threads, best of {args.repeat}")
    print(f"{'type':9s} {'gguf':>7s} {'ktjax':>7s} {'1 thr':>7s} {'x gguf':>7s} {'% fill':>7s} {'exact':>7s}")
    for r in rows:
        if r["type"] == "fill f32":
            print(f"{'fill f32':9s} {'':>7s} {r['ours']:7.2f}")
            continue
        exact = f"{r['exact_copy']:7.2f}" if "exact_copy" in r else ""
        print(f"{r['type']:9s} {r['gguf']:7.3f} {r['ours']:7.2f} {r['ours_1_thread']:7.2f} "
              f"{r['ours'] / r['gguf']:7.1f} {100 * r['ours'] / rows[0]['ours']:6.0f}% {exact}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
