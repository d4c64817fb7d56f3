"""Pallas kernels: MLA attention (`mla_decode` / `mla_prefill`) and int8/int4 routed experts at decode sizes
(`expert_ffn.experts_pallas`, chosen by `ktjax.experts.device` through `expert_path`). Each takes the
implementation as an explicit, static argument `impl`, one of IMPLS:

- "auto": the compiled Pallas kernel where it runs and pays (a GPU backend, shapes the tiles cover, and for
  decode a cache of at least DECODE_MIN_SLOTS slots), else the pure-JAX reference.
- "pallas": the compiled kernel wherever the tiles cover the shapes, else the reference.
- "reference": the pure-JAX reference; for prefill `mla_prefill_blocked`, which is differentiable and bounded
  in memory (training needs this: the kernels have no backward pass).
- "interpret": the Pallas kernel in the Pallas interpreter where the tiles cover the shapes, else the
  reference: how CI tests the kernels on the CPU.

`impl=None` means DEFAULT_IMPL, fixed once at import from the environment variable KTJAX_PALLAS ("0"/false/
off/no -> "reference", "1"/true/on/yes -> "pallas", an IMPLS name -> that, unset -> "auto"). Nothing reads
the environment later, so a program's attention depends only on its arguments. `decode_path` /
`prefill_path` say which path a call takes ("pallas", "reference" or "interpret").

The functions `mla_decode` / `mla_prefill` shadow the submodules of the same name as attributes of this
package: reach the modules with `from ktjax.kernels.mla_decode import ...` (not `import ... as`).
"""

from __future__ import annotations

import os
import types

import jax

from ktjax.kernels import expert_ffn as _expert_mod
from ktjax.kernels import mla_decode as _decode_mod
from ktjax.kernels import mla_prefill as _prefill_mod
from ktjax.kernels.expert_ffn import experts_pallas
from ktjax.kernels.mla_decode import mla_decode_pallas
from ktjax.kernels.mla_prefill import mla_prefill_pallas
from ktjax.kernels.reference import mla_decode_reference, mla_prefill_blocked, mla_prefill_reference

IMPLS = ("auto", "pallas", "reference", "interpret")

_ENV_SPELLINGS = {
    **dict.fromkeys(("0", "false", "off", "no"), "reference"),
    **dict.fromkeys(("1", "true", "on", "yes"), "pallas"),
    **{impl: impl for impl in IMPLS},
    "": "auto",  # unset
}


def impl_from_env(value: str | None) -> str:
    """The implementation a KTJAX_PALLAS value names; a value that names none is an error, not a silent "auto"."""
    key = (value or "").strip().lower()
    if key not in _ENV_SPELLINGS:
        raise ValueError(f"KTJAX_PALLAS={value!r}: expected 0/false/off/no, 1/true/on/yes or one of {IMPLS}")
    return _ENV_SPELLINGS[key]


DEFAULT_IMPL = impl_from_env(os.environ.get("KTJAX_PALLAS"))


def _resolve(impl: str | None) -> str:
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS} (or None for DEFAULT_IMPL)")
    return impl


def on_gpu(x) -> bool:
    """Whether x lives on a GPU: a concrete array knows its devices; inside jit (a tracer) the default
    backend decides."""
    try:
        devices = x.devices()  # raises for tracers
    except Exception:
        return jax.default_backend() in ("gpu", "cuda", "rocm")
    return all(d.platform in ("gpu", "cuda", "rocm") for d in devices)


def _path(impl: str | None, kernel_covers: bool, kernel_pays: bool, x) -> str:
    impl = _resolve(impl)
    if impl == "reference" or not kernel_covers:  # shapes the tiles cannot cover, or no Triton in this jax
        return "reference"
    if impl == "auto":
        return "pallas" if kernel_pays and on_gpu(x) else "reference"
    return impl


# Below this many cache slots (B x T, static) the XLA reference wins on an H200: the split-K kernel plus its
# combine cost ~27-30 us against 13-19 us (B=1, T<=4K: 0.50x, 0.64x; B=16, T=1K: 1.01x; benchmarks/kernels.md).
DECODE_MIN_SLOTS = 16384


def decode_path(q_latent_BHL, q_rope_BHR, kv_latent_BTL, *, impl: str | None = None) -> str:
    """The path `mla_decode` takes for these arguments: "pallas", "reference" or "interpret"."""
    large_cache = kv_latent_BTL.shape[0] * kv_latent_BTL.shape[1] >= DECODE_MIN_SLOTS
    return _path(impl, _decode_mod.supported(q_latent_BHL, q_rope_BHR, kv_latent_BTL), large_cache, kv_latent_BTL)


def prefill_path(q_BTHK, v_BSHV, *, impl: str | None = None) -> str:
    """The path `mla_prefill` takes for these arguments: "pallas", "reference" or "interpret"."""
    return _path(impl, _prefill_mod.supported(q_BTHK, v_BSHV), True, v_BSHV)


def expert_path(x_CD, fmt_name: str, F: int, D: int, *, impl: str | None = None) -> str:
    """The path int8/int4 routed experts take on the device for tokens x_CD: "pallas" (the fused kernels of
    `expert_ffn`), "interpret" or "reference" (XLA: a multiply-reduce over the quantized bytes at 1-2 tokens,
    else whole matrices dequantized, then matmuls). The kernels cover 1..MAX_TOKENS tokens; "auto" takes them up
    to EXPERT_KERNEL_MAX_TOKENS[format] tokens."""
    pays = x_CD.shape[0] <= EXPERT_KERNEL_MAX_TOKENS.get(fmt_name, 0)
    return _path(impl, _expert_mod.supported(x_CD, fmt_name, F, D), pays, x_CD)


# "auto" takes the expert kernels up to this many tokens, by format. Measured on the H200 (benchmarks/kernels.md,
# expert kernel runs 2-4; offload.md runs 15-16). A decode step of 4 full-size MoE layers, int4, batch 1: 12.0 ms
# with the kernels against 13.3 with XLA's multiply-reduce, in one run. A fused decode program pads its expert
# slots to 2/4/8; the kernels skip a slot no token chose, XLA computes it. Per chunk of 8 experts, all chosen,
# the two are close (1 token int4 449-495 against 468-504 us), and int8's kernel measured 392-638 against XLA's
# 392-465 us: int8 keeps XLA's path.
EXPERT_KERNEL_MAX_TOKENS = types.MappingProxyType({"int4": 2})


def mla_decode(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B, *, sm_scale,
               impl: str | None = None):
    """Absorbed-form MLA decode; see `mla_decode_reference` for the contract and IMPLS for `impl`."""
    path = decode_path(q_latent_BHL, q_rope_BHR, kv_latent_BTL, impl=impl)
    if path == "reference":
        return mla_decode_reference(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B, sm_scale=sm_scale)
    return mla_decode_pallas(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B,
                             sm_scale=float(sm_scale), interpret=path == "interpret")


def mla_prefill(q_BTHK, k_BSHK, v_BSHV, q_start_B, *, sm_scale, impl: str | None = None):
    """Causal chunked-prefill attention; see `mla_prefill_reference` for the contract and IMPLS for `impl`."""
    path = prefill_path(q_BTHK, v_BSHV, impl=impl)
    if path == "reference":
        return mla_prefill_blocked(q_BTHK, k_BSHK, v_BSHV, q_start_B, sm_scale=sm_scale)
    return mla_prefill_pallas(q_BTHK, k_BSHK, v_BSHV, q_start_B, sm_scale=float(sm_scale),
                              interpret=path == "interpret")


__all__ = ["mla_decode", "mla_prefill", "mla_decode_reference", "mla_prefill_reference", "mla_prefill_blocked",
           "mla_decode_pallas", "mla_prefill_pallas", "IMPLS", "DEFAULT_IMPL", "impl_from_env", "on_gpu",
           "decode_path", "prefill_path", "DECODE_MIN_SLOTS", "expert_path", "EXPERT_KERNEL_MAX_TOKENS", "experts_pallas"]
