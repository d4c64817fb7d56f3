"""Pallas MLA decode: flash decoding over the compressed (latent + rope) cache, absorbed form.

Backend choice: Pallas *Triton* (`jax.experimental.pallas.triton`), not Mosaic GPU.
- CI is CPU-only and can only interpret. The Triton-style kernel (BlockSpecs + `load`/`store`
  with masks + `lax.dot_general`) runs unchanged in the generic Pallas interpreter on jax 0.10
  and 0.11; Mosaic GPU kernels are written against barriers/TMA/warpgroup APIs that change
  between releases and whose interpreter covers far less.
- The same source compiles on the GPU machine (jax 0.11.2), where the Triton backend is
  deprecated but present, and Triton emits wgmma on Hopper by itself. If a later jax drops it,
  `supported()` sees the failed import and every call takes the reference path.

Shapes (suffixes): B batch, H query heads (all share one latent KV head), L latent dim (512),
R rope dim (64), T cache length, S number of context splits, h/k the head/key block sizes.

Work split: grid = (H // h, S, B), head blocks fastest so the H//h programs that read the same
cache rows run together and the second read hits L2. Each program runs an online softmax over
its 1/S share of row b's *valid* length (split sizes follow the dynamic length, so short rows
do not leave programs idle on padding), and writes a normalised partial output plus its
log-sum-exp; a tiny XLA combine merges the S partials. With S == 1 the kernel writes the final
output directly (no f32 round trip).

Roofline: with H = 128 every cache byte feeds 2*128*(576+512)/1152 = 242 flops, so on an H200
(3357 GB/s copy, 708 TFLOP/s XLA matmul, measured) this "memory-bound" kernel hits the matmul
ceiling at ~2900 GB/s; 75% of HBM would need 85% of the matmul peak. Measured (benchmarks/kernels.md):
~1110 GB/s = 252 TFLOP/s at B=64, T=4K, 1.22x XLA. The limit is the per-CTA pipeline, not memory:
with H = 64 (each cache row read once) the same 128 CTAs take the same time. Triton runs load ->
QK -> softmax -> PV in lockstep in one 8-warp CTA per SM (the [64, 512] f32 accumulator takes the
register file); FlashMLA-class speed needs warp specialisation (producer warps + two consumer
warpgroups ping-ponging), i.e. a Mosaic GPU kernel: the planned next step, behind the same entry point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ktjax.kernels.tiles import LOG2E, MIN_TILE, CompilerParams, dot, dot_t, is_pow2, plgpu, pow2_floor

def supported(q_latent_BHL, q_rope_BHR, kv_latent_BTL) -> bool:
    """Whether the kernel covers these shapes; the callers take the reference for every other shape.

    Triton tiles are powers of two, dot operands at least MIN_TILE wide: L and R must be such, and the
    cache must hold one whole key block (block_k <= T, so T >= MIN_TILE). Any non-empty batch, any head
    count (the query is padded to whole head blocks) and any valid lengths (clipped to 0..T) work.
    """
    L, R, T = q_latent_BHL.shape[-1], q_rope_BHR.shape[-1], kv_latent_BTL.shape[1]
    return (plgpu is not None and q_latent_BHL.size > 0 and is_pow2(L) and is_pow2(R)
            and min(L, R, T) >= MIN_TILE)


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover
        return 132


def _decode_kernel(len_ref, ql_ref, qr_ref, kvl_ref, kr_ref, o_ref, *lse_ref, scale, block_k, num_splits):
    b, s = pl.program_id(2), pl.program_id(1)
    length = jnp.clip(len_ref[b], 0, kvl_ref.shape[0])  # never read past the cache, whatever the caller says
    # This program's share of the valid length, in whole key blocks (so `lo` stays block-aligned).
    # (lax.div: Python's // on int32 lowers to a floor-division with sign fix-ups; all values are >= 0.)
    chunk = lax.div(lax.div(length + block_k - 1, block_k) + num_splits - 1, num_splits) * block_k
    lo = s * chunk
    hi = jnp.minimum(lo + chunk, length)
    n_full = lax.div(jnp.maximum(hi - lo, 0), block_k)

    ql_hL, qr_hR = ql_ref[...], qr_ref[...]
    h, L = ql_hL.shape

    def step(start, carry, masked):
        acc_hL, m_h, l_h = carry
        if masked:
            # Tail block: rows >= hi are outside the cache or hold garbage (maybe NaN): load zeros.
            valid_k = start + jnp.arange(block_k) < hi
            kv_kL = plgpu.load(kvl_ref.at[pl.ds(start, block_k), :], mask=valid_k[:, None], other=0)
            kr_kR = plgpu.load(kr_ref.at[pl.ds(start, block_k), :], mask=valid_k[:, None], other=0)
        else:
            kv_kL = kvl_ref[pl.ds(start, block_k), :]
            kr_kR = kr_ref[pl.ds(start, block_k), :]
        s_hk = (dot_t(ql_hL, kv_kL) + dot_t(qr_hR, kr_kR)) * scale  # log2 domain: exp2 below
        if masked:
            s_hk = jnp.where(valid_k[None, :], s_hk, -jnp.inf)
        # Every block processed holds >= 1 valid key, so m_new is finite and exp2 never sees inf-inf.
        m_new = jnp.maximum(m_h, jnp.max(s_hk, axis=1))
        alpha_h = jnp.exp2(m_h - m_new)
        p_hk = jnp.exp2(s_hk - m_new[:, None])
        l_h = l_h * alpha_h + jnp.sum(p_hk, axis=1)
        acc_hL = acc_hL * alpha_h[:, None] + dot(p_hk.astype(kv_kL.dtype), kv_kL)
        return acc_hL, m_new, l_h

    carry = (jnp.zeros((h, L), jnp.float32), jnp.full((h,), -jnp.inf, jnp.float32), jnp.zeros((h,), jnp.float32))
    carry = lax.fori_loop(0, n_full, lambda i, c: step(lo + i * block_k, c, False), carry)
    tail = lo + n_full * block_k
    carry = lax.cond(tail < hi, lambda c: step(tail, c, True), lambda c: c, carry)
    acc_hL, m_h, l_h = carry
    # Empty split (or length 0): l = 0 -> output 0 and lse = -inf, which the combine weighs by 0.
    l_safe = jnp.where(l_h == 0, 1.0, l_h)
    o_ref[...] = (acc_hL / l_safe[:, None]).astype(o_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = m_h + jnp.log2(l_safe) + jnp.where(l_h == 0, -jnp.inf, 0.0)


# [is f32] -> tiles. bf16: block_h=64 keeps the [64, 512] f32 accumulator at 128 registers/thread on 8 warps.
DECODE_CONFIG = {
    False: dict(block_h=64, block_k=64, num_warps=8, num_stages=2),
    True: dict(block_h=32, block_k=16, num_warps=4, num_stages=2),
}


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_h", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def mla_decode_pallas(
    q_latent_BHL: jax.Array,
    q_rope_BHR: jax.Array,
    kv_latent_BTL: jax.Array,
    k_rope_BTR: jax.Array,
    lengths_B: jax.Array,
    *,
    sm_scale: float,
    block_h: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as `mla_decode_reference`; entries at positions >= lengths[b] are never read.

    Tiles default to DECODE_CONFIG (tuned on an H200 by scripts/bench_kernels.py); f32 inputs get
    half-size tiles, as their blocks would not fit in shared memory.
    """
    cfg = DECODE_CONFIG[q_latent_BHL.dtype.itemsize >= 4]
    block_h, block_k = block_h or cfg["block_h"], block_k or cfg["block_k"]
    num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
    B, H, L = q_latent_BHL.shape
    T, R = kv_latent_BTL.shape[1], q_rope_BHR.shape[-1]
    # Heads: pad the (small) query up to a whole head block; never pad the (large) cache.
    block_h = min(block_h, max(MIN_TILE, pl.next_power_of_2(H)))
    Hp = pl.cdiv(H, block_h) * block_h
    if Hp != H:
        q_latent_BHL = jnp.pad(q_latent_BHL, ((0, 0), (0, Hp - H), (0, 0)))
        q_rope_BHR = jnp.pad(q_rope_BHR, ((0, 0), (0, Hp - H), (0, 0)))
    # A key block never exceeds the cache: the interpreter traces the unmasked block loads even where
    # they never run, and refuses a slice longer than the array.
    block_k = min(block_k, pow2_floor(T))
    n_hb = Hp // block_h
    if num_splits is None:
        # Fill the SMs once: split the context only when batch x head-blocks leaves SMs idle, and keep
        # >= 4 key blocks per split so the partial outputs stay small next to the cache they replace.
        num_splits = max(1, min(_num_sms() // (B * n_hb), pl.cdiv(T, 4 * block_k)))
    S = num_splits
    out_dtype = q_latent_BHL.dtype if S == 1 else jnp.float32

    kernel = functools.partial(_decode_kernel, scale=sm_scale * LOG2E, block_k=block_k, num_splits=S)
    in_specs = [
        pl.BlockSpec((B,), lambda hb, s, b: (0,)),
        pl.BlockSpec((None, block_h, L), lambda hb, s, b: (b, hb, 0)),
        pl.BlockSpec((None, block_h, R), lambda hb, s, b: (b, hb, 0)),
        pl.BlockSpec((None, T, L), lambda hb, s, b: (b, 0, 0)),
        pl.BlockSpec((None, T, R), lambda hb, s, b: (b, 0, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((B, S, Hp, L), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, block_h, L), lambda hb, s, b: (b, s, hb, 0))]
    if S > 1:
        out_shape.append(jax.ShapeDtypeStruct((B, S, Hp), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, block_h), lambda hb, s, b: (b, s, hb)))
    outs = pl.pallas_call(
        kernel,
        grid=(n_hb, S, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_decode",
    )(lengths_B.astype(jnp.int32), q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR)
    if S == 1:
        return outs[0][:, 0, :H]
    o_BSHL, lse_BSH = outs
    # Log-sum-exp combine of the S partials (log2 domain, as the kernel writes it).
    m_BH = jnp.max(lse_BSH, axis=1)
    m_BH = jnp.where(jnp.isfinite(m_BH), m_BH, 0.0)
    w_BSH = jnp.exp2(lse_BSH - m_BH[:, None])
    # Multiply + reduce rather than an einsum: one XLA fusion, exact f32, no GEMV launch.
    o_BHL = jnp.sum(w_BSH[..., None] * o_BSHL, axis=1) / jnp.maximum(jnp.sum(w_BSH, axis=1), 1e-30)[..., None]
    return o_BHL[:, :H].astype(q_latent_BHL.dtype)
