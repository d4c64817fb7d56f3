"""Pallas MLA kernels in interpret mode on the CPU, against float64 numpy references.

Every case draws fresh inputs, poisons the cache past the valid region with NaN (must be ignored),
and relies on the interpreter's NaN-filled output buffers (checked below) so that any output
element the kernel forgets to write shows up as NaN.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from ktjax import kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
_seed = iter(range(10**6))


def _rand(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _rel_err(out, ref):
    out = _f64(out)
    assert not np.isnan(out).any(), "NaN in output (unwritten or poisoned element)"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _softmax(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def decode_np(ql, qr, kv, kr, lengths, scale):
    ql, qr, kv, kr = map(_f64, (ql, qr, kv, kr))
    out = np.zeros(ql.shape)
    for b, n in enumerate(np.asarray(lengths)):
        if n > 0:  # a row with nothing to attend to is zeros (the contract of mla_decode_reference)
            s = (ql[b] @ kv[b, :n].T + qr[b] @ kr[b, :n].T) * scale
            out[b] = _softmax(s) @ kv[b, :n]
    return out


def prefill_np(q, k, v, q_start, scale):
    q, k, v = map(_f64, (q, k, v))
    B, T, H, _ = q.shape
    out = np.zeros((B, T, H, v.shape[-1]))
    for b in range(B):
        for t in range(T):
            n = int(q_start[b]) + t + 1
            s = np.einsum("hk,shk->hs", q[b, t], k[b, :n]) * scale
            out[b, t] = np.einsum("hs,shv->hv", _softmax(s), v[b, :n])
    return out


def test_interpreter_poisons_outputs():
    """The premise of the no-NaN checks: an output the kernel never writes comes back NaN."""
    def kernel(x_ref, o_ref):
        o_ref[:8] = x_ref[:8]

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), interpret=True)(
        jnp.ones(16, jnp.float32))
    assert np.isnan(np.asarray(out[8:])).all() and (np.asarray(out[:8]) == 1).all()


DECODE_CASES = [  # (lengths, T, H, block_k, num_splits); single rows and odd shapes: DECODE_SHAPES below
    ([1, 37, 100, 64], 100, 20, 16, None),  # batch of lengths; H=20 padded to a head block; auto splits
    ([100, 3], 100, 16, 16, 4),             # split-K: long row split 4 ways, short row leaves empty splits
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lengths,T,H,block_k,num_splits", DECODE_CASES)
def test_mla_decode(dtype, lengths, T, H, block_k, num_splits):
    rng = np.random.default_rng(next(_seed))
    B, L, R, scale = len(lengths), 64, 16, 0.3
    ql, qr = _rand(rng, (B, H, L), dtype), _rand(rng, (B, H, R), dtype)
    kv, kr = _rand(rng, (B, T, L), dtype), _rand(rng, (B, T, R), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    dead_BT = (np.arange(T)[None, :] >= np.asarray(lengths)[:, None])[..., None]
    kv, kr = jnp.where(dead_BT, jnp.nan, kv), jnp.where(dead_BT, jnp.nan, kr)
    out = kernels.mla_decode_pallas(ql, qr, kv, kr, lengths, sm_scale=scale, block_h=16, block_k=block_k,
                                    num_splits=num_splits, interpret=True)
    assert out.shape == (B, H, L) and out.dtype == dtype
    assert _rel_err(out, decode_np(ql, qr, kv, kr, lengths, scale)) < TOL[dtype]


PREFILL_CASES = [  # (q_start, T, S): chunk of T queries at q_start in a cache of S; more in PREFILL_SHAPES
    ([0, 0], 37, 64),       # T not a multiple of block_q; cache longer than the chunk
    ([5, 40], 23, 80),      # chunked prefill at different offsets in one batch
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("q_start,T,S", PREFILL_CASES)
def test_mla_prefill(dtype, q_start, T, S):
    rng = np.random.default_rng(next(_seed))
    B, H, K, V, scale = len(q_start), 3, 48, 32, 0.2  # K = 32 + 16: two dot pieces, like 192 = 128 + 64
    q, k, v = _rand(rng, (B, T, H, K), dtype), _rand(rng, (B, S, H, K), dtype), _rand(rng, (B, S, H, V), dtype)
    dead_BS = (np.arange(S)[None, :] >= np.asarray(q_start)[:, None] + T)[:, :, None, None]
    k, v = jnp.where(dead_BS, jnp.nan, k), jnp.where(dead_BS, jnp.nan, v)  # never written: must not be read
    q_start = jnp.asarray(q_start, jnp.int32)
    out = kernels.mla_prefill_pallas(q, k, v, q_start, sm_scale=scale, block_q=16, block_k=16, interpret=True)
    assert out.shape == (B, T, H, V) and out.dtype == dtype
    assert _rel_err(out, prefill_np(q, k, v, q_start, scale)) < TOL[dtype]


@pytest.mark.parametrize("q_start,T,S", [([0], 37, 37), ([5, 40], 40, 88)])
def test_blocked_prefill_gives_the_references_values_and_gradients_with_one_blocks_scores(q_start, T, S):
    rng = np.random.default_rng(next(_seed))
    B, H, K, V = len(q_start), 3, 8, 8  # head dims no larger than a block: the scores are the big values
    q, k, v = (_rand(rng, shape, jnp.float32) for shape in ((B, T, H, K), (B, S, H, K), (B, S, H, V)))
    start = jnp.asarray(q_start, jnp.int32)
    blocked = functools.partial(kernels.mla_prefill_blocked, q_start_B=start, sm_scale=0.3, block_q=8)
    reference = functools.partial(kernels.mla_prefill_reference, q_start_B=start, sm_scale=0.3)
    np.testing.assert_allclose(blocked(q, k, v), reference(q, k, v), rtol=1e-6, atol=1e-6)
    do = _rand(rng, (B, T, H, V), jnp.float32)
    grads = [jax.vjp(f, q, k, v)[1](do) for f in (blocked, reference)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def largest_array(f):  # elements of the biggest value the gradient program computes
        jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))(q, k, v)
        sizes, todo = [], [jaxpr.jaxpr]
        while todo:
            j = todo.pop()
            for eqn in j.eqns:
                sizes += [int(np.prod(o.aval.shape)) for o in eqn.outvars if hasattr(o.aval, "shape")]
                todo += [p.jaxpr if hasattr(p, "jaxpr") else p for p in eqn.params.values()
                         if hasattr(p, "eqns") or hasattr(getattr(p, "jaxpr", None), "eqns")]
        return max(sizes)

    assert largest_array(reference) == B * H * T * S  # every score at once
    assert largest_array(blocked) * 4 <= largest_array(reference)  # one block's scores, or the padded queries


# Every class of shape, through the public entry points in interpret mode: where `supported()` says the tiles
# cover the shapes the kernel runs and must be right; everywhere else the call must quietly take the
# reference. Cache entries past each row's end are NaN where the kernel runs (it must never read them) and
# large finite garbage where the reference runs (it reads them, and must give them zero weight).


def _past_the_end(kernel_runs):
    return jnp.nan if kernel_runs else 30.0


DECODE_SHAPES = [  # (dtype, lengths, T, H, L, R, kernel runs)
    (jnp.float32, [1], 1, 1, 16, 16, False),          # T = 1
    (jnp.bfloat16, [5, 0, 1], 5, 3, 16, 16, False),   # T shorter than a tile; odd batch and heads
    (jnp.float32, [15, 0], 15, 2, 32, 16, False),     # T one short of a tile
    (jnp.float32, [16], 16, 1, 64, 16, True),         # T one tile; one row, one head
    (jnp.bfloat16, [40, 1, 0], 40, 3, 32, 16, True),  # T shorter than the bf16 key block, not a multiple of 16;
                                                      # rows of length 1 and 0; odd batch and heads
    (jnp.float32, [99, 0], 100, 33, 16, 64, True),    # heads past a head block (padded); R > L; split context
    (jnp.float32, [64], 64, 3, 24, 16, False),        # L not a power of two
    (jnp.bfloat16, [64], 64, 3, 8, 16, False),        # L a power of two below a tile
    (jnp.float32, [64], 64, 3, 16, 4, False),         # R of the tiny test model
]


@pytest.mark.parametrize("dtype,lengths,T,H,L,R,kernel_runs", DECODE_SHAPES)
def test_mla_decode_runs_the_kernel_where_supported_and_the_reference_elsewhere(dtype, lengths, T, H, L, R,
                                                                                 kernel_runs):
    rng = np.random.default_rng(next(_seed))
    B, scale = len(lengths), 0.3
    ql, qr = _rand(rng, (B, H, L), dtype), _rand(rng, (B, H, R), dtype)
    past_end_BT1 = (np.arange(T)[None, :] >= np.asarray(lengths)[:, None])[..., None]
    kv, kr = (jnp.where(past_end_BT1, _past_the_end(kernel_runs), _rand(rng, (B, T, D), dtype)) for D in (L, R))
    lengths = jnp.asarray(lengths, jnp.int32)
    path = kernels.decode_path(ql, qr, kv, impl="interpret")
    assert path == ("interpret" if kernel_runs else "reference")
    out = kernels.mla_decode(ql, qr, kv, kr, lengths, sm_scale=scale, impl="interpret")
    assert out.shape == (B, H, L) and out.dtype == dtype
    assert _rel_err(out, decode_np(ql, qr, kv, kr, lengths, scale)) < TOL[dtype]
    assert (_f64(out)[np.asarray(lengths) == 0] == 0).all()
    if not kernel_runs:
        reference = kernels.mla_decode_reference(ql, qr, kv, kr, lengths, sm_scale=scale)
        np.testing.assert_array_equal(out, reference)


PREFILL_SHAPES = [  # (dtype, q_start, T, S, H, K, V, kernel runs)
    (jnp.float32, [0], 1, 1, 1, 16, 16, False),           # a cache of one key
    (jnp.bfloat16, [0, 7], 5, 12, 3, 16, 16, False),      # S shorter than a tile
    (jnp.float32, [15], 1, 16, 1, 16, 16, True),          # one query at the end of a one-tile cache
    (jnp.bfloat16, [0, 5, 23], 17, 40, 3, 48, 32, True),  # S shorter than the bf16 key block; odd batch, heads
    (jnp.float32, [0, 84], 16, 100, 2, 112, 16, True),    # K in three pieces; S not a multiple of a key block
    (jnp.float32, [0], 4, 16, 2, 12, 12, False),          # the tiny test model (K = 12)
    (jnp.float32, [0], 4, 16, 2, 240, 16, False),         # K in four pieces
    (jnp.bfloat16, [0], 4, 16, 2, 48, 24, False),         # V not a power of two
]


@pytest.mark.parametrize("dtype,q_start,T,S,H,K,V,kernel_runs", PREFILL_SHAPES)
def test_mla_prefill_runs_the_kernel_where_supported_and_the_reference_elsewhere(dtype, q_start, T, S, H, K, V,
                                                                                  kernel_runs):
    rng = np.random.default_rng(next(_seed))
    B, scale = len(q_start), 0.2
    q = _rand(rng, (B, T, H, K), dtype)
    past_end_BS11 = (np.arange(S)[None, :] >= np.asarray(q_start)[:, None] + T)[:, :, None, None]
    k, v = (jnp.where(past_end_BS11, _past_the_end(kernel_runs), _rand(rng, (B, S, H, D), dtype)) for D in (K, V))
    q_start = jnp.asarray(q_start, jnp.int32)
    path = kernels.prefill_path(q, v, impl="interpret")
    assert path == ("interpret" if kernel_runs else "reference")
    out = kernels.mla_prefill(q, k, v, q_start, sm_scale=scale, impl="interpret")
    assert out.shape == (B, T, H, V) and out.dtype == dtype
    assert _rel_err(out, prefill_np(q, k, v, q_start, scale)) < TOL[dtype]
    if not kernel_runs:
        np.testing.assert_array_equal(out, kernels.mla_prefill_blocked(q, k, v, q_start, sm_scale=scale))


def _decode_args(rng, T=40):
    ql, qr = _rand(rng, (2, 16, 32), jnp.float32), _rand(rng, (2, 16, 16), jnp.float32)
    kv, kr = _rand(rng, (2, T, 32), jnp.float32), _rand(rng, (2, T, 16), jnp.float32)
    return ql, qr, kv, kr, jnp.asarray([T, 7])


def test_impl_must_be_one_of_the_impls():
    ql, qr, kv, kr, lengths = _decode_args(np.random.default_rng(next(_seed)))
    q = jnp.zeros((1, 4, 2, 16))
    calls = [lambda impl: kernels.decode_path(ql, qr, kv, impl=impl),
             lambda impl: kernels.prefill_path(q, q, impl=impl),
             lambda impl: kernels.mla_decode(ql, qr, kv, kr, lengths, sm_scale=0.5, impl=impl),
             lambda impl: kernels.mla_prefill(q, q, q, jnp.zeros(1, jnp.int32), sm_scale=0.5, impl=impl)]
    for call in calls:
        for bad in ("triton", "Pallas", True):
            with pytest.raises(ValueError, match=r"impl=.*'auto', 'pallas', 'reference', 'interpret'"):
                call(bad)


def test_each_impl_takes_its_path_for_concrete_cpu_arrays():
    ql, qr, kv, kr, lengths = _decode_args(np.random.default_rng(next(_seed)))
    paths = {impl: kernels.decode_path(ql, qr, kv, impl=impl) for impl in kernels.IMPLS}
    # "auto": the arrays live on the CPU; "pallas" is taken at its word (and would fail to compile here).
    assert paths == {"auto": "reference", "pallas": "pallas", "reference": "reference", "interpret": "interpret"}
    assert kernels.decode_path(ql, qr, kv, impl=None) == paths[kernels.DEFAULT_IMPL]
    reference = kernels.mla_decode_reference(ql, qr, kv, kr, lengths, sm_scale=0.5)
    for impl in ("auto", "reference"):  # the reference, bit for bit
        np.testing.assert_array_equal(kernels.mla_decode(ql, qr, kv, kr, lengths, sm_scale=0.5, impl=impl), reference)
    interpreted = jax.jit(functools.partial(kernels.mla_decode, sm_scale=0.5, impl="interpret"))
    assert _rel_err(interpreted(ql, qr, kv, kr, lengths), _f64(reference)) < 1e-5
    q = jnp.zeros((1, 16, 2, 64))
    assert [kernels.prefill_path(q, q, impl=impl) for impl in kernels.IMPLS] == list(paths.values())
    # Shapes the tiles cannot cover (tiny model: R = 4, qk = 12) take the reference whatever is asked.
    tiny_q = jnp.zeros((1, 4, 2, 12))
    for impl in kernels.IMPLS:
        assert kernels.decode_path(ql[..., :16], qr[..., :4], kv, impl=impl) == "reference"
        assert kernels.prefill_path(tiny_q, tiny_q, impl=impl) == "reference"


def test_auto_takes_the_kernels_inside_jit_on_a_gpu_where_they_pay(monkeypatch):
    ql, qr, kv_small, _, _ = _decode_args(np.random.default_rng(next(_seed)))
    kv_large = jnp.zeros((2, kernels.DECODE_MIN_SLOTS // 2, 32), jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def traced_decode_path(kv, impl):
        paths = []
        jax.jit(lambda x: paths.append(kernels.decode_path(ql, qr, x, impl=impl)) or x)(kv)
        return paths[0]

    assert traced_decode_path(kv_large, "auto") == "pallas"
    assert traced_decode_path(kv_small, "auto") == "reference"  # small cache: XLA is faster
    assert traced_decode_path(kv_small, "pallas") == "pallas"  # asked for: even where it does not pay
    assert traced_decode_path(kv_large, "reference") == "reference"
    assert traced_decode_path(kv_large, "interpret") == "interpret"
    paths = []
    for impl in ("auto", "reference"):
        jax.jit(lambda x: paths.append(kernels.prefill_path(x, x, impl=impl)) or x)(jnp.zeros((1, 16, 2, 64)))
    assert paths == ["pallas", "reference"]
    assert kernels.decode_path(ql, qr, kv_large, impl="auto") == "reference"  # concrete CPU arrays: their device


def test_default_impl_is_read_from_the_environment_once_at_import():
    spellings = {"0": "reference", "false": "reference", " OFF ": "reference", "no": "reference",
                 "1": "pallas", "true": "pallas", "On": "pallas", "yes": "pallas", "": "auto", None: "auto",
                 **{impl: impl for impl in kernels.IMPLS}}
    assert {value: kernels.impl_from_env(value) for value in spellings} == spellings
    with pytest.raises(ValueError, match="KTJAX_PALLAS='maybe'"):
        kernels.impl_from_env("maybe")
    # A fresh process: KTJAX_PALLAS=1 makes "pallas" the default (taken even for a small CPU cache, which
    # "auto" never is), and changing the variable after import changes nothing.
    script = textwrap.dedent("""
        import os, jax.numpy as jnp
        from ktjax import kernels
        ql, kv = jnp.zeros((1, 16, 16)), jnp.zeros((1, 16, 16))
        os.environ["KTJAX_PALLAS"] = "0"
        print(kernels.DEFAULT_IMPL, kernels.decode_path(ql, ql, kv))""")
    env = {**os.environ, "KTJAX_PALLAS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["pallas", "pallas"]
