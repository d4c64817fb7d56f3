"""What the Triton-backed Pallas kernels share: the backend (absent in a jax without it: callers then
take the references), tile rules, and f32-accumulating dots."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

try:  # The Triton backend is deprecated in jax 0.11 and may disappear: callers fall back.
    from jax.experimental.pallas import triton as plgpu

    CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
except (ImportError, AttributeError):  # pragma: no cover
    plgpu = CompilerParams = None

LOG2E = math.log2(math.e)
MIN_TILE = 16  # Triton dot operands are at least 16 wide in every dimension


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def precision(a):
    # f32 inputs must stay f32 (IEEE): jax 0.11's Triton lowering otherwise picks TF32 (2e-4 error on an H200).
    return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def dot_t(a, b):
    """a @ b.T, accumulated in f32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision(a), preferred_element_type=jnp.float32)


def dot(a, b):
    """a @ b, accumulated in f32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision(a), preferred_element_type=jnp.float32)
