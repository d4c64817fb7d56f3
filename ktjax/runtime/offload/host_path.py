"""The host-CPU path of the offloaded executor: chosen int8/int4 experts computed where they live,
reading the same pinned host buffers the link streams from (zero-copy numpy views), so only
activations cross the link."""

from __future__ import annotations

import copy

import numba
import numpy as np

from ktjax.experts.host import HostExperts, assignments
from ktjax.experts.weights import ExpertFormat, ExpertWeights


class HostPath:
    """threads: the host kernels' parallel threads. By default all cores but two: the link's copies
    and the GPU dispatch need CPU time too, and a parallel loop waits for its slowest thread.
    Measured on the H200 machine's 16 cores, both paths at once (benchmarks/offload.md, run 8):
    16 threads 41.5 + 34.0 GB/s (CPU + link, int8) against 46.0 + 42.8 with 14."""

    def __init__(self, fmt: ExpertFormat, hosted: dict[tuple[int, int], ExpertWeights], threads: int | None = None,
                 activations: str = "float32"):
        self.kernels = HostExperts(fmt.packed, activations)
        self.threads = threads
        # Views keep their buffers alive; their addresses are what the kernels read.
        self.views = {key: np.asarray(ex.w) for key, ex in hosted.items()}
        self.bases = {key: v.ctypes.data for key, v in self.views.items()}

    def with_activations(self, activations: str) -> HostPath:
        """The same experts and threads, multiplying int8/int4 weights by activations in another form."""
        out = copy.copy(self)
        out.kernels = HostExperts(self.kernels.layout, activations)
        return out

    def compute(self, layer: int, ids: list[int], idx_NK: np.ndarray, weights_NK: np.ndarray,
                h_ND: np.ndarray) -> np.ndarray:
        """float32 [N, D]: the chosen experts' routed contributions to each token."""
        experts = np.asarray(ids, np.int64)
        tok, weight, ntok = assignments(idx_NK, weights_NK, experts)
        bases = np.array([self.bases[(layer, e)] for e in ids], np.int64)
        threads = min(self.threads or default_threads(), numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != threads:  # per calling thread; setting it costs ~10 us a call
            numba.set_num_threads(threads)
        return self.kernels.compute(bases, tok, ntok, weight, np.asarray(h_ND, np.float32))


def default_threads() -> int:
    cores = numba.config.NUMBA_NUM_THREADS
    return cores - 2 if cores > 4 else cores
