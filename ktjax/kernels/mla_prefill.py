"""Pallas causal flash attention for MLA prefill (full heads: qk = nope + rope = 192, v = 128 for V3).

Backend: Pallas Triton, for the reasons in `mla_decode.py` (interpretable on the CPU CI, compiles on
jax 0.10 and 0.11).

A chunk of T queries starts at q_start[b] in a cache of S keys: query t sits at q_start[b] + t and
sees keys 0..q_start[b] + t. Keys past the chunk's last query are never read, so S can be the
preallocated cache length. Grid = (T // q, H, B), the q-block index reversed so that the longest
rows of the causal triangle start first and the short ones fill the tail of the last wave.

Tiling limits (Triton tiles are powers of two, dot operands >= 16 wide): qk dim K must be a multiple
of 16 (it is split into power-of-two pieces: 192 = 128 + 64, one dot each), v dim V a power of two
>= 16, and the cache must hold one whole key block (S >= 16). Other shapes (e.g. the tiny test model,
K = 12) go to the reference; see `supported`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ktjax.kernels.tiles import LOG2E, MIN_TILE, CompilerParams, dot, dot_t, is_pow2, plgpu, pow2_floor


def _k_chunks(K: int) -> tuple[tuple[int, int], ...]:
    """Binary decomposition of K into (offset, size) power-of-two pieces, largest first."""
    out, off = [], 0
    for bit in reversed(range(K.bit_length())):
        if K & (1 << bit):
            out.append((off, 1 << bit))
            off += 1 << bit
    return tuple(out)


def supported(q_BTHK, v_BSHV) -> bool:
    """Whether the kernel covers these shapes (the limits above); the callers take the reference elsewhere.
    Any non-empty batch, head count and chunk length T (query blocks are masked) work."""
    K, S, V = q_BTHK.shape[-1], v_BSHV.shape[1], v_BSHV.shape[-1]
    return (plgpu is not None and q_BTHK.size > 0 and K % MIN_TILE == 0 and len(_k_chunks(K)) <= 3
            and is_pow2(V) and min(K, V, S) >= MIN_TILE)


def _prefill_kernel(qs_ref, q_ref, k_ref, v_ref, o_ref, *, scale, block_q, block_k, chunks, n_qb):
    iq = n_qb - 1 - pl.program_id(0)  # longest causal rows first
    b = pl.program_id(2)
    T, S = q_ref.shape[0], k_ref.shape[0]
    q_start = qs_ref[b]
    q0 = iq * block_q
    rows_q = q0 + jnp.arange(block_q)
    row_ok_q = rows_q < T
    pos_q = q_start + rows_q
    qs = [plgpu.load(q_ref.at[pl.ds(q0, block_q), pl.ds(c0, c)], mask=row_ok_q[:, None], other=0)
          for c0, c in chunks]
    # Keys < n_full * block_k are <= the first query's position: visible to every row, no mask.
    # Keys in [n_full * block_k, hi) need the causal mask; hi = one past the block's last query.
    hi = jnp.minimum(q_start + jnp.minimum(q0 + block_q, T), S)
    n_full = lax.div(jnp.minimum(q_start + q0 + 1, S), block_k)
    n_all = lax.div(hi + block_k - 1, block_k)

    def step(j, carry, masked):
        acc_qV, m_q, l_q = carry
        k0 = j * block_k
        if masked:
            pos_k = k0 + jnp.arange(block_k)
            ok_k = pos_k < hi  # beyond hi: outside the chunk (garbage, maybe NaN) or the cache: zeros
            ks = [plgpu.load(k_ref.at[pl.ds(k0, block_k), pl.ds(c0, c)], mask=ok_k[:, None], other=0)
                  for c0, c in chunks]
            v_kV = plgpu.load(v_ref.at[pl.ds(k0, block_k), :], mask=ok_k[:, None], other=0)
        else:
            ks = [k_ref[pl.ds(k0, block_k), pl.ds(c0, c)] for c0, c in chunks]
            v_kV = v_ref[pl.ds(k0, block_k), :]
        s_qk = dot_t(qs[0], ks[0])
        for q_, k_ in zip(qs[1:], ks[1:]):
            s_qk += dot_t(q_, k_)
        s_qk *= scale  # log2 domain
        if masked:
            s_qk = jnp.where(pos_k[None, :] <= pos_q[:, None], s_qk, -jnp.inf)
        # Key 0 is visible to every row and is in the first block processed, so m stays finite.
        m_new = jnp.maximum(m_q, jnp.max(s_qk, axis=1))
        alpha_q = jnp.exp2(m_q - m_new)
        p_qk = jnp.exp2(s_qk - m_new[:, None])
        l_q = l_q * alpha_q + jnp.sum(p_qk, axis=1)
        acc_qV = acc_qV * alpha_q[:, None] + dot(p_qk.astype(v_kV.dtype), v_kV)
        return acc_qV, m_new, l_q

    V = v_ref.shape[-1]
    carry = (jnp.zeros((block_q, V), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
    acc_qV, _, l_q = carry
    o_qV = acc_qV / jnp.where(l_q == 0, 1.0, l_q)[:, None]
    plgpu.store(o_ref.at[pl.ds(q0, block_q), :], o_qV.astype(o_ref.dtype), mask=row_ok_q[:, None])


# [is f32] -> tiles, tuned on an H200 by scripts/bench_kernels.py.
PREFILL_CONFIG = {
    False: dict(block_q=256, block_k=64, num_warps=8, num_stages=2),
    True: dict(block_q=64, block_k=32, num_warps=4, num_stages=2),
}


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def mla_prefill_pallas(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHV: jax.Array,
    q_start_B: jax.Array,
    *,
    sm_scale: float,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `mla_prefill_reference`. Tiles default to PREFILL_CONFIG (see DECODE_CONFIG)."""
    cfg = PREFILL_CONFIG[q_BTHK.dtype.itemsize >= 4]
    block_q, block_k = block_q or cfg["block_q"], block_k or cfg["block_k"]
    num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    B, T, H, K = q_BTHK.shape
    S, V = k_BSHK.shape[1], v_BSHV.shape[-1]
    block_q = min(block_q, max(MIN_TILE, pl.next_power_of_2(T)))  # may exceed T: query loads/stores are masked
    block_k = min(block_k, pow2_floor(S))  # never exceeds the cache: see mla_decode_pallas
    n_qb = pl.cdiv(T, block_q)
    kernel = functools.partial(_prefill_kernel, scale=sm_scale * LOG2E, block_q=block_q, block_k=block_k,
                               chunks=_k_chunks(K), n_qb=n_qb)
    return pl.pallas_call(
        kernel,
        grid=(n_qb, H, B),
        in_specs=[
            pl.BlockSpec((B,), lambda i, h, b: (0,)),
            pl.BlockSpec((None, T, None, K), lambda i, h, b: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, K), lambda i, h, b: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, V), lambda i, h, b: (b, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec((None, T, None, V), lambda i, h, b: (b, 0, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), q_BTHK.dtype),
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_prefill",
    )(q_start_B.astype(jnp.int32), q_BTHK, k_BSHK, v_BSHV)
