"""Small building blocks: linear maps in the checkpoint's [out, in] layout, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type

_INIT_STD = 0.02


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
    return (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum in x's dtype. bf16 matmuls accumulate in float32 on the GPU and round once, as
    `preferred_element_type=float32` then a cast would; unlike that form, the backward pass then gets
    a bf16 cotangent, so its matmuls stay bf16 instead of upcasting the weight to float32 (measured
    on the H200: an f32 GEMM plus a conversion of the weight, over half of an expert's backward)."""
    return jnp.einsum(spec, x, w.astype(x.dtype))


def linear(x_NI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """x @ w.T with w kept as the checkpoint stores it ([out, in])."""
    return matmul("...i,oi->...o", x_NI, w_OI)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype: Dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal_init(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x, self.weight[...])
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # Same rounding order as the reference: normalise in f32, cast, then scale.
    return weight.astype(x.dtype) * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """The feed-forward's activation, silu(gate) * up: one definition for dense MLPs, shared and routed experts."""
    return jax.nn.silu(gate) * up


class MLP(nnx.Module):
    """SwiGLU feed-forward: dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
