"""The host-CPU path of the offloaded executor: chosen int8/int4 experts computed where they live,
reading the same pinned host buffers the link streams from (zero-copy numpy views), so only
activations cross the link."""

from __future__ import annotations

import copy
import ctypes
import math

import jax
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
                 activations: str = "float32", landing: jax.sharding.Sharding | None = None):
        self.kernels = HostExperts(fmt.packed, activations)
        self.threads = threads
        self.landing = ShareLanding(landing)
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


class ShareLanding:
    """Where a decode-sized layer's host share lands for the program that adds it (or a fused layer's expert ids and
    rows for its device program, `OffloadedExecutor.indices_in_place`): pinned host buffers, which that
    program reads in place (`segments.combine_segment` moves them to the device inside it). Passed as a numpy array,
    the share cost that program's call ~100 us more on the H100 machine (benchmarks/offload.md, run 26: 314
    against 228 us), on a batch-1 step's path once per MoE layer.

    Two buffers per shape, written in turn: a layer writes its share only once its routing is on the host, and the
    program that read the previous layer's share ran before that routing; so no buffer is written while a queued
    program may still read it (steps run one at a time, as the model's lock and the server's batch keep them). The
    zeros that stand for no share are buffers of their own, never written. Where a pinned buffer cannot be written in
    place (sharding None, or its numpy view is a copy), shares stay numpy arrays."""

    def __init__(self, sharding: jax.sharding.Sharding | None):
        self.sharding = sharding
        self._rings: dict[tuple, list] = {}
        self._zeros: dict[tuple, jax.Array | np.ndarray] = {}
        self.in_place = sharding is not None and self._writable((1, 1)) is not None

    def put(self, out_ND: np.ndarray) -> jax.Array | np.ndarray:
        """out_ND in one of the buffers of its shape and dtype, as the next program takes it (an empty array, or one
        no buffer can hold in place, as it is)."""
        key = (out_ND.shape, out_ND.dtype)
        if not self.in_place or not out_ND.size:
            return out_ND
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = [0, self._writable(*key), self._writable(*key)]
        if ring[1] is None or ring[2] is None:
            return out_ND
        ring[0] ^= 1
        array, view = ring[1 + ring[0]]
        view[...] = out_ND
        return array

    def zeros(self, shape) -> jax.Array | np.ndarray:
        """Zeros [N, D] of the kind `put` gives, for a layer with no host share (one compiled variant of the next
        program)."""
        shape = tuple(shape)
        if shape not in self._zeros:
            zeros = np.zeros(shape, np.float32)
            self._zeros[shape] = jax.device_put(zeros, self.sharding) if self.in_place else zeros
        return self._zeros[shape]

    def _writable(self, shape, dtype=np.float32) -> tuple[jax.Array, np.ndarray] | None:
        """A pinned host array of zeros and a writable numpy view of its buffer (None where numpy's view is a
        copy)."""
        dtype = np.dtype(dtype)
        array = jax.block_until_ready(jax.device_put(np.zeros(shape, dtype), self.sharding))
        address = np.asarray(array).ctypes.data
        try:
            if address != array.unsafe_buffer_pointer():
                return None
        except Exception:  # a backend that does not say where its buffers are
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        view = np.frombuffer((ctypes.c_byte * nbytes).from_address(address), dtype).reshape(shape)
        return array, view


def default_threads() -> int:
    cores = numba.config.NUMBA_NUM_THREADS
    return cores - 2 if cores > 4 else cores
