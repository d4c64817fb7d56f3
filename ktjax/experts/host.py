"""The routed experts a step chose, computed on the host CPU from their packed int8/int4 buffers.

`HostExperts.compute` takes the chosen experts' base addresses (their buffers stay where they
are: pinned host memory shared with the link) and, for each, the tokens routed to it with their
routing weights, and returns the weighted sum of the experts' outputs per token.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ktjax.experts import host_kernels as hk
from ktjax.experts.packed import PackedLayout


ACTIVATIONS = ("float32", "int8")


def check_activations(activations: str) -> str:
    """`activations` if it names a form the host CPU can multiply int8/int4 experts by, else a one-line error."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"host_activations={activations!r}: use one of {', '.join(ACTIVATIONS)}")
    return activations


class MatrixDims(NamedTuple):
    """One packed matrix's sizes and its arrays' byte offsets in an expert's buffer (a column [arrays, 1])."""

    fmt: str
    rows: int
    cols: int  # padded
    groups: int
    offsets_P1: np.ndarray


class HostExperts:
    """Host-CPU compute for experts of one layout (format and sizes).

    activations: what the weights multiply: "float32" (exact) or "int8", quantized per group of 32
    (integer dot products: faster, ~0.5% error per expert output with int4 weights). int_dots:
    whether int8 activations use the integer kernel (default: where the CPU has AVX2) or the float
    kernel on the values they stand for (the same numbers, up to float rounding)."""

    def __init__(self, layout: PackedLayout, activations: str = "float32", int_dots: bool | None = None):
        self.layout = layout
        self.int8_activations = check_activations(activations) == "int8"
        self.int_dots = hk.INT8_DOTS if int_dots is None else int_dots
        # Read once here: a decode step calls `compute` per MoE layer, and its Python is on the step's path.
        self._dims = {name: MatrixDims(m.fmt, m.rows, m.padded_cols, m.groups, layout.offsets(name)[:, None])
                      for name, m in layout.matrices.items()}

    def _matvec(self, name: str, bases_K, x_KTC, ntok_K, out_KTR):
        fmt, R, C, G, offsets_P1 = self._dims[name]
        addr = bases_K + offsets_P1  # [arrays, K]: each array's address in each chosen expert
        if self.int8_activations:
            xq = np.zeros(x_KTC.shape, np.int8)
            xs, xsum = np.zeros(x_KTC.shape[:2] + (G,), np.float32), np.zeros(x_KTC.shape[:2] + (G,), np.float32)
            hk.quantize_groups(x_KTC, ntok_K, xq, xs, xsum)
            if self.int_dots and G <= hk.MAX_GROUPS:
                if fmt == "int8":
                    hk.matvec_int8_q8(*addr, R, C, xq.ctypes.data, xs, ntok_K, out_KTR, hk.F16_POW2)
                else:
                    hk.matvec_int4_q8(*addr, R, C, xq.ctypes.data, xs, xsum, ntok_K, out_KTR)
                return
            # The float kernels on the values the int8 activations stand for.
            x_KTC = (xq.reshape(xs.shape + (-1,)) * xs[..., None]).reshape(x_KTC.shape)
        if fmt == "int8":
            hk.matvec_int8(*addr, R, C, x_KTC, ntok_K, out_KTR, hk.F16_POW2)
        else:
            xsum = np.zeros(x_KTC.shape[:2] + (G,), np.float32)
            hk.group_sums(x_KTC, ntok_K, xsum)
            hk.matvec_int4(*addr, R, C, x_KTC, xsum, ntok_K, out_KTR)

    def compute(self, bases_K: np.ndarray, tok_KT: np.ndarray, ntok_K: np.ndarray, weight_KT: np.ndarray,
                x_ND: np.ndarray) -> np.ndarray:
        """sum over chosen experts k of weight[k, t] * expert_k(x[tok[k, t]]), float32 [N, D].

        bases_K: int64 addresses of the chosen experts' buffers; tok_KT / weight_KT: the tokens
        routed to each (the first ntok[k] entries count) and their routing weights."""
        K, T = tok_KT.shape
        N, D = x_ND.shape
        F = self.layout.F
        x_KTC = np.zeros((K, T, self._dims["gate_up"].cols), np.float32)
        x_KTC[:, :, :D] = x_ND[tok_KT]
        gu_KTR = np.empty((K, T, 2 * F), np.float32)
        self._matvec("gate_up", bases_K, x_KTC, ntok_K, gu_KTR)
        h_KTC = np.zeros((K, T, self._dims["down"].cols), np.float32)
        hk.swiglu(gu_KTR, ntok_K, F, h_KTC)
        y_KTD = np.empty((K, T, D), np.float32)
        self._matvec("down", bases_K, h_KTC, ntok_K, y_KTD)
        out_ND = np.zeros((N, D), np.float32)
        hk.scatter_add(y_KTD, weight_KT.astype(np.float32, copy=False), tok_KT.astype(np.int64, copy=False), ntok_K,
                       out_ND)
        return out_ND


def assignments(idx_NK: np.ndarray, weights_NK: np.ndarray, experts: np.ndarray):
    """For each expert in `experts`: the tokens routed to it and their weights, padded to the
    largest count (tok_KT, weight_KT, ntok_K)."""
    return hk.routed_tokens(np.asarray(idx_NK), np.asarray(weights_NK, np.float32), np.asarray(experts, np.int64))
