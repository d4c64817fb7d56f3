"""Routed experts computed on the host CPU, where int8/int4 experts live: numba kernels that read
the chosen experts' quantized bytes in place (no copy, no dequantized weights).

Why numba and not XLA:CPU: XLA's integer dots reach the memory bound only with one scale per row
and with the experts stacked in one array; per-group scales (what GGUF's blocks need) and experts
chosen at run time from separate buffers fall to a few GB/s there (DESIGN.md). Here each chosen
expert is addressed through a table of pointers, so one parallel loop runs over every row of every
chosen expert and reads each weight byte once.

Arithmetic is float32: int8 and int4 values convert exactly, and LLVM vectorises float lanes
where numba would widen integer products to 64 bits (measured: int4 nibbles unpacked as floats
run twice as fast as integer masks and shifts). Each row keeps a 32-lane accumulator across its
groups (the group's scale multiplies the activations), so no horizontal sum runs per group; the
accumulator lives on the stack, where LLVM keeps it in registers (a heap array went through
memory on every group: 55 against ~140 GB/s expected on the H200 machine's 16 cores).

int8 and int4 experts can instead take int8 activations (`matvec_int8_q8`, `matvec_int4_q8`): the
activations quantized per group of 32, as llama.cpp's CPU paths do, so the products are integer dot
products (AVX2's pmaddubsw and pmaddwd, called as LLVM intrinsics: LLVM does not find them in a plain
loop): by count about 2.5 times fewer vector instructions per weight than the float kernel. Measured
over 8 full-size experts on the H200 machine's 16 cores (benchmarks/host_experts.md, run 3): int4 84
against 30 GB/s, int8 67 against 61; for ~0.5% error per expert output. The `host_activations` default.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ktjax.experts.host_simd import (INT4_VNNI, INT8_DOTS, int4_pair_dots, int4_quad_dots, int8_group_dot, scales16,
                                     stack_f32, voidptr)
from ktjax.experts.quant import GROUP, SUPER

ROWS = 16  # rows per parallel work item
MAX_GROUPS = 1024  # an int4 row's groups of 32 (32768 columns) that `matvec_int4_q8` can hold on the stack


@njit(inline="always")
def _zero(acc):
    for l in range(GROUP):
        acc[l] = 0


@njit(inline="always")
def _total(acc):
    t = np.float32(0.0)
    for l in range(GROUP):
        t += acc[l]
    return t


# float16 -> float32 without float16 in numba: value = mantissa * 2^(exponent - 25), with the
# implicit bit added for normal numbers (exponent 0: subnormals, 2^-24 per step). Exact.
F16_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


@njit(inline="always")
def _f16(bits, pow2):
    # Branch-free, so a row's scales convert in one vectorised loop.
    b = np.int32(bits)
    e = (b >> 10) & 31
    m = (b & 1023) + 1024 * np.int32(e != 0)
    return np.float32(m) * pow2[e] * np.float32(1 - 2 * ((b >> 15) & 1))


@njit(inline="always")
def _int8_scales(scale_p, s, r, xs, pow2):
    """scale[g] = float16 scale s[r, g] * xs[g] over a row's groups, 16 at a time, the rest one by one.
    With `_f16` for every group the scales, not the dot products, took most of an int8 row's time (dev
    box, one thread: 19 GB/s of weights with them, 27 with these; a plain read of the bytes 31-34)."""
    G = s.shape[1]
    s_row, xs_p = s[r].ctypes.data, xs.ctypes.data
    full = G - G % 16
    for g0 in range(0, full, 16):
        scales16(scale_p, g0, s_row + 2 * g0, xs_p + 4 * g0)
    scale = numba.carray(scale_p, (G,))
    for g in range(full, G):
        scale[g] = _f16(s[r, g], pow2) * xs[g]


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def matvec_int8(q_addr, s_addr, R, C, x_KTC, ntok_K, out_KTR, pow2):
    """out[k, t, r] = sum_c w_k[r, c] x[k, t, c] for the first ntok[k] vectors t of chosen matrix k.

    w_k: int8 q [R, C] at address q_addr[k], float16 scales (raw bits) [R, C/32] at s_addr[k]."""
    K = q_addr.shape[0]
    G = C // GROUP
    blocks = (R + ROWS - 1) // ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * ROWS
        q = numba.carray(voidptr(q_addr[k]), (R, C), np.int8)
        s = numba.carray(voidptr(s_addr[k]), (R, G), np.uint16)
        acc = numba.carray(stack_f32(32), (GROUP,))
        for r in range(r0, min(R, r0 + ROWS)):
            qr = q[r]
            for t in range(ntok_K[k]):
                x = x_KTC[k, t]
                _zero(acc)
                for g in range(G):
                    sg = _f16(s[r, g], pow2)
                    for l in range(GROUP):
                        acc[l] += np.float32(qr[g * GROUP + l]) * (x[g * GROUP + l] * sg)
                out_KTR[k, t, r] = _total(acc)


@njit(inline="always")
def _int4_scales(sc_addr, mn_addr, d_addr, dmin_addr, R, G, S):
    """An int4 matrix's 8-bit scales and minimums [R, G] and float32 bases d, dmin [R, S], at their addresses."""
    return (numba.carray(voidptr(sc_addr), (R, G), np.uint8), numba.carray(voidptr(mn_addr), (R, G), np.uint8),
            numba.carray(voidptr(d_addr), (R, S), np.float32), numba.carray(voidptr(dmin_addr), (R, S), np.float32))


@njit(inline="always")
def _int4_row_scales(scale, sc, mn, d, dmin, r, xs, xsum):
    """Row r's group scales for int8 activations, scale[g] = d*sc[g]*xs[g], in one vectorised loop before
    the dot products; returns the minimums' term the row subtracts, the sum of dmin*mn[g]*xsum[g]."""
    offset = np.float32(0.0)
    for g in range(sc.shape[1]):
        scale[g] = d[r, g // 8] * np.float32(sc[r, g]) * xs[g]
        offset += dmin[r, g // 8] * np.float32(mn[r, g]) * xsum[g]
    return offset


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def matvec_int4(q_addr, sc_addr, mn_addr, d_addr, dmin_addr, R, C, x_KTC, xsum_KTG, ntok_K, out_KTR):
    """As `matvec_int8` for int4 matrices: w = d*sc*q - dmin*mn, so each group adds
    d*sc * sum(q x) - dmin*mn * sum(x) (xsum: the activations' sum per group of 32)."""
    K = q_addr.shape[0]
    G = C // GROUP
    S = C // SUPER
    blocks = (R + ROWS - 1) // ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * ROWS
        q = numba.carray(voidptr(q_addr[k]), (R, C // 2), np.uint8)
        sc, mn, d, dmin = _int4_scales(sc_addr[k], mn_addr[k], d_addr[k], dmin_addr[k], R, G, S)
        acc = numba.carray(stack_f32(32), (GROUP,))
        for r in range(r0, min(R, r0 + ROWS)):
            qr = q[r]
            for t in range(ntok_K[k]):
                x = x_KTC[k, t]
                xsum = xsum_KTG[k, t]
                _zero(acc)
                offset = np.float32(0.0)
                for p in range(G // 2):  # a pair of groups: 32 bytes, low nibbles then high nibbles
                    g = 2 * p
                    s0 = d[r, g // 8] * np.float32(sc[r, g])
                    s1 = d[r, g // 8] * np.float32(sc[r, g + 1])
                    offset += dmin[r, g // 8] * (np.float32(mn[r, g]) * xsum[g] + np.float32(mn[r, g + 1]) * xsum[g + 1])
                    base = g * GROUP
                    for l in range(GROUP):
                        b = np.float32(qr[p * GROUP + l])
                        hi = np.floor(b * np.float32(0.0625))
                        acc[l] += (b - np.float32(16.0) * hi) * (x[base + l] * s0) + hi * (x[base + GROUP + l] * s1)
                out_KTR[k, t, r] = _total(acc) - offset


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def matvec_int4_q8_vnni(q_addr, sc_addr, mn_addr, d_addr, dmin_addr, R, C, xq_addr, xs_KTG, xsum_KTG, ntok_K, out_KTR):
    """`matvec_int4_q8` with AVX-512 VNNI (`int4_quad_dots`): four groups per step, 16 lanes."""
    K, T = xs_KTG.shape[:2]
    G = C // GROUP
    S = C // SUPER
    blocks = (R + ROWS - 1) // ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * ROWS
        sc, mn, d, dmin = _int4_scales(sc_addr[k], mn_addr[k], d_addr[k], dmin_addr[k], R, G, S)
        acc_p = stack_f32(16)
        acc = numba.carray(acc_p, (16,))
        scale_p = stack_f32(MAX_GROUPS)
        scale = numba.carray(scale_p, (MAX_GROUPS,))
        for r in range(r0, min(R, r0 + ROWS)):
            q_row = q_addr[k] + r * (C // 2)
            for t in range(ntok_K[k]):
                xs = xs_KTG[k, t]
                xsum = xsum_KTG[k, t]
                x_row = xq_addr + (k * T + t) * C
                offset = _int4_row_scales(scale, sc, mn, d, dmin, r, xs, xsum)
                for l in range(16):
                    acc[l] = 0
                for j in range(G // 4):  # G is a multiple of 8: rows are whole super-blocks
                    int4_quad_dots(acc_p, q_row + j * 2 * GROUP, x_row + j * 4 * GROUP, scale_p, j)
                total = np.float32(0.0)
                for l in range(16):
                    total += acc[l]
                out_KTR[k, t, r] = total - offset


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def matvec_int8_q8(q_addr, s_addr, R, C, xq_addr, xs_KTG, ntok_K, out_KTR, pow2):
    """As `matvec_int8` with int8 activations: x = xs * xq per group of 32 (`quantize_groups`; xq at
    address xq_addr, int8 [K, T, C] contiguous), so each group adds s*xs * (q . xq)."""
    K, T = xs_KTG.shape[:2]
    G = C // GROUP
    blocks = (R + ROWS - 1) // ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * ROWS
        s = numba.carray(voidptr(s_addr[k]), (R, G), np.uint16)
        acc_p = stack_f32(8)
        acc = numba.carray(acc_p, (8,))
        scale_p = stack_f32(MAX_GROUPS)
        scale = numba.carray(scale_p, (MAX_GROUPS,))
        for r in range(r0, min(R, r0 + ROWS)):
            q_row = q_addr[k] + r * C
            for t in range(ntok_K[k]):
                xs = xs_KTG[k, t]
                x_row = xq_addr + (k * T + t) * C
                _int8_scales(scale_p, s, r, xs, pow2)
                for l in range(8):
                    acc[l] = 0
                for g in range(G):
                    int8_group_dot(acc_p, q_row + g * GROUP, x_row + g * GROUP, scale[g])
                total = np.float32(0.0)
                for l in range(8):
                    total += acc[l]
                out_KTR[k, t, r] = total


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def matvec_int4_q8(q_addr, sc_addr, mn_addr, d_addr, dmin_addr, R, C, xq_addr, xs_KTG, xsum_KTG, ntok_K, out_KTR):
    """As `matvec_int4` with int8 activations: x = xs * xq per group of 32 (`quantize_groups`; xq at
    address xq_addr, int8 [K, T, C] contiguous), so each group adds d*sc*xs * (q . xq) - dmin*mn*xsum."""
    K, T = xs_KTG.shape[:2]
    G = C // GROUP
    S = C // SUPER
    blocks = (R + ROWS - 1) // ROWS
    for job in prange(K * blocks):
        k = job // blocks
        r0 = (job % blocks) * ROWS
        sc, mn, d, dmin = _int4_scales(sc_addr[k], mn_addr[k], d_addr[k], dmin_addr[k], R, G, S)
        acc_p = stack_f32(8)
        acc = numba.carray(acc_p, (8,))
        scale = numba.carray(stack_f32(MAX_GROUPS), (MAX_GROUPS,))
        for r in range(r0, min(R, r0 + ROWS)):
            q_row = q_addr[k] + r * (C // 2)
            for t in range(ntok_K[k]):
                xs = xs_KTG[k, t]
                xsum = xsum_KTG[k, t]
                x_row = xq_addr + (k * T + t) * C
                offset = _int4_row_scales(scale, sc, mn, d, dmin, r, xs, xsum)
                for l in range(8):
                    acc[l] = 0
                for p in range(G // 2):
                    int4_pair_dots(acc_p, q_row + p * GROUP, x_row + 2 * p * GROUP, x_row + (2 * p + 1) * GROUP,
                                    scale[2 * p], scale[2 * p + 1])
                total = np.float32(0.0)
                for l in range(8):
                    total += acc[l]
                out_KTR[k, t, r] = total - offset


@njit(inline="always")
def _quantize_group(v, xq_C, g, xs_G, xsum_G):
    """One group of 32 activations v to int8 at xq_C[32 g:]: its scale xs = max|v| / 127 and xsum = xs * sum(xq),
    the sum of the values the int8 form stands for (the minimums' term must see the same activations as the dots,
    or the int4 offsets' large terms stop cancelling)."""
    amax = np.float32(0.0)
    for l in range(GROUP):
        amax = max(amax, abs(v[l]))
    xs = amax / np.float32(127.0)
    inv = np.float32(1.0) / xs if amax > 0 else np.float32(0.0)
    total = 0
    for l in range(GROUP):
        q = np.int32(np.rint(v[l] * inv))
        xq_C[g * GROUP + l] = q
        total += q
    xs_G[g] = xs
    xsum_G[g] = xs * np.float32(total)


@njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def quantize_groups(x_KTC, ntok_K, xq_KTC, xs_KTG, xsum_KTG):
    """Activations to int8 per group of 32 (`_quantize_group`)."""
    for k in range(x_KTC.shape[0]):
        for t in range(ntok_K[k]):
            for g in range(xs_KTG.shape[2]):
                _quantize_group(x_KTC[k, t, g * GROUP:(g + 1) * GROUP], xq_KTC[k, t], g, xs_KTG[k, t], xsum_KTG[k, t])


@njit(parallel=True, nogil=True, fastmath=True, cache=True, error_model="numpy")
def swiglu_quantized(gu_KTR, ntok_K, F, xq_KTC, xs_KTG, xsum_KTG):
    """`swiglu` and then `quantize_groups` of its output, as one parallel loop over (expert, token, group of 32):
    single-threaded, the two took ~0.11 ms of an 8-expert call on the H100 machine's CPU (host_experts.md, run 7).
    The padding columns (F and beyond) quantize as zeros."""
    K, T, C = xq_KTC.shape
    G = C // GROUP
    for job in prange(K * T * G):
        k, t, g = job // (T * G), (job // G) % T, job % G
        if t < ntok_K[k]:
            h = numba.carray(stack_f32(32), (GROUP,))
            for l in range(GROUP):
                f = g * GROUP + l
                h[l] = np.float32(0.0)
                if f < F:
                    a = gu_KTR[k, t, f]
                    h[l] = a / (np.float32(1.0) + np.exp(-a)) * gu_KTR[k, t, F + f]
            _quantize_group(h, xq_KTC[k, t], g, xs_KTG[k, t], xsum_KTG[k, t])


@njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def group_sums(x_KTC, ntok_K, out_KTG):
    for k in range(x_KTC.shape[0]):
        for t in range(ntok_K[k]):
            for g in range(out_KTG.shape[2]):
                s = np.float32(0.0)
                for l in range(GROUP):
                    s += x_KTC[k, t, g * GROUP + l]
                out_KTG[k, t, g] = s


@njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def swiglu(gu_KTR, ntok_K, F, h_KTC):
    """h = silu(gate) * up from the gate_up products [.., 2F] (h's padding columns stay zero)."""
    for k in range(gu_KTR.shape[0]):
        for t in range(ntok_K[k]):
            for f in range(F):
                g = gu_KTR[k, t, f]
                h_KTC[k, t, f] = g / (np.float32(1.0) + np.exp(-g)) * gu_KTR[k, t, F + f]


@njit(nogil=True, cache=True, error_model="numpy")
def scatter_add(y_KTD, weight_KT, tok_KT, ntok_K, out_ND):
    """out[token] += routing weight * expert output, for each chosen expert's tokens."""
    for k in range(y_KTD.shape[0]):
        for t in range(ntok_K[k]):
            n = tok_KT[k, t]
            w = weight_KT[k, t]
            for c in range(out_ND.shape[1]):
                out_ND[n, c] += w * y_KTD[k, t, c]


@njit(nogil=True, cache=True, error_model="numpy")
def routed_tokens(idx_NK, weights_NK, experts_E):
    """For each expert in experts_E: the tokens routed to it (in token order) and their routing weights,
    padded to the largest count: (tok [E, T] int64, weight [E, T] float32, ntok [E] int64)."""
    E = experts_E.shape[0]
    N, K = idx_NK.shape
    ntok = np.zeros(E, np.int64)
    for e in range(E):
        for n in range(N):
            for j in range(K):
                if idx_NK[n, j] == experts_E[e]:
                    ntok[e] += 1
    T = max(1, ntok.max()) if E else 1
    tok = np.zeros((E, T), np.int64)
    weight = np.zeros((E, T), np.float32)
    for e in range(E):
        t = 0
        for n in range(N):
            for j in range(K):
                if idx_NK[n, j] == experts_E[e]:
                    tok[e, t] = n
                    weight[e, t] = weights_NK[n, j]
                    t += 1
    return tok, weight, ntok
