"""In-kernel reads of an int8/int4 expert's packed buffer (`ktjax.experts.packed.PackedLayout`), for the Pallas
(Triton) expert kernels: every address computed from the layout's static offsets, the uint8 buffer read as it
is, and tiles of a matrix's rows dequantized in registers in GGUF's order of float32 operations (as
`ktjax.experts.quant.dequantize_*`):
    int8: w = float(q) * float(f16 scale)                   (scale from its two bytes, bitcast)
    int4: w = float(q) * (d * float(sc)) - dmin * float(mn)  (d, dmin float32 from their four bytes)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ktjax.experts.quant import GROUP, SUPER
from ktjax.kernels.tiles import plgpu

RUN = 64  # int4 bytes come in runs of 64 values: value l in byte l's low nibble, 32 + l in its high nibble


@dataclasses.dataclass(frozen=True)
class Buf:
    """One expert's bytes: a flat uint8 ref (its own buffer), or row `row` (a traced int32) of a stacked
    [E, nbytes] ref. Indexed by byte offsets within the expert."""

    ref: object
    row: object = None

    def at(self, idx):
        return self.ref.at[idx] if self.row is None else self.ref.at[self.row, idx]

    def __getitem__(self, idx):
        return self.ref[idx] if self.row is None else self.ref[self.row, idx]


def buf_bytes(buf: Buf, idx, mask):
    return plgpu.load(buf.at(idx), mask=mask, other=0) if mask is not None else buf[idx]


def all_of(*masks):
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def f16_at(buf_ref, idx, mask):
    """float32 of the float16 whose two bytes (little-endian) start at buf[idx]."""
    lo = buf_bytes(buf_ref, idx, mask).astype(jnp.uint16)
    hi = buf_bytes(buf_ref, idx + 1, mask).astype(jnp.uint16)
    return lax.bitcast_convert_type(lo | (hi << 8), jnp.float16).astype(jnp.float32)


def f32_at(buf_ref, idx, mask):
    """The float32 whose four bytes (little-endian) start at buf[idx]."""
    bits = buf_bytes(buf_ref, idx, mask).astype(jnp.uint32)
    for i in range(1, 4):
        bits = bits | (buf_bytes(buf_ref, idx + i, mask).astype(jnp.uint32) << (8 * i))
    return lax.bitcast_convert_type(bits, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Matrix:
    """Where one quantized matrix lies in an expert's buffer (static): rows R, padded columns Kp, the byte
    offsets of its arrays."""

    fmt: str
    R: int
    Kp: int
    off: tuple  # (name, offset) pairs

    @property
    def G(self) -> int:
        return self.Kp // GROUP

    def at(self, name: str) -> int:
        return dict(self.off)[name]


def matrix(layout, name: str) -> Matrix:
    m = layout.matrices[name]
    offs = tuple((a, off) for (mn, a), (off, _, _) in layout.sections.items() if mn == name)
    return Matrix(layout.fmt, m.rows, m.padded_cols, offs)


def dequant_int8(buf_ref, m: Matrix, rows, k0, BK, row_ok, col_mask: bool):
    """float32 [BR, BK]: rows `rows` (int32 [BR]) of an int8 matrix, columns [k0, k0 + BK)."""
    BR = rows.shape[0]
    ng = BK // GROUP
    g = lax.div(k0, GROUP) + jnp.arange(ng, dtype=jnp.int32)  # [ng] global group index
    g_ok = (g < m.G)[None, :] if col_mask else None
    mask2 = all_of(None if row_ok is None else row_ok[:, None], g_ok)
    mask3 = None if mask2 is None else mask2[:, :, None]
    q_idx = m.at("q") + rows[:, None, None] * m.Kp + g[None, :, None] * GROUP + jnp.arange(GROUP, dtype=jnp.int32)[None, None, :]
    q = lax.bitcast_convert_type(buf_bytes(buf_ref, q_idx, mask3), jnp.int8).astype(jnp.float32)
    scale = f16_at(buf_ref, m.at("scale") + (rows[:, None] * m.G + g[None, :]) * 2, mask2)
    return (q * scale[:, :, None]).reshape(BR, BK)


def dequant_int4(buf_ref, m: Matrix, rows, k0, BK, row_ok, col_mask: bool, vector_scales: bool = False):
    """float32 ([BR, BK/2], [BR, BK/2]): the even groups (low nibbles) and odd groups (high nibbles) of rows
    `rows` of an int4 matrix, columns [k0, k0 + BK): column k0 + 64 r + j (+ 32) is [.., 32 r + j] of the
    low (high) half."""
    BR = rows.shape[0]
    nr = BK // RUN
    run = lax.div(k0, RUN) + jnp.arange(nr, dtype=jnp.int32)  # [nr] global run index
    r_ok = (run * 2 < m.G)[None, :] if col_mask else None
    mask2 = all_of(None if row_ok is None else row_ok[:, None], r_ok)
    mask3 = None if mask2 is None else mask2[:, :, None]
    b_idx = (m.at("q") + rows[:, None, None] * (m.Kp // 2) + run[None, :, None] * (RUN // 2)
             + jnp.arange(RUN // 2, dtype=jnp.int32)[None, None, :])
    b = buf_bytes(buf_ref, b_idx, mask3)  # uint8 [BR, nr, 32]
    if vector_scales and mask2 is None and nr % (SUPER // RUN) == 0:
        d, dmin, scales = int4_scales_vectors(buf_ref, m, rows, k0, nr)
    else:
        g_lo = (rows[:, None] * m.G + run[None, :] * 2)  # [BR, nr] flat index of the even group
        s_idx = rows[:, None] * (m.Kp // SUPER) + lax.div(run, SUPER // RUN)[None, :]  # super-block of both
        d = f32_at(buf_ref, m.at("d") + s_idx * 4, mask2)
        dmin = f32_at(buf_ref, m.at("dmin") + s_idx * 4, mask2)
        scales = [tuple(buf_bytes(buf_ref, m.at(a) + g_lo + half, mask2).astype(jnp.float32) for a in ("sc", "mn"))
                  for half in (0, 1)]
    out = []
    for half in (0, 1):
        sc, mn = scales[half]
        q = ((b & 15) if half == 0 else (b >> 4)).astype(jnp.float32)
        step, offset = d * sc, dmin * mn  # as GGUF: d * sc, dmin * mn in float32
        out.append((q * step[:, :, None] - offset[:, :, None]).reshape(BR, BK // 2))
    return out


def int4_scales_vectors(buf_ref, m: Matrix, rows, k0, nr):
    """d, dmin float32 [BR, nr] (each run's super-block's) and [(sc, mn) of the even groups, (sc, mn) of the odd
    ones], float32 [BR, nr], for a chunk of whole super-blocks without masks: each row's bytes of each array read
    as one contiguous run (which Triton can load as vectors) instead of one byte load per value, then taken
    apart in registers."""
    BR = rows.shape[0]
    per_sb = SUPER // RUN  # runs per super-block
    nsb = nr // per_sb
    sb0 = lax.div(k0, SUPER)

    def row_bytes(name, start, width):  # uint8 [BR, width]: `width` bytes of each row from `start` (per row)
        idx = m.at(name) + start + jnp.arange(width, dtype=jnp.int32)[None, :]
        return buf_bytes(buf_ref, idx, None)

    four = jnp.arange(4, dtype=jnp.uint32)

    def f32s(name):  # float32 [BR, nr]: the chunk's super-blocks' values, one per run
        raw = row_bytes(name, (rows[:, None] * (m.Kp // SUPER) + sb0) * 4, 4 * nsb).reshape(BR, nsb, 4)
        bits = jnp.sum(raw.astype(jnp.uint32) << (8 * four)[None, None, :], axis=2)  # little-endian, disjoint bytes
        v = lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.broadcast_to(v[:, :, None], (BR, nsb, per_sb)).reshape(BR, nr)

    pick = [(jnp.arange(2, dtype=jnp.int32) == half).astype(jnp.float32) for half in (0, 1)]

    def halves(name):  # float32 [BR, nr] each: the even groups' bytes, the odd groups'
        raw = row_bytes(name, rows[:, None] * m.G + lax.div(k0, RUN) * 2, 2 * nr).reshape(BR, nr, 2)
        raw = raw.astype(jnp.float32)
        return [jnp.sum(raw * pick[half][None, None, :], axis=2) for half in (0, 1)]

    sc, mn = halves("sc"), halves("mn")
    return f32s("d"), f32s("dmin"), [(sc[0], mn[0]), (sc[1], mn[1])]
