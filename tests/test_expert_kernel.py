"""The fused int8/int4 expert kernels (`ktjax.kernels.expert_ffn`) in the Pallas interpreter, against a
float64 numpy reference built from `quant`'s numpy dequantization and against the XLA path
(`ktjax.experts.device`), with random inputs, ragged shapes (D and F not whole groups / super-blocks / tiles),
one and several tokens, one and several experts per launch.

The buffers' alignment gaps are poisoned with 0xFF (a NaN as float16 or float32): a read outside the
arrays shows up as NaN; so does any element of h or of the output that the kernels forget to write (the
interpreter fills outputs with NaN, checked in test_kernels.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax import kernels
from ktjax.experts import device
from ktjax.experts.packed import PackedLayout
from ktjax.experts.weights import ExpertFormat, packed_expert
from ktjax.kernels.expert_ffn import MAX_TOKENS, Tiles, default_tiles, experts_pallas

SMALL = Tiles(BF=16, BK1=64, BR2=16, BK2=64)  # several loop steps and row tiles even on tiny shapes


def poisoned_buffer(layout: PackedLayout, rng) -> np.ndarray:
    F, D = layout.F, layout.D
    mats = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((F, D), (F, D), (D, F))]
    buf = np.array(layout.pack(*mats))
    end = 0
    for offset, dtype, shape in layout.sections.values():
        buf[end:offset] = 0xFF  # alignment gaps: never read
        end = offset + dtype.itemsize * int(np.prod(shape))
    return buf


def reference_np(x, bufs, layout, wt, acc):
    """acc + sum_e wt[:, e] * down(silu(gate x) * up x) in float64 from quant's numpy dequantization."""
    x = np.asarray(x, np.float64)
    y = np.asarray(acc, np.float64).copy()
    F = layout.F
    for e, buf in enumerate(bufs):
        gu, dn = layout.dequantize(buf)
        g, u = x @ gu[:F].T, x @ gu[F:].T
        y += ((g / (1 + np.exp(-g)) * u) @ dn.T) * np.asarray(wt, np.float64)[:, e:e + 1]
    return y


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any(), "NaN in the kernel's output (a read outside the arrays, or an unwritten element)"
    return np.abs(out - ref).max() / np.abs(ref).max()


CASES = [  # (fmt, F, D, C, K, tiles, stacked): F, D ragged against groups (32), super-blocks (256) and tiles
    ("int8", 40, 80, 1, 1, SMALL, False),   # one token; D=80 -> 96 padded, F=40 -> 64 padded; masks everywhere
    ("int8", 48, 160, 17, 2, None, True),   # 17 tokens -> 32; two experts of a stack of 3, by id; default tiles
    ("int4", 40, 300, 1, 2, SMALL, False),  # D=300 -> 512 (two super-blocks), F=40 -> 256; two buffers
    ("int4", 64, 256, 5, 1, None, True),    # whole super-blocks, default tiles (the DeepSeek case's masks: tokens only)
    ("int4", 40, 300, 3, 2, SMALL, True),   # 3 tokens -> 4, multiplied per token (no dot): the token mask
]


@pytest.mark.parametrize("fmt,F,D,C,K,tiles,stacked", CASES)
def test_kernel_matches_numpy_dequantization(fmt, F, D, C, K, tiles, stacked):
    rng = np.random.default_rng(hash((fmt, F, D, C, K)) % 2**32)
    layout = PackedLayout(fmt, F, D)
    x = rng.standard_normal((C, D)).astype(np.float32)
    wt = rng.uniform(0.1, 1.0, (C, K)).astype(np.float32)
    acc = rng.standard_normal((C, D)).astype(np.float32)
    if stacked:  # the stack holds one more expert than the call uses; ids in reverse order
        stack = [poisoned_buffer(layout, rng) for _ in range(K + 1)]
        ids = list(range(K, 0, -1))
        bufs = [stack[i] for i in ids]
        out = experts_pallas(jnp.asarray(x), jnp.asarray(np.stack(stack)), jnp.asarray(wt), jnp.asarray(acc),
                             layout=layout, ids_K=jnp.asarray(ids, jnp.int32), tiles=tiles, interpret=True)
    else:
        bufs = [poisoned_buffer(layout, rng) for _ in range(K)]
        out = experts_pallas(jnp.asarray(x), tuple(map(jnp.asarray, bufs)), jnp.asarray(wt), jnp.asarray(acc),
                             layout=layout, tiles=tiles, interpret=True)
    assert out.shape == (C, D) and out.dtype == jnp.float32
    assert rel_err(out, reference_np(x, bufs, layout, wt, acc)) < 2e-6


@pytest.mark.parametrize("C", [1, 2])
def test_int4_scales_read_as_contiguous_runs_give_the_same_outputs(C):
    """`Tiles.vector_scales`: each row's scale bytes of a chunk read as one run and taken apart in registers
    (whole super-blocks, no masks) compute exactly what the byte-by-byte reads compute, and match numpy."""
    rng = np.random.default_rng(21 + C)
    layout = PackedLayout("int4", 256, 512)  # gate_up rows of 2 super-blocks, down rows of 1: no masks
    bufs = [poisoned_buffer(layout, rng) for _ in range(2)]
    x = rng.standard_normal((C, 512)).astype(np.float32)
    wt = rng.uniform(0.1, 1.0, (C, 2)).astype(np.float32)
    acc = rng.standard_normal((C, 512)).astype(np.float32)
    args = (jnp.asarray(x), tuple(map(jnp.asarray, bufs)), jnp.asarray(wt), jnp.asarray(acc))
    outs = {}
    for vec in (False, True):
        tiles = Tiles(BF=16, BK1=256, BR2=32, BK2=256, vector_scales=vec)
        run = functools.partial(experts_pallas, layout=layout, tiles=tiles, interpret=True)
        outs[vec] = (np.asarray(run(*args)), str(jax.make_jaxpr(run)(*args)))
    assert outs[True][1] != outs[False][1]  # a different kernel was built
    np.testing.assert_array_equal(outs[True][0], outs[False][0])
    assert rel_err(outs[True][0], reference_np(x, bufs, layout, wt, acc)) < 2e-6


@pytest.mark.parametrize("fmt,stacked", [("int8", False), ("int4", True)])
def test_a_slot_no_token_chose_is_never_read(fmt, stacked):
    """A fused program pads its expert slots (id -1, weight 0 for every token): such a slot must cost no
    bandwidth, so the kernels never read it. Its buffer here is all 0xFF bytes (NaN scales), which would make
    the output NaN if read; the output equals the kernels' result without the slot. A slot that one token of
    two chose is still computed, for that token only."""
    rng = np.random.default_rng(11)
    layout = PackedLayout(fmt, 40, 300)
    C = 2
    x = rng.standard_normal((C, 300)).astype(np.float32)
    acc = rng.standard_normal((C, 300)).astype(np.float32)
    good = [poisoned_buffer(layout, rng) for _ in range(2)]
    unread = np.full(layout.nbytes, 0xFF, np.uint8)
    wt = np.array([[0.5, 0.0, 0.3], [0.0, 0.0, 0.7]], np.float32)  # slot 1: nobody; slot 0: token 0 only
    if stacked:
        ids = jnp.asarray([2, 1, 0], jnp.int32)  # slots: good[0], unread, good[1]
        out = experts_pallas(jnp.asarray(x), jnp.asarray(np.stack([good[1], unread, good[0]])), jnp.asarray(wt),
                             jnp.asarray(acc), layout=layout, ids_K=ids, tiles=SMALL, interpret=True)
    else:
        out = experts_pallas(jnp.asarray(x), tuple(map(jnp.asarray, (good[0], unread, good[1]))), jnp.asarray(wt),
                             jnp.asarray(acc), layout=layout, tiles=SMALL, interpret=True)
    assert rel_err(out, reference_np(x, good, layout, wt[:, [0, 2]], acc)) < 2e-6


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_a_slot_no_token_chose_adds_nothing_whatever_it_holds(fmt, impl):
    """A handoff program's slots the host fills no expert into (`handoff_step`) hold whatever their memory held:
    add_experts' decode branch, on either path, adds nothing from such a slot (id -1, all 0xFF: NaN scales)."""
    rng = np.random.default_rng(12)
    F, D, N = 40, 300, 1
    fmt_ = ExpertFormat(fmt, F, D)
    good = packed_expert(jnp.asarray(poisoned_buffer(fmt_.packed, rng)), fmt_)
    garbage = packed_expert(jnp.full(fmt_.packed.nbytes, 0xFF, jnp.uint8), fmt_)
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    idx, w = jnp.asarray([[4, 9]], jnp.int32), jnp.asarray([[0.6, 0.4]], jnp.float32)
    acc = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    want = device.add_experts(acc, h, w, idx, jnp.asarray([9], jnp.int32), (good,), capacity=N, impl=impl)
    got = device.add_experts(acc, h, w, idx, jnp.asarray([9, -1], jnp.int32), (good, garbage), capacity=N, impl=impl)
    assert rel_err(got, np.asarray(want, np.float64)) < 1e-6  # the kernels' sums may round apart by slot count


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_a_stack_of_slots_adds_each_chosen_expert_weighted_and_nothing_from_an_empty_slot(fmt, impl):
    """`add_slot_experts` (a handoff program's experts: one stack of slots, each slot's expert named by its id, -1
    for none) on either path against numpy's dequantization: each token through the experts it chose, weighted;
    a slot no token chose, all 0xFF (NaN scales), adds nothing."""
    rng = np.random.default_rng(13)
    F, D, N = 40, 300, 2
    fmt_ = ExpertFormat(fmt, F, D)
    five, three = (poisoned_buffer(fmt_.packed, rng) for _ in range(2))
    empty = np.full(fmt_.packed.nbytes, 0xFF, np.uint8)
    stack = packed_expert(jnp.asarray(np.stack([five, empty, three])), fmt_)  # slots: expert 5, none, expert 3
    h = rng.standard_normal((N, D)).astype(np.float32)
    idx, w = np.array([[3, 5], [5, 9]], np.int32), np.array([[0.6, 0.4], [0.7, 0.3]], np.float32)
    acc = rng.standard_normal((N, D)).astype(np.float32)
    got = device.add_slot_experts(jnp.asarray(acc), jnp.asarray(h), jnp.asarray(w), jnp.asarray(idx),
                                  jnp.asarray([5, -1, 3], jnp.int32), stack, impl=impl)
    wt = np.array([[0.4, 0.6], [0.7, 0.0]], np.float32)  # of experts 5 and 3 (token 1 chose 9: elsewhere)
    assert rel_err(got, reference_np(h, [five, three], fmt_.packed, wt, acc)) < 2e-6


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_add_experts_kernel_path_matches_the_xla_path(fmt):
    """The wiring: `experts_segment` (add_experts' decode branch, compiled, acc donated) and expert_ffn with
    impl="interpret" against impl="reference", bf16 activations (weights rounded to bf16 before the dots,
    outputs rounded per matmul, as the model computes), routing to some experts of the chunk and not others;
    and (int8) the gradients training takes through add_experts."""
    rng = np.random.default_rng(7 if fmt == "int8" else 8)
    F, D, N = 40, 300, 3
    fmt_ = ExpertFormat(fmt, F, D)
    experts = tuple(packed_expert(jnp.asarray(poisoned_buffer(fmt_.packed, rng)), fmt_) for _ in range(2))
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    idx = jnp.asarray([[3, 5], [5, 9], [1, 2]], jnp.int32)  # expert 3 only token 0; 5 tokens 0, 1; token 2 none
    w = jnp.asarray(rng.uniform(0.1, 1.0, (N, 2)), jnp.float32)
    ids = jnp.asarray([5, 3], jnp.int32)
    acc = np.asarray(rng.standard_normal((N, D)), np.float32)

    ref = device.experts_segment(jnp.asarray(acc), h, w, idx, ids, experts, capacity=N, impl="reference")
    got = device.experts_segment(jnp.asarray(acc), h, w, idx, ids, experts, capacity=N, impl="interpret")
    assert rel_err(got, np.asarray(ref, np.float64)) < 1e-2  # bf16 outputs; f32 sums in another order
    np.testing.assert_array_equal(np.asarray(got)[2], acc[2])  # routed to none of the chunk
    # expert_ffn alone (K=1, no weights)
    y_ref = device.expert_ffn(h, experts[0], impl="reference")
    y = device.expert_ffn(h, experts[0], impl="interpret")
    assert rel_err(y, np.asarray(y_ref, np.float64)) < 1e-2
    if fmt == "int4":
        return

    # Gradients: the kernel path's backward is the reference's.
    def loss(h, w, impl):
        return (device.add_experts(None, h, w, idx, ids, experts, capacity=N, impl=impl) ** 2).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_ref, g = grad(h, w, "reference"), grad(h, w, "interpret")
    for a, b in zip(g, g_ref):
        assert rel_err(a, np.asarray(b, np.float64)) < 2e-2


def test_paths():
    x1 = jnp.zeros((1, 64), jnp.bfloat16)
    many = jnp.zeros((MAX_TOKENS + 1, 64), jnp.bfloat16)
    on_gpu = jax.default_backend() == "gpu"
    assert kernels.expert_path(x1, "int8", 32, 64, impl="auto") == "reference"  # int8: XLA (and no GPU here)
    assert kernels.expert_path(x1, "int4", 32, 64, impl="auto") == ("pallas" if on_gpu else "reference")
    assert kernels.expert_path(jnp.zeros((3, 64), jnp.bfloat16), "int4", 32, 64, impl="auto") == "reference"
    assert kernels.expert_path(x1, "int4", 32, 64, impl="interpret") == "interpret"
    assert kernels.expert_path(x1, "int4", 32, 64, impl="pallas") == "pallas"
    assert kernels.expert_path(x1, "int4", 32, 64, impl="reference") == "reference"
    assert kernels.expert_path(many, "int8", 32, 64, impl="pallas") == "reference"  # prefill: XLA's GEMM
    assert kernels.expert_path(x1, "fp8", 32, 64, impl="pallas") == "reference"
    assert kernels.expert_path(x1, "bf16", 32, 64, impl="pallas") == "reference"
    assert kernels.expert_path(x1, "int8", 32, 128, impl="pallas") == "reference"  # x's D is not the experts'


def test_default_tiles_cover_deepseek_sizes_without_column_masks():
    """DeepSeek-V3 (F=2048, D=7168): chunks divide D and F, programs fill ~132 SMs, tiles are powers of two."""
    for fmt in ("int8", "int4"):
        for K in (1, 2, 4, 8):
            for C in (1, 8, 16, 32, 64):
                t = default_tiles(fmt, K, C, 2048, 7168)
                t.check(fmt)
                assert 7168 % t.BK1 == 0 and 2048 % t.BK2 == 0 and 2048 % t.BF == 0
                assert 2048 // t.BF >= 128 and -(-7168 // t.BR2) >= 132
