"""Attention kernels for MLA. `mla_decode` / `mla_prefill` pick, per call at trace time, the Pallas
kernel on the GPU and the pure-JAX reference elsewhere; this is the one switch.

`KTJAX_PALLAS=0` in the environment turns the kernels off for debugging, `KTJAX_PALLAS=1` forces them
(even where the reference is faster); unset is automatic. It is read at trace time, so it applies to
programs compiled after it is set. `interpret=True` runs the Pallas kernel in the Pallas interpreter on
any backend (how CI tests the kernels on the CPU).

The functions `mla_decode` / `mla_prefill` shadow the submodules of the same name as attributes of this
package: reach the modules with `from ktjax.kernels.mla_decode import ...` (not `import ... as`).
"""

from __future__ import annotations

import os

import jax

from ktjax.kernels import mla_decode as _decode_mod
from ktjax.kernels import mla_prefill as _prefill_mod
from ktjax.kernels.mla_decode import mla_decode_pallas
from ktjax.kernels.mla_prefill import mla_prefill_pallas
from ktjax.kernels.reference import mla_decode_reference, mla_prefill_blocked, mla_prefill_reference

def _setting() -> bool | None:
    """KTJAX_PALLAS: 0 -> off, 1 -> forced on, unset -> automatic."""
    value = os.environ.get("KTJAX_PALLAS", "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    return None


def use_pallas(*arrays) -> bool:
    """Whether the compiled (non-interpreted) kernels should run for these arrays."""
    setting = _setting()
    if setting is not None:
        return setting
    # Concrete arrays know their device; inside jit (tracers) the default backend decides.
    for x in arrays:
        try:
            devices = x.devices()  # raises for tracers
        except Exception:
            continue
        return all(d.platform in ("gpu", "cuda", "rocm") for d in devices)
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def _path(kernel_ok: bool, interpret: bool, *arrays) -> str:
    if not kernel_ok:
        return "reference"  # shapes the Triton tiles cannot cover, or no Triton backend in this jax
    if interpret:
        return "interpret"
    return "pallas" if use_pallas(*arrays) else "reference"


# Below this many cache slots (B x T, static) the XLA reference wins on an H200: the split-K kernel plus its
# combine cost ~27-30 us against 13-19 us (B=1, T<=4K: 0.50x, 0.64x; B=16, T=1K: 1.01x; benchmarks/kernels.md).
DECODE_MIN_SLOTS = 16384


def decode_path(q_latent_BHL, q_rope_BHR, kv_latent_BTL, *, interpret: bool = False) -> str:
    path = _path(_decode_mod.supported(q_latent_BHL, q_rope_BHR, kv_latent_BTL), interpret, kv_latent_BTL)
    small = kv_latent_BTL.shape[0] * kv_latent_BTL.shape[1] < DECODE_MIN_SLOTS
    if path == "pallas" and small and _setting() is None:  # KTJAX_PALLAS=1 still forces the kernel
        return "reference"
    return path


def prefill_path(q_BTHK, v_BSHV, *, interpret: bool = False) -> str:
    return _path(_prefill_mod.supported(q_BTHK, v_BSHV), interpret, v_BSHV)


def mla_decode(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B, *, sm_scale, interpret=False):
    """Absorbed-form MLA decode; see `mla_decode_reference` for the contract."""
    path = decode_path(q_latent_BHL, q_rope_BHR, kv_latent_BTL, interpret=interpret)
    if path == "reference":
        return mla_decode_reference(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B, sm_scale=sm_scale)
    return mla_decode_pallas(q_latent_BHL, q_rope_BHR, kv_latent_BTL, k_rope_BTR, lengths_B,
                             sm_scale=float(sm_scale), interpret=path == "interpret")


def mla_prefill(q_BTHK, k_BSHK, v_BSHV, q_start_B, *, sm_scale, interpret=False):
    """Causal chunked-prefill attention; see `mla_prefill_reference` for the contract."""
    path = prefill_path(q_BTHK, v_BSHV, interpret=interpret)
    if path == "reference":
        return mla_prefill_blocked(q_BTHK, k_BSHK, v_BSHV, q_start_B, sm_scale=sm_scale)
    return mla_prefill_pallas(q_BTHK, k_BSHK, v_BSHV, q_start_B, sm_scale=float(sm_scale),
                              interpret=path == "interpret")


__all__ = ["mla_decode", "mla_prefill", "mla_decode_reference", "mla_prefill_reference", "mla_prefill_blocked",
           "mla_decode_pallas", "mla_prefill_pallas", "use_pallas", "decode_path", "prefill_path", "DECODE_MIN_SLOTS"]
