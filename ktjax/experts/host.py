"""The routed experts a step chose, computed on the host CPU from their packed int8/int4 buffers.

`HostExperts.compute` takes the chosen experts' base addresses (their buffers stay where they
are: pinned host memory shared with the link) and, for each, the tokens routed to it with their
routing weights, and returns the weighted sum of the experts' outputs per token.

The whole computation (activations quantized, gate_up, SwiGLU, down, the weighted sum) is one
compiled function (`routed_sum`) calling the parallel kernels of `host_kernels`: a batch-1 decode
step calls it once per MoE layer with 1-3 experts, where a call's fixed cost, not the experts'
bytes, is what it waits for (offload.md, run 14: ~0.1 ms per call on the H200 machine). Python
glue between the kernels cost more than the tiny experts' arithmetic (time_dispatch.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ktjax.experts import host_kernels as hk
from ktjax.experts.packed import PackedLayout


ACTIVATIONS = ("float32", "int8")


def check_activations(activations: str) -> str:
    """`activations` if it names a form the host CPU can multiply int8/int4 experts by, else a one-line error."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"host_activations={activations!r}: use one of {', '.join(ACTIVATIONS)}")
    return activations


# Which kernels routed_sum calls is chosen by which of its arguments are None: numba drops a branch on
# `arg is not None` while it compiles when arg is None, so only the kernels one layout and activation
# form use compile (all of them take ~14 s, once per machine: numba caches them). The weights' addresses
# come as int8_PK or int4_PK, the other None; of dots (int8 activations, integer dot products) and floats
# (float kernels), one is True and the other None; q8 (True or None): with floats, the float kernels
# multiply the values int8 activations stand for (CPUs without AVX2; the same numbers up to rounding);
# vnni (True or None): with dots, int4 weights go through the AVX-512 VNNI kernel.


@njit(nogil=True, cache=True, error_model="numpy")
def _quantized(x_KTC, ntok_K, G):
    K, T, C = x_KTC.shape
    xq = np.zeros((K, T, C), np.int8)
    xs, xsum = np.zeros((K, T, G), np.float32), np.zeros((K, T, G), np.float32)
    hk.quantize_groups(x_KTC, ntok_K, xq, xs, xsum)
    return xq, xs, xsum


@njit(nogil=True, cache=True, error_model="numpy")
def _routed_rows_quantized(x_ND, tok_KT, ntok_K, C, G):
    """The routed tokens' activations in int8 per group, a row per (expert, token) as the kernels read them, padded
    to C columns: each token quantized once, however many chosen experts it is routed to (at batch 1, every one),
    and its row copied to each. (Element loops: numba's slice assignment copied these rows ~20 times slower.)"""
    N, D = x_ND.shape
    x_1NC = np.zeros((1, N, C), np.float32)
    for n in range(N):
        for c in range(D):
            x_1NC[0, n, c] = x_ND[n, c]
    xq_1NC, xs_1NG, xsum_1NG = _quantized(x_1NC, np.full(1, N, np.int64), G)
    K, T = tok_KT.shape
    xq, xs, xsum = np.empty((K, T, C), np.int8), np.empty((K, T, G), np.float32), np.empty((K, T, G), np.float32)
    for k in range(K):
        for t in range(ntok_K[k]):
            n = tok_KT[k, t]
            for c in range(C):
                xq[k, t, c] = xq_1NC[0, n, c]
            for g in range(G):
                xs[k, t, g], xsum[k, t, g] = xs_1NG[0, n, g], xsum_1NG[0, n, g]
    return xq, xs, xsum


@njit(nogil=True, cache=True, error_model="numpy")
def _dots(int8_PK, int4_PK, vnni, R, C, xq_KTC, xs_KTG, xsum_KTG, ntok_K, out_KTR):
    """out[k, t] = w_k x[k, t] for one matrix of each chosen expert (its arrays at *_PK[:, k]), x in int8 per
    group (integer dot products)."""
    if int4_PK is not None and vnni is not None:
        hk.matvec_int4_q8_vnni(int4_PK[0], int4_PK[1], int4_PK[2], int4_PK[3], int4_PK[4], R, C, xq_KTC.ctypes.data,
                               xs_KTG, xsum_KTG, ntok_K, out_KTR)
    if int4_PK is not None and vnni is None:
        hk.matvec_int4_q8(int4_PK[0], int4_PK[1], int4_PK[2], int4_PK[3], int4_PK[4], R, C, xq_KTC.ctypes.data,
                          xs_KTG, xsum_KTG, ntok_K, out_KTR)
    if int8_PK is not None:
        hk.matvec_int8_q8(int8_PK[0], int8_PK[1], R, C, xq_KTC.ctypes.data, xs_KTG, ntok_K, out_KTR, hk.F16_POW2)


@njit(nogil=True, cache=True, error_model="numpy")
def _floats(int8_PK, int4_PK, q8, R, C, G, x_KTC, ntok_K, out_KTR):
    """out[k, t] = w_k x[k, t] on the float kernels; with q8, x replaced by the values its int8 form stands for."""
    if q8 is not None:
        xq, xs, _ = _quantized(x_KTC, ntok_K, G)
        for k in range(x_KTC.shape[0]):
            for t in range(ntok_K[k]):
                for c in range(C):
                    x_KTC[k, t, c] = np.float32(xq[k, t, c]) * xs[k, t, c // hk.GROUP]
    if int4_PK is not None:
        xsum = np.zeros((x_KTC.shape[0], x_KTC.shape[1], G), np.float32)
        hk.group_sums(x_KTC, ntok_K, xsum)
        hk.matvec_int4(int4_PK[0], int4_PK[1], int4_PK[2], int4_PK[3], int4_PK[4], R, C, x_KTC, xsum, ntok_K,
                       out_KTR)
    if int8_PK is not None:
        hk.matvec_int8(int8_PK[0], int8_PK[1], R, C, x_KTC, ntok_K, out_KTR, hk.F16_POW2)


@njit(nogil=True, cache=True, error_model="numpy")
def routed_sum(int8, int4, dots, floats, q8, vnni, gate_up_PK, gate_up_RCG, down_PK, down_RCG, F, tok_KT, ntok_K,
               weight_KT, x_ND):
    """sum over chosen experts k of weight[k, t] * down_k(swiglu(gate_up_k(x[tok[k, t]]))), float32 [N, D].

    *_PK: each matrix's array addresses [arrays, K]; *_RCG: its rows, padded columns and groups;
    int8 / int4 / dots / floats / q8 / vnni: the switches above (True or None). Only rows t < ntok[k] are
    computed and read, so the others stay uninitialised."""
    K, T = tok_KT.shape
    N, D = x_ND.shape
    gu8, gu4 = (gate_up_PK, None) if int8 is not None else (None, gate_up_PK)
    dn8, dn4 = (down_PK, None) if int8 is not None else (None, down_PK)
    gu_KTR = np.empty((K, T, 2 * F), np.float32)
    y_KTD = np.empty((K, T, D), np.float32)
    if dots is not None:
        xq, xs, xsum = _routed_rows_quantized(x_ND, tok_KT, ntok_K, gate_up_RCG[1], gate_up_RCG[2])
        _dots(gu8, gu4, vnni, gate_up_RCG[0], gate_up_RCG[1], xq, xs, xsum, ntok_K, gu_KTR)
        hq = np.empty((K, T, down_RCG[1]), np.int8)
        hs, hsum = np.empty((K, T, down_RCG[2]), np.float32), np.empty((K, T, down_RCG[2]), np.float32)
        hk.swiglu_quantized(gu_KTR, ntok_K, F, hq, hs, hsum)
        _dots(dn8, dn4, vnni, down_RCG[0], down_RCG[1], hq, hs, hsum, ntok_K, y_KTD)
    if floats is not None:
        x_KTC = np.zeros((K, T, gate_up_RCG[1]), np.float32)
        for k in range(K):
            for t in range(ntok_K[k]):
                for c in range(D):
                    x_KTC[k, t, c] = x_ND[tok_KT[k, t], c]
        _floats(gu8, gu4, q8, gate_up_RCG[0], gate_up_RCG[1], gate_up_RCG[2], x_KTC, ntok_K, gu_KTR)
        h_KTC = np.zeros((K, T, down_RCG[1]), np.float32)
        hk.swiglu(gu_KTR, ntok_K, F, h_KTC)
        _floats(dn8, dn4, q8, down_RCG[0], down_RCG[1], down_RCG[2], h_KTC, ntok_K, y_KTD)
    out_ND = np.zeros((N, D), np.float32)
    hk.scatter_add(y_KTD, weight_KT, tok_KT, ntok_K, out_ND)
    return out_ND


class HostExperts:
    """Host-CPU compute for experts of one layout (format and sizes).

    activations: what the weights multiply: "float32" (exact) or "int8", quantized per group of 32
    (integer dot products: faster, ~0.5% error per expert output with int4 weights). int_dots:
    whether int8 activations use the integer kernel (default: where the CPU has AVX2) or the float
    kernel on the values they stand for (the same numbers, up to float rounding). vnni: whether int4
    weights with integer dots use AVX-512 VNNI (default: where the CPU has it), else AVX2."""

    def __init__(self, layout: PackedLayout, activations: str = "float32", int_dots: bool | None = None,
                 vnni: bool | None = None):
        self.layout = layout
        mats = layout.matrices
        self.int8_activations = check_activations(activations) == "int8"
        self.int_dots = (self.int8_activations and (hk.INT8_DOTS if int_dots is None else int_dots)
                         and max(m.groups for m in mats.values()) <= hk.MAX_GROUPS)
        int4 = layout.fmt == "int4"
        self.vnni = bool(int4 and self.int_dots and (hk.INT4_VNNI if vnni is None else vnni))
        self._switches = tuple(True if on else None for on in (not int4, int4, self.int_dots, not self.int_dots,
                                                                 self.int8_activations, self.vnni))
        # Read once here: a decode step calls `compute` per MoE layer, and its Python is on the step's path.
        self._offsets = {name: layout.offsets(name)[:, None] for name in mats}  # [arrays, 1]
        self._dims = {name: np.array([m.rows, m.padded_cols, m.groups], np.int64) for name, m in mats.items()}

    def compute(self, bases_K: np.ndarray, tok_KT: np.ndarray, ntok_K: np.ndarray, weight_KT: np.ndarray,
                x_ND: np.ndarray) -> np.ndarray:
        """sum over chosen experts k of weight[k, t] * expert_k(x[tok[k, t]]), float32 [N, D].

        bases_K: int64 addresses of the chosen experts' buffers; tok_KT / weight_KT: the tokens
        routed to each (the first ntok[k] entries count) and their routing weights."""
        bases_K = np.asarray(bases_K, np.int64)
        return routed_sum(*self._switches, bases_K + self._offsets["gate_up"],
                          self._dims["gate_up"], bases_K + self._offsets["down"], self._dims["down"], self.layout.F,
                          np.asarray(tok_KT, np.int64), np.asarray(ntok_K, np.int64),
                          np.asarray(weight_KT, np.float32), np.asarray(x_ND, np.float32))


def assignments(idx_NK: np.ndarray, weights_NK: np.ndarray, experts: np.ndarray):
    """For each expert in `experts`: the tokens routed to it and their weights, padded to the
    largest count (tok_KT, weight_KT, ntok_K)."""
    return hk.routed_tokens(np.asarray(idx_NK), np.asarray(weights_NK, np.float32), np.asarray(experts, np.int64))
