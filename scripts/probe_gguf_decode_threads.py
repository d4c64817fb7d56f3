"""GGML decoders' speed by thread count, for the types that did not scale on the H200 machine's 16 cores
(Q6_K, IQ4_XS; benchmarks/gguf.md, run 2) beside one that did (Q4_K), and numba's threading layer.

    python scripts/probe_gguf_decode_threads.py
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gguf_decode import best_seconds, random_blocks  # noqa: E402

from ktjax.io import gguf_decode  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    most = numba.config.NUMBA_NUM_THREADS
    counts = sorted({1, min(4, most), most})
    for type_name in ("Q6_K", "Q4_K", "IQ4_XS"):
        raw = random_blocks(type_name, 2048, 7168, rng)
        out = np.empty((2048, 7168), np.float32)
        gguf_decode.dequantize(raw, type_name, out)  # compiled before timing
        rates = []
        for n in counts:
            numba.set_num_threads(n)
            rates.append(2048 * 7168 / best_seconds(lambda: gguf_decode.dequantize(raw, type_name, out), 5) / 1e9)
        numba.set_num_threads(most)
        print(f"{type_name:7s} " + "  ".join(f"{n} threads {r:.2f}" for n, r in zip(counts, rates)) + "  G values/s")
    print("numba threading layer:", numba.threading_layer())


if __name__ == "__main__":
    main()
