"""Pallas MLA kernels in interpret mode on the CPU, against float64 numpy references.

Every case draws fresh inputs, poisons the cache past the valid region with NaN (must be ignored),
and relies on the interpreter's NaN-filled output buffers (checked below) so that any output
element the kernel forgets to write shows up as NaN.
"""

import functools

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


DECODE_CASES = [  # (lengths, T, H, block_k, num_splits)
    ([1], 64, 16, 16, 1),                   # length 1
    ([64], 64, 16, 16, 1),                  # full cache, a multiple of the block
    ([45], 45, 16, 16, 1),                  # full cache, not a multiple of the block
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


PREFILL_CASES = [  # (q_start, T, S): chunk of T queries at q_start in a cache of S
    ([0], 32, 32),          # whole prompt, multiple of the blocks
    ([0, 0], 37, 64),       # T not a multiple of block_q; cache longer than the chunk
    ([5, 40], 23, 80),      # chunked prefill at different offsets in one batch
    ([0], 1, 16),           # a single query
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


def test_dispatch(monkeypatch):
    rng = np.random.default_rng(next(_seed))
    ql, qr = _rand(rng, (2, 16, 32), jnp.float32), _rand(rng, (2, 16, 16), jnp.float32)
    kv, kr = _rand(rng, (2, 40, 32), jnp.float32), _rand(rng, (2, 40, 16), jnp.float32)
    lengths = jnp.asarray([40, 7])
    # On the CPU: the reference (bit for bit); interpret=True: the kernel, also under jit.
    assert kernels.decode_path(ql, qr, kv) == "reference"
    assert kernels.decode_path(ql, qr, kv, interpret=True) == "interpret"
    ref = kernels.mla_decode_reference(ql, qr, kv, kr, lengths, sm_scale=0.5)
    np.testing.assert_array_equal(kernels.mla_decode(ql, qr, kv, kr, lengths, sm_scale=0.5), ref)
    f = jax.jit(functools.partial(kernels.mla_decode, sm_scale=0.5, interpret=True))
    assert _rel_err(f(ql, qr, kv, kr, lengths), _f64(ref)) < 1e-5
    # Shapes the tiles cannot cover (tiny model: Dr = 4, qk = 12) go to the reference even when asked.
    assert kernels.decode_path(ql[..., :16], qr[..., :4], kv, interpret=True) == "reference"
    assert kernels.prefill_path(jnp.zeros((1, 4, 2, 12)), jnp.zeros((1, 4, 2, 12)), interpret=True) == "reference"
    # Inside jit on a GPU backend: kernels, unless turned off by the env var.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    traced, kv_big = [], jnp.zeros((2, kernels.DECODE_MIN_SLOTS // 2, 32), jnp.float32)
    jax.jit(lambda x: traced.append(kernels.decode_path(ql, qr, x)) or x)(kv_big)
    assert traced == ["pallas"]
    jax.jit(lambda x: traced.append(kernels.decode_path(ql, qr, x)) or x)(kv)  # small cache: XLA is faster
    assert traced[-1] == "reference"
    assert kernels.decode_path(ql, qr, kv) == "reference"  # concrete CPU arrays: their device decides
    monkeypatch.setenv("KTJAX_PALLAS", "0")
    jax.jit(lambda x: traced.append(kernels.prefill_path(x, x)) or x)(jnp.zeros((1, 4, 2, 64)))
    assert traced[-1] == "reference"
    jax.jit(lambda x: traced.append(kernels.decode_path(ql, qr, x)) or x)(kv_big)
    assert traced[-1] == "reference"
    monkeypatch.setenv("KTJAX_PALLAS", "1")  # forced on, even for a small cache
    jax.jit(lambda x: traced.append(kernels.decode_path(ql, qr, x)) or x)(kv)
    assert traced[-1] == "pallas"
