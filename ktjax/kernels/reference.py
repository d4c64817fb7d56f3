"""Pure-JAX MLA attention: the definition the Pallas kernels are checked against, and the
implementation used wherever the kernels do not run (CPU, debugging)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_decode_reference(q_latent_BHL: jax.Array, q_rope_BHR: jax.Array, kv_latent_BTL: jax.Array,
                         k_rope_BTR: jax.Array, lengths_B: jax.Array, *, sm_scale: float) -> jax.Array:
    """Absorbed-form MLA decode: one latent KV head shared by all H query heads.

    Returns o_latent [B, H, L] = softmax(q_latent.kv_latent + q_rope.k_rope) @ kv_latent over the
    first lengths[b] cache entries of each row (lengths past T count as T). A row with no entry
    (lengths[b] <= 0: an empty batch slot) returns zeros, not the NaN of a softmax over nothing; the
    kernel does the same. Accumulates in float32; returns the query dtype.
    """
    f32 = jnp.float32
    s = jnp.einsum("bhl,btl->bht", q_latent_BHL, kv_latent_BTL, preferred_element_type=f32)
    s = s + jnp.einsum("bhr,btr->bht", q_rope_BHR, k_rope_BTR, preferred_element_type=f32)
    s = s * sm_scale
    valid_BT = jnp.arange(kv_latent_BTL.shape[1])[None, :] < lengths_B[:, None]
    p = jax.nn.softmax(s, axis=-1, where=valid_BT[:, None, :])  # 0 outside `where`, so all-0 for an empty row
    o = jnp.einsum("bht,btl->bhl", p.astype(kv_latent_BTL.dtype), kv_latent_BTL, preferred_element_type=f32)
    return o.astype(q_latent_BHL.dtype)


def mla_prefill_reference(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHV: jax.Array,
    q_start_B: jax.Array,
    *,
    sm_scale: float,
) -> jax.Array:
    """Causal attention for a chunk of T queries that starts at q_start[b] in a cache of S keys.

    Query t of row b sits at position q_start[b] + t and sees keys 0..q_start[b] + t.
    Heads are full MLA heads (qk = nope + rope dims, v = v_head_dim). Returns [B, T, H, V].
    """
    f32 = jnp.float32
    s = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=f32) * sm_scale
    q_pos_BT = q_start_B[:, None] + jnp.arange(q_BTHK.shape[1])[None, :]
    visible_BTS = jnp.arange(k_BSHK.shape[1])[None, None, :] <= q_pos_BT[:, :, None]
    s = jnp.where(visible_BTS[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", p.astype(v_BSHV.dtype), v_BSHV, preferred_element_type=f32)
    return o.astype(q_BTHK.dtype)


PREFILL_BLOCK_Q = 512  # queries per block of `mla_prefill_blocked`


def mla_prefill_blocked(q_BTHK, k_BSHK, v_BSHV, q_start_B, *, sm_scale: float,
                        block_q: int = PREFILL_BLOCK_Q) -> jax.Array:
    """`mla_prefill_reference` over blocks of block_q queries, each block rematerialised in the
    backward pass: one block's [H, block_q, S] scores live at a time instead of all T x S, which at
    4K tokens and 128 heads is 32 GiB for a training step's backward. Same values; where the Pallas
    kernel has no backward pass (training), this is the attention."""
    B, T, H, K = q_BTHK.shape
    if T <= block_q:
        return mla_prefill_reference(q_BTHK, k_BSHK, v_BSHV, q_start_B, sm_scale=sm_scale)
    n = -(-T // block_q)
    q_NBQHK = jnp.pad(q_BTHK, ((0, 0), (0, n * block_q - T), (0, 0), (0, 0)))
    q_NBQHK = q_NBQHK.reshape(B, n, block_q, H, K).swapaxes(0, 1)

    @jax.checkpoint
    def block(args):
        q_BQHK, first = args
        return mla_prefill_reference(q_BQHK, k_BSHK, v_BSHV, q_start_B + first, sm_scale=sm_scale)

    o_NBQHV = jax.lax.map(block, (q_NBQHK, jnp.arange(n, dtype=q_start_B.dtype) * block_q))
    return o_NBQHV.swapaxes(0, 1).reshape(B, n * block_q, H, -1)[:, :T]
