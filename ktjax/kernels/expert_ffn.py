"""Pallas (Triton) kernels for int8/int4 routed experts at decode sizes: the weights are dequantized in
registers, never written to HBM.

An expert is one packed byte buffer (`ktjax.experts.packed.PackedLayout`): gate_up [2F, D] and down [D, F],
each quantized along its input dimension (`ktjax.experts.quant`: int8 = Q8_0-like, int4 = Q4_K-like). The
kernels read the buffer as it is (uint8, flat) and compute every address themselves, so nothing is sliced,
bitcast or copied in XLA before them; a layer's chunk of K experts is K buffers, passed as K operands
(compiled per K), or one stacked [E, nbytes] array with K ids read in the kernels.

    y = acc + sum_e wt[:, e] * down_e(silu(gate_e x) * up_e x)          (x [C, D], C <= MAX_TOKENS)

Two launches, whatever K, each over a grid (row tile, slot): every slot's rows run in parallel, and a slot no
token chose (a fused program's padding, or an expert only other rows chose) returns at once, never read.

1. `_gate_up_kernel`: program (p, e) owns rows [p*BF, (p+1)*BF) of gate and of up (F + rows) of slot e's
   expert. It loops over D in chunks of BK1: loads x[:, chunk] (from L1/L2), the gate and up bytes of the
   chunk (contiguous runs of 32 bytes per group), their scales, dequantizes in float32 in GGUF's order of
   operations, rounds to x's dtype and accumulates x @ w.T in float32: up to FEW_TOKENS tokens as a
   multiply and sum per token, beyond as Triton's dot with the tokens padded to >= 16 (its weight loads are
   then 16-byte cp.async pipelined over num_stages steps). After the loop it rounds g and u to x's dtype (as
   the reference's matmuls do), applies silu(g) * u in float32 and writes h [K, Cp, Hw] in x's dtype.
2. `_down_kernel`: program (p, e) owns rows [p*BR2, ...) of slot e's down: the same loop over F (chunks of
   BK2) against h, written as y [K, C, D] in x's dtype (the reference's rounding; zeros for a slot nobody
   chose). XLA then adds acc + y_0 * wt_0 + y_1 * wt_1 + ... in slot order, the reference's order.

Dequantization, and every read of a buffer: `ktjax.kernels.packed_reads`. int4's low nibbles form the even
groups of a chunk and its high nibbles the odd ones, so the kernels multiply them with the matching halves of x
instead of interleaving nibbles in registers.

Ragged shapes: rows past R and columns past the padded width are masked (loaded as zeros, so w = 0 there);
x's columns past D are masked, so the layout's zero padding never contributes. For DeepSeek-V3 sizes
(F=2048, D=7168) the default tiles divide everything and no mask is compiled except the token one.

Status: checked in the Pallas interpreter (tests/test_expert_kernel.py), compiled offline for sm_90a
(scripts/expert_kernel_ptx.py) and measured on the H200 (scripts/bench_expert_kernel.py, benchmarks/kernels.md):
at 1-2 tokens about as fast as XLA's multiply-reduce per chosen expert (~12-14% of HBM bandwidth either way,
whatever the tiles: the dequantization's instructions are the likely limit, not the loads), faster in the model
because padding slots are skipped; "auto" takes them for int4 at 1-2 tokens (`ktjax.kernels.EXPERT_KERNEL_MAX_TOKENS`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ktjax.experts.quant import GROUP
from ktjax.kernels.packed_reads import RUN, Buf, Matrix, all_of, dequant_int4, dequant_int8, matrix
from ktjax.kernels.tiles import MIN_TILE, CompilerParams, dot_t, is_pow2, plgpu

MAX_TOKENS = 64  # the kernels are for decode: more tokens per expert take the XLA path (a real GEMM)
# Up to this many tokens a weight tile is multiplied and summed per token instead of fed to a dot padded to 16
# tokens. On the H200 the two measured within 10% of each other at their best tiles (8 experts, 1 token: int4
# 495 against 461 us, int8 392 against 414; benchmarks/kernels.md runs 2-3), the per-token form with fewer
# registers (64-128 against 128-251 per thread, compiled offline) and no loads for 15 padding tokens.
FEW_TOKENS = 4
FORMATS = ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch parameters. BF: rows of gate/up per program (kernel 1), BK1: D per loop
    step; BR2: rows of down per program (kernel 2), BK2: F per loop step. All powers of two, >= 16;
    BK1/BK2 >= 64 for int4 (whole runs)."""

    BF: int = 16
    BK1: int = 256
    BR2: int = 32
    BK2: int = 256
    num_warps: int = 4
    num_stages: int = 3
    # int4: read each row's scale bytes of a chunk as one contiguous run instead of a byte load per value
    # (`int4_scales_vectors`); unmeasured on the GPU, so off by default.
    vector_scales: bool = False

    def check(self, fmt: str):
        for name in ("BF", "BK1", "BR2", "BK2"):
            v = getattr(self, name)
            if not (is_pow2(v) and v >= MIN_TILE):
                raise ValueError(f"Tiles.{name}={v}: must be a power of two >= {MIN_TILE}")
        unit = RUN if fmt == "int4" else GROUP
        if self.BK1 < unit or self.BK2 < unit:
            raise ValueError(f"Tiles.BK1/BK2 must be >= {unit} for {fmt}")


def token_pad(C: int) -> int:
    """Tokens as the kernels compute them: a power of two, up to FEW_TOKENS as they are (each weight tile is
    multiplied and summed per token), beyond it >= 16 (Triton's dot needs M >= 16)."""
    return pl.next_power_of_2(C) if C <= FEW_TOKENS else max(MIN_TILE, pl.next_power_of_2(C))


def default_tiles(fmt: str, K: int, C: int, F: int, D: int) -> Tiles:
    """Tiles for K experts and C tokens (the same for every K: each program computes one expert's row tile).

    Up to FEW_TOKENS tokens (no dot): BK 1024 weights per loop step for int4, 512 for int8, measured best on the
    H200 among 11 tilings (benchmarks/kernels.md, expert kernel run 3: 8 experts, 1 and 2 tokens).
    Beyond (Triton's dot): 8K weights per loop step (8 KB of int8 / 4 KB of int4 bytes, pipelined as 16-byte
    cp.async over num_stages steps); compiled offline with Triton 3.9 for sm_90a, DeepSeek sizes, bf16, 4 warps,
    that is 140-170 registers and no spills, where 16K weights per step spill. The x/h tile Cp x BK stays within
    16K elements."""
    Cp = token_pad(C)
    unit = RUN if fmt == "int4" else GROUP
    BF, BR2 = 16, 32

    def chunk(rows_per_expert, cols):
        if C <= FEW_TOKENS:
            bk = 1024 if fmt == "int4" else 512
        else:
            bk = min(8192 // rows_per_expert, 16384 // Cp, 1024)
        bk = min(bk, pl.next_power_of_2(-(-cols // unit) * unit))  # no wider than the (padded) row
        bk = 1 << max(bk, 1).bit_length() - 1
        return max(bk, unit, MIN_TILE)

    return Tiles(BF=BF, BK1=chunk(2 * BF, D), BR2=BR2, BK2=chunk(BR2, F), num_warps=4, num_stages=3)


def supported(x_CD, fmt_name: str, F: int, D: int) -> bool:
    """Whether the kernels cover this call: a Triton backend in this jax, int8/int4, 1..MAX_TOKENS tokens,
    x in a float dtype, D matching the experts."""
    return (plgpu is not None and fmt_name in FORMATS and x_CD.ndim == 2 and 1 <= x_CD.shape[0] <= MAX_TOKENS
            and x_CD.shape[1] == D and x_CD.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and F >= 1)


def _load(ref, idx, mask):
    return plgpu.load(ref.at[idx], mask=mask, other=0) if mask is not None else ref[idx]


def _x_tiles(x_ref, fmt, C, Cp, D, k0, BK, col_mask: bool):
    """x's tokens (padded to Cp with zeros) at columns [k0, k0 + BK) of its D (zeros past D), arranged as
    the weights' tiles are: int8 one [Cp, BK] tile, int4 (low-half, high-half) [Cp, BK/2] tiles."""
    c = jnp.arange(Cp, dtype=jnp.int32)
    c_ok = (c < C) if Cp != C else None
    if fmt == "int8":
        cols = k0 + jnp.arange(BK, dtype=jnp.int32)
        mask = all_of(None if c_ok is None else c_ok[:, None], (cols < D)[None, :] if col_mask else None)
        idx = c[:, None] * D + cols[None, :]
        return [_load(x_ref, idx, mask)]
    nr = BK // RUN
    out = []
    for half in (0, 1):
        cols = (k0 + jnp.arange(nr, dtype=jnp.int32)[:, None] * RUN + half * GROUP
                + jnp.arange(GROUP, dtype=jnp.int32)[None, :])  # [nr, 32]
        mask = all_of(None if c_ok is None else c_ok[:, None, None], (cols < D)[None] if col_mask else None)
        idx = c[:, None, None] * D + cols[None]
        out.append(_load(x_ref, idx, mask).reshape(Cp, BK // 2))
    return out


def _dot_chunk(x_tiles, buf_ref, m: Matrix, rows, k0, BK, row_ok, col_mask, dt, vector_scales=False):
    """sum over the chunk of x @ w.T, float32 [Cp, BR], with w rounded to dt first (as the reference does)."""
    if m.fmt == "int8":
        ws = [dequant_int8(buf_ref, m, rows, k0, BK, row_ok, col_mask)]
    else:
        ws = dequant_int4(buf_ref, m, rows, k0, BK, row_ok, col_mask, vector_scales)
    acc = None
    for xt, w in zip(x_tiles, ws):
        w = w.astype(dt)
        if xt.shape[0] <= FEW_TOKENS:  # [Cp, 1, BK] * [1, BR, BK] summed over BK, in float32 as the dot accumulates
            y = jnp.sum(xt.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None, :, :], axis=2)
        else:
            y = dot_t(xt, w)
        acc = y if acc is None else acc + y
    return acc


# ---- the program's expert ----------------------------------------------------------------------------

def _program_expert(refs, K, stacked, run):
    """Run `run(buf)` for this program's expert (grid axis 1: the chunk's slot e); returns the refs after the
    experts'. Stacked: the expert is row ids[e] of the stack. Separate buffers: one branch per slot (a program
    can only name its operand statically), each taken by the programs of its slot only. The slot is the slower
    grid axis, so the programs running at once mostly share one branch's code."""
    e = pl.program_id(1)
    if stacked:
        ids_ref, stack_ref = refs[:2]
        run(Buf(stack_ref, ids_ref[e]))
        return refs[2:]
    for k in range(K):
        pl.when(e == k)(functools.partial(run, Buf(refs[k])))
    return refs[K:]


def _chosen(wt_ref, e, C, Cp, K):
    """Whether any token has a nonzero weight for slot e: a slot no token chose (the chunk's padding, or an
    expert only other rows of a batch chose) is never read, so padding a program's slots costs no bandwidth."""
    c = jnp.arange(Cp, dtype=jnp.int32)
    wt = plgpu.load(wt_ref.at[c * K + e], mask=c < C, other=0)
    return jnp.max(jnp.abs(wt)) > 0


# ---- kernel 1: h = silu(gate x) * up x ---------------------------------------------------------------

def _gate_up_kernel(x_ref, wt_ref, *refs, K, C, Cp, D, F, Hw, gu: Matrix, BF, BK, dt, stacked, vector_scales):
    h_ref = refs[-1]
    p, e = pl.program_id(0), pl.program_id(1)
    f = p * BF + jnp.arange(BF, dtype=jnp.int32)  # rows of gate (up: F + f)
    row_ok = (f < F) if Hw != F or F % BF else None
    n_k = pl.cdiv(gu.Kp, BK)
    col_mask = gu.Kp % BK != 0 or D % BK != 0
    idx = e * Cp * Hw + jnp.arange(Cp, dtype=jnp.int32)[:, None] * Hw + f[None, :]
    zeros = jnp.zeros((Cp, BF), jnp.float32)
    chosen = _chosen(wt_ref, e, C, Cp, K)

    def run(buf):
        @pl.when(chosen)
        def _():
            def body(i, carry):
                g_acc, u_acc = carry
                k0 = i * BK
                xt = _x_tiles(x_ref, gu.fmt, C, Cp, D, k0, BK, col_mask)  # small, from L1/L2
                return (g_acc + _dot_chunk(xt, buf, gu, f, k0, BK, row_ok, col_mask, dt, vector_scales),
                        u_acc + _dot_chunk(xt, buf, gu, F + f, k0, BK, row_ok, col_mask, dt, vector_scales))

            g_acc, u_acc = lax.fori_loop(0, n_k, body, (zeros, zeros))
            g = g_acc.astype(dt).astype(jnp.float32)  # the reference's matmul rounds to x's dtype
            u = u_acc.astype(dt).astype(jnp.float32)
            h = g * jax.nn.sigmoid(g) * u  # = jax.nn.silu(g) * u (padding rows: 0)
            h_ref[idx] = h.astype(h_ref.dtype)  # a slot no token chose leaves h unwritten: kernel 2 skips it too

    _program_expert(refs[:-1], K, stacked, run)


# ---- kernel 2: y_e = down_e(h_e) ---------------------------------------------------------------------

def _down_kernel(h_ref, wt_ref, *refs, K, C, Cp, D, F, Hw, dn: Matrix, BR, BK, dt, stacked, vector_scales):
    y_ref = refs[-1]
    p, e = pl.program_id(0), pl.program_id(1)
    r = p * BR + jnp.arange(BR, dtype=jnp.int32)  # rows of down = columns of y
    row_ok = (r < D) if D % BR else None
    n_k = pl.cdiv(dn.Kp, BK)
    col_mask = dn.Kp % BK != 0  # h is written zero-padded up to Hw >= n_k * BK: its loads need no mask
    c = jnp.arange(Cp, dtype=jnp.int32)
    mask = all_of((c < C)[:, None], None if row_ok is None else row_ok[None, :])
    idx = (e * C + c[:, None]) * D + r[None, :]
    chosen = _chosen(wt_ref, e, C, Cp, K)

    def run(buf):
        @pl.when(chosen)
        def _():
            def body(i, acc):
                k0 = i * BK
                if dn.fmt == "int8":
                    ht = [h_ref[e * Cp * Hw + c[:, None] * Hw + k0 + jnp.arange(BK, dtype=jnp.int32)[None, :]]]
                else:
                    base = (e * Cp * Hw + c[:, None, None] * Hw + k0
                            + jnp.arange(BK // RUN, dtype=jnp.int32)[None, :, None] * RUN
                            + jnp.arange(GROUP, dtype=jnp.int32)[None, None, :])
                    ht = [h_ref[base + half * GROUP].reshape(Cp, BK // 2) for half in (0, 1)]
                return acc + _dot_chunk(ht, buf, dn, r, k0, BK, row_ok, col_mask, dt, vector_scales)

            y = lax.fori_loop(0, n_k, body, jnp.zeros((Cp, BR), jnp.float32))
            plgpu.store(y_ref.at[idx], y.astype(y_ref.dtype), mask=mask)  # rounded, as the reference's matmul

    @pl.when(jnp.logical_not(chosen))
    def _():  # zeros, not garbage: the caller weights every slot's y (0 * NaN would be NaN)
        plgpu.store(y_ref.at[idx], jnp.zeros((Cp, BR), y_ref.dtype), mask=mask)

    _program_expert(refs[:-1], K, stacked, run)


# ---- entry point -------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("layout", "tiles", "interpret"))
def experts_pallas(x_CD: jax.Array, bufs, wt_CK: jax.Array, acc_CD: jax.Array, *, layout, ids_K: jax.Array | None = None,
                   tiles: Tiles | None = None, interpret: bool = False) -> jax.Array:
    """acc + sum_e wt[:, e] * expert_e(x), float32 [C, D], for K int8/int4 experts stored as `layout` (a
    `PackedLayout`) buffers, each expert's output rounded to x's dtype before its weight (as
    `ktjax.experts.device.add_experts` computes it). One launch of each kernel for all K experts.

    bufs: a tuple of K flat uint8 buffers (K = len(bufs)), or one stacked uint8 [E, nbytes] array with
    `ids_K` (int32 [K]) naming the K experts of the stack to compute (read in the kernels: nothing is
    sliced out of the stack in XLA)."""
    fmt, F, D = layout.fmt, layout.F, layout.D
    stacked = ids_K is not None
    if stacked:
        if not (hasattr(bufs, "ndim") and bufs.ndim == 2 and bufs.shape[1] == layout.nbytes and ids_K.ndim == 1):
            raise ValueError(f"experts_pallas: a stack must be uint8 [E, {layout.nbytes}] with ids [K]")
        K, operands = ids_K.shape[0], (ids_K.astype(jnp.int32), bufs)
    else:
        bufs = tuple(bufs)
        if any(b.shape != (layout.nbytes,) for b in bufs):
            raise ValueError(f"experts_pallas: each buffer must be uint8 [{layout.nbytes}]")
        K, operands = len(bufs), bufs
    C = x_CD.shape[0]
    if fmt not in FORMATS:
        raise ValueError(f"experts_pallas: format {fmt!r} is not int8/int4")
    if x_CD.shape != (C, D) or wt_CK.shape != (C, K) or acc_CD.shape != (C, D):
        raise ValueError(f"experts_pallas: shapes x {x_CD.shape}, wt {wt_CK.shape}, acc {acc_CD.shape} for D={D}, K={K}")
    tiles = tiles or default_tiles(fmt, K, C, F, D)
    tiles.check(fmt)
    dt = x_CD.dtype
    Cp = token_pad(C)
    gu, dn = matrix(layout, "gate_up"), matrix(layout, "down")
    BF, BK1, BR2, BK2 = tiles.BF, tiles.BK1, tiles.BR2, tiles.BK2
    # h's width: every column kernel 2 reads (whole BK2 chunks of down's padded F), in whole BF row tiles.
    Hw = pl.cdiv(pl.cdiv(dn.Kp, BK2) * BK2, BF) * BF
    params = CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    common = dict(K=K, C=C, Cp=Cp, D=D, F=F, Hw=Hw, dt=dt, stacked=stacked, vector_scales=tiles.vector_scales)

    wt = wt_CK.astype(jnp.float32).reshape(-1)
    # Grid (row tile, slot): every slot's rows in parallel, enough programs for every SM to keep loads in
    # flight; a slot no token chose returns at once.
    k1 = functools.partial(_gate_up_kernel, gu=gu, BF=BF, BK=BK1, **common)
    h = pl.pallas_call(
        k1, grid=(Hw // BF, K), out_shape=jax.ShapeDtypeStruct((K * Cp * Hw,), dt),
        compiler_params=params, interpret=interpret, name="expert_gate_up",
    )(x_CD.reshape(-1), wt, *operands)

    k2 = functools.partial(_down_kernel, dn=dn, BR=BR2, BK=BK2, **common)
    y = pl.pallas_call(
        k2, grid=(pl.cdiv(D, BR2), K), out_shape=jax.ShapeDtypeStruct((K * C * D,), dt),
        compiler_params=params, interpret=interpret, name="expert_down",
    )(h, wt, *operands)
    # Each expert's output (rounded to x's dtype, as the reference's matmul) weighted and added in slot order,
    # the reference's order: one small elementwise fusion over [K, C, D].
    y_KCD = y.reshape(K, C, D).astype(jnp.float32)
    out = acc_CD.astype(jnp.float32)
    for e in range(K):
        out = out + y_KCD[e] * wt_CK[:, e:e + 1].astype(jnp.float32)
    return out


__all__ = ["experts_pallas", "supported", "default_tiles", "token_pad", "Tiles", "MAX_TOKENS", "FORMATS"]
