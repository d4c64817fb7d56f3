"""int8/int4 expert formats: quantization against a plain numpy reference written from GGUF's
definitions (Q8_0, Q4_K), the packed expert buffer, and the host-CPU kernels against float math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.experts import quant
from ktjax.experts.host import HostExperts, assignments
from ktjax.experts.packed import PackedLayout


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("cols", [32, 100, 300])
def test_int8_is_q8_0_blocks_with_ragged_rows_padded(cols):
    w = np.random.default_rng(cols).standard_normal((5, cols)).astype(np.float32)
    a = quant.quantize_int8(w)
    assert a["q"].shape == (5, -(-cols // 32) * 32) and a["scale"].shape == (5, -(-cols // 32))
    # Q8_0 by its definition: each block of 32 has d = amax / 127 (stored as float16), q = round(x / d).
    for r in range(5):
        for g in range(-(-cols // 32)):
            block = w[r, 32 * g:32 * g + 32]
            d = np.float16(np.abs(block).max() / 127)
            assert a["scale"][r, g] == d.view(np.uint16)
            q = np.clip(np.rint(block / np.float32(d)), -127, 127)
            np.testing.assert_array_equal(a["q"][r, 32 * g:32 * g + len(block)], q)
            np.testing.assert_array_equal(a["q"][r, 32 * g + len(block):32 * g + 32], 0)  # padding
    back = quant.dequantize_int8(a, cols)
    assert back.shape == w.shape
    assert rel(back, w) < 1 / 127  # half a step of the largest block


@pytest.mark.parametrize("cols", [256, 300, 600])
def test_int4_is_q4_k_blocks_with_ragged_rows_padded(cols):
    w = np.random.default_rng(cols).standard_normal((3, cols)).astype(np.float32) + 0.3
    a = quant.quantize_int4(w)
    C = -(-cols // 256) * 256
    assert a["q"].shape == (3, C // 2) and a["sc"].shape == (3, C // 32) and a["d"].shape == (3, C // 256)
    # Q4_K's nibble order: in each 32-byte run, low nibbles are values 0..31, high nibbles 32..63.
    q = np.zeros((3, C), np.uint8)
    for r in range(3):
        for j in range(C // 64):
            run = a["q"][r, 32 * j:32 * j + 32]
            q[r, 64 * j:64 * j + 32], q[r, 64 * j + 32:64 * j + 64] = run & 15, run >> 4
    np.testing.assert_array_equal(quant.unpack_nibbles(a["q"]), q)
    # Value = d * sc * q - dmin * mn, in float32 with GGUF's order of operations.
    step = np.repeat(a["d"], 8, axis=1) * a["sc"].astype(np.float32)
    offset = np.repeat(a["dmin"], 8, axis=1) * a["mn"].astype(np.float32)
    ref = (q.reshape(3, -1, 32).astype(np.float32) * step[..., None] - offset[..., None]).reshape(3, C)
    np.testing.assert_array_equal(quant.dequantize_int4(a, cols), ref[:, :cols])
    step_size = (w.max() - min(w.min(), 0)) / 15
    assert np.abs(ref[:, :cols] - w).max() < step_size  # within a step of the coarsest group


def float16_tie_maxima() -> list[np.float32]:
    """Group maxima whose scale max / 127 rounds to a different float16 when divided than when multiplied by
    the float32 reciprocal (what the quantizers do): near the midpoints between float16 values."""
    found = []
    halves = np.arange(0x3000, 0x3800, dtype=np.uint16).view(np.float16).astype(np.float64)
    for mid in (halves[:-1] + halves[1:]) / 2:
        x = np.float32(mid * 127)
        for _ in range(3):
            if (x * quant.RECIP_127).astype(np.float16) != (x / np.float32(127)).astype(np.float16):
                found.append(x)
            x = np.nextafter(x, np.float32(np.inf))
    assert found
    return found


def host_quantizer_cases():
    rng = np.random.default_rng(7)
    ties = float16_tie_maxima()
    at_ties = (rng.standard_normal((1, 32 * len(ties))) * 0.01).astype(np.float32)
    at_ties[0, ::32] = ties
    zeros_inside = rng.standard_normal((6, 512)).astype(np.float32)
    zeros_inside[2], zeros_inside[3, :100] = 0, 0  # a zero row; a row whose first groups are zero
    return {"ragged": rng.standard_normal((64, 300)).astype(np.float32),
            "shifted": (rng.standard_normal((33, 600)) + 0.3).astype(np.float32),
            "all-zero": np.zeros((4, 256), np.float32),
            "all-positive": np.abs(rng.standard_normal((8, 512))).astype(np.float32),
            "tiny": (rng.standard_normal((16, 1000)) * 1e-6).astype(np.float32),  # float16 scales go subnormal
            "huge": (rng.standard_normal((4, 96)) * 1e5).astype(np.float32),  # int8 scales overflow float16
            "zeros-inside": zeros_inside, "float16 ties": at_ties}


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_the_host_quantizer_gives_numpys_arrays_bit_for_bit(fmt):
    """`quant_host.quantize` (numba, what loading and `ktjax quantize` run without a GPU) against the
    numpy quantizer above, on rows that reach float16's subnormals and infinity, zero rows and groups."""
    from ktjax.experts import quant_host
    for name, w in host_quantizer_cases().items():
        want = quant.quantize_int8(w) if fmt == "int8" else quant.quantize_int4(w)
        got = quant_host.quantize(w, fmt)
        assert set(got) == set(want), name
        for a in want:
            assert got[a].dtype == want[a].dtype and got[a].shape == want[a].shape, (name, a)
            np.testing.assert_array_equal(got[a].view(np.uint8), want[a].view(np.uint8), err_msg=f"{name}: {a}")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float32"])
def test_a_float_or_fp8_expert_stacks_gate_up_and_down_transposed_as_numpy_does(dtype):
    """The host path's stacking (a tiled transpose in numba) against np.stack, on sizes that are not whole tiles."""
    import ml_dtypes
    from ktjax.experts.weights import _stacked
    rng = np.random.default_rng(5)
    dt = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    g, u, d = (rng.integers(0, 120, s).astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(dt)
               for s in ((40, 300), (40, 300), (300, 40)))
    got, want = _stacked(g, u, d), np.stack([g, u, d.T])
    assert got.dtype == want.dtype and got.shape == want.shape == (3, 40, 300)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_an_expert_buffer_holds_both_matrices_and_the_device_reads_them_back():
    rng = np.random.default_rng(0)
    for fmt in quant.FORMATS:
        layout = PackedLayout(fmt, 40, 72)
        gate, up, down = rng.standard_normal((40, 72)), rng.standard_normal((40, 72)), rng.standard_normal((72, 40))
        buf = layout.pack(gate, up, down)
        assert buf.shape == (layout.nbytes,) and buf.dtype == np.uint8
        gu, dn = layout.dequantize(buf)
        np.testing.assert_array_equal(gu, quant.dequantize(quant.quantize(np.concatenate([gate, up]), fmt), fmt, 72))
        np.testing.assert_array_equal(dn, quant.dequantize(quant.quantize(down, fmt), fmt, 40))
        on_device = jax.jit(lambda b: (layout.device_matrix(b, "gate_up", jnp.float32),
                                       layout.device_matrix(b, "down", jnp.float32)))(jnp.asarray(buf))
        # The device may fuse d*sc*q - dmin*mn into one multiply-add: one rounding instead of two.
        np.testing.assert_allclose(np.asarray(on_device[0]), gu, rtol=0, atol=2e-7 * np.abs(gu).max())
        np.testing.assert_allclose(np.asarray(on_device[1]), dn, rtol=0, atol=2e-7 * np.abs(dn).max())


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("form", ["inline", "grouped", "split"])
def test_the_device_multiplies_few_tokens_by_the_quantized_bytes_in_place(fmt, form):
    """`device_matvec` (the decode-sized path: no dequantized copy) equals x times the numpy-dequantized
    matrices, ragged columns (300: padded to whole blocks) included."""
    rng = np.random.default_rng(3)
    F, D, N = 40, 300, 3
    layout = PackedLayout(fmt, F, D)
    buf = layout.pack(rng.standard_normal((F, D)), rng.standard_normal((F, D)), rng.standard_normal((D, F)))
    gu, dn = layout.dequantize(buf)
    x, h = rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((N, F)).astype(np.float32)
    y, z = jax.jit(lambda b, x, h: (layout.device_matvec(b, "gate_up", x, form=form),
                                    layout.device_matvec(b, "down", h, form=form)))(jnp.asarray(buf), x, h)
    assert y.shape == (N, 2 * F) and z.shape == (N, D)
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ gu.T, rtol=0, atol=1e-5 * np.abs(x @ gu.T).max())
    np.testing.assert_allclose(np.asarray(z), h.astype(np.float64) @ dn.T, rtol=0, atol=1e-5 * np.abs(h @ dn.T).max())


def routed_experts_problem(fmt, F, D):
    """Six packed experts, five tokens routed to three each, one expert left to another path."""
    rng = np.random.default_rng(F + D)
    layout = PackedLayout(fmt, F, D)
    E, N, K = 6, 5, 3
    bufs = [layout.pack(*(0.1 * rng.standard_normal(s) for s in ((F, D), (F, D), (D, F)))) for _ in range(E)]
    x = rng.standard_normal((N, D)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N)])
    weights = rng.random((N, K)).astype(np.float32)
    chosen = np.unique(idx)[1:]  # one expert left to another path: its tokens get nothing from here
    return layout, bufs, x, idx, weights, chosen


def routed_sum_reference(layout, bufs, x, idx, weights, chosen, activations=lambda v: v):
    """float64 numpy: sum over chosen experts of weight * down(silu(gate(a(x))) * up(a(x))), each
    matrix multiplying activations(its input)."""
    F = layout.F
    ref = np.zeros(x.shape, np.float64)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if idx[n, j] in chosen:
                gu, dn = (m.astype(np.float64) for m in layout.dequantize(bufs[idx[n, j]]))
                g, u = gu[:F] @ activations(x[n]), gu[F:] @ activations(x[n])
                ref[n] += weights[n, j] * (dn @ activations((g / (1 + np.exp(-g)) * u).astype(np.float32)))
    return ref


def int8_per_group(v):
    """The values int8 activations stand for: per group of 32, scale max|v| / 127, round(v / scale)."""
    n = v.shape[-1]
    g = np.pad(v.astype(np.float32), (0, -n % 32)).reshape(-1, 32)
    scale = np.abs(g).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    return (np.rint(g * inv) * scale).reshape(-1)[:n].astype(np.float64)


def test_assignments_list_each_experts_tokens_in_order_with_their_weights():
    """The host CPU's view of a routing: per chosen expert, the tokens that chose it (in token order) and
    their weights, padded to the busiest expert's count; an expert no token chose has none."""
    rng = np.random.default_rng(3)
    idx = np.stack([rng.permutation(16)[:4] for _ in range(6)]).astype(np.int32)  # jax's ids are int32
    weights = rng.random(idx.shape).astype(np.float32)
    chosen = np.array([int(idx[2, 1]), 16, int(idx[5, 3]), int(idx[0, 0])], np.int64)  # 16: no token's
    tok, wt, ntok = assignments(idx, weights, chosen)
    assert ntok[1] == 0
    want = [[(n, weights[n, j]) for n in range(6) for j in range(4) if idx[n, j] == e] for e in chosen]
    assert ntok.tolist() == [len(w) for w in want]
    assert tok.shape == wt.shape == (len(chosen), max(1, max(len(w) for w in want)))
    for k, w in enumerate(want):
        assert tok[k, :len(w)].tolist() == [n for n, _ in w]
        assert wt[k, :len(w)].tolist() == [v for _, v in w]
        assert not tok[k, len(w):].any() and not wt[k, len(w):].any()


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("F, D", [(32, 64), (40, 300)])
def test_host_kernels_compute_the_routed_sum_of_the_dequantized_experts(fmt, F, D):
    layout, bufs, x, idx, weights, chosen = routed_experts_problem(fmt, F, D)
    tok, wt, ntok = assignments(idx, weights, chosen)
    out = HostExperts(layout).compute(np.array([bufs[e].ctypes.data for e in chosen], np.int64), tok, ntok, wt, x)
    assert rel(out, routed_sum_reference(layout, bufs, x, idx, weights, chosen)) < 1e-5


KERNELS = {"avx2": dict(int_dots=True, vnni=False), "avx512-vnni": dict(int_dots=True, vnni=True),
           "float-kernel": dict(int_dots=False)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("F, D", [(32, 64), (40, 300), (48, 600)])  # 600: 16 groups a step and a tail
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_experts_with_int8_activations_compute_the_routed_sum_of_the_quantized_activations(fmt, F, D, kernel):
    """activations="int8": every matrix multiplies its input quantized to int8 per group of 32, on the
    integer kernels (AVX2; AVX-512 VNNI for int4) and on the float kernel alike; about 0.5% from the
    float32 result."""
    from ktjax.experts import host_kernels
    if KERNELS[kernel]["int_dots"] and not host_kernels.INT8_DOTS:
        pytest.skip("this CPU has no AVX2")
    if KERNELS[kernel].get("vnni") and (fmt != "int4" or not host_kernels.INT4_VNNI):
        pytest.skip("AVX-512 VNNI: int4 only, on CPUs that have it")
    layout, bufs, x, idx, weights, chosen = routed_experts_problem(fmt, F, D)
    tok, wt, ntok = assignments(idx, weights, chosen)
    host = HostExperts(layout, activations="int8", **KERNELS[kernel])
    assert host.vnni == bool(KERNELS[kernel].get("vnni") and fmt == "int4")
    out = host.compute(np.array([bufs[e].ctypes.data for e in chosen], np.int64), tok, ntok, wt, x)
    assert rel(out, routed_sum_reference(layout, bufs, x, idx, weights, chosen, int8_per_group)) < 1e-5
    exact = routed_sum_reference(layout, bufs, x, idx, weights, chosen)
    assert 1e-4 < rel(out, exact) < 3e-2
