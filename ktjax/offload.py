"""Models larger than the GPU: routed experts in `pinned_host` memory, streamed into per-layer
segments scheduled from Python.

Why per-layer segments: measured on the H200 (DESIGN.md), host->device transfers overlap compute
only across separately dispatched programs, not inside one. So each layer is a few small jitted
segments (attention, routing + shared expert, expert chunks); between them, Python issues
asynchronous `jax.device_put`s of the experts the routing chose (decode), or of every expert of
the layer in chunks, one chunk ahead of the compute, continuing into the next layer (prefill).

Each routed expert is one array [3, F, D] (gate, up, down transposed) so that one expert is one
contiguous transfer; FP8 checkpoints keep FP8 values plus block scales in host memory and are
dequantised on the device after the transfer (half the bytes of bf16).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.deepseek import DecoderLayer
from ktjax.models.layers import matmul
from ktjax.models.moe import route
from ktjax.models.rope import cos_sin
from ktjax.placement import PlacementPlan
from ktjax.sampling import sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One routed expert of one layer: w [3, F, D] = (gate, up, down^T), FP8 with block scales or float."""

    w: jax.Array
    scale: jax.Array | None = None  # float32 [3, ceil(F/b), ceil(D/b)] when w is float8
    block: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def matrices(self, k: slice, dtype) -> jax.Array:
        """Matrices k (0 gate, 1 up, 2 down^T) as [n, F, D] in dtype: FP8 ones dequantised with their
        block scales, only those a matmul reads (XLA still writes them out as bf16 before the matmul:
        benchmarks/experts.md)."""
        w = self.w[k]
        if self.scale is None:
            return w.astype(dtype)
        n, F, D = w.shape
        b, scale = self.block, self.scale[k]
        if F % b == 0 and D % b == 0:  # broadcast over blocks: no scale tensor the size of the weights
            w = w.reshape(n, F // b, b, D // b, b).astype(jnp.float32)
            return (w * scale[:, :, None, :, None]).astype(dtype).reshape(n, F, D)
        s = jnp.repeat(jnp.repeat(scale, b, axis=1)[:, :F], b, axis=2)[:, :, :D]
        return (w.astype(jnp.float32) * s).astype(dtype)

    def gate_up(self, dtype) -> jax.Array:
        """[2F, D]: gate and up stacked, one matmul for both."""
        _, F, D = self.w.shape
        return self.matrices(slice(0, 2), dtype).reshape(2 * F, D)

    def down(self, dtype) -> jax.Array:
        """[F, D]: down, transposed."""
        return self.matrices(slice(2, 3), dtype)[0]


def pack_expert(gate_FD, up_FD, down_DF, gate_scale=None, up_scale=None, down_scale=None, block=0):
    """Stack an expert's three matrices (numpy or jax) into the [3, F, D] transfer layout."""
    xp = np if isinstance(gate_FD, np.ndarray) else jnp
    w = xp.stack([gate_FD, up_FD, down_DF.T])
    scale = None if gate_scale is None else xp.stack([gate_scale, up_scale, down_scale.T]).astype(xp.float32)
    return w, scale, block


def layer_graphdef(cfg: ModelConfig, kind: str, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """A single decoder layer's structure; MoE layers without their routed experts (held apart)."""

    def make():
        layer = DecoderLayer(cfg, kind, dtype=dtype, rngs=nnx.Rngs(0))
        if kind == "moe":
            layer.mlp.experts = None
        return layer

    return nnx.split(nnx.eval_shape(make))


# ---- segments ------------------------------------------------------------------------------

def _route(layer, x_BTD, cfg: ModelConfig):
    h_BTD = layer.post_attention_layernorm(x_BTD)
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    gate = layer.mlp.gate
    bias = None if gate.e_score_correction_bias is None else gate.e_score_correction_bias[...]
    weights_NK, idx_NK = route(h_ND, gate.weight[...], bias, cfg)
    return h_ND, weights_NK, idx_NK


class LayerSegments:
    """The compiled programs of one layer kind, with its structure bound in (no per-call hashing
    of the graph); layer parameters travel as plain dicts of arrays, which flatten fast."""

    def __init__(self, graphdef: nnx.GraphDef, cfg: ModelConfig):
        merge = functools.partial(nnx.merge, graphdef)

        def attention(state, x_BTD, rope, start_B, latent_BSL, rope_BSR):
            return merge(state).attend(x_BTD, rope, start_B, latent_BSL, rope_BSR)

        def dense_mlp(state, x_BTD):
            layer = merge(state)
            return x_BTD + layer.mlp(layer.post_attention_layernorm(x_BTD))

        def dense_layer(state, x_BTD, rope, start_B, latent_BSL, rope_BSR):
            x_BTD, latent_BSL, rope_BSR = attention(state, x_BTD, rope, start_B, latent_BSL, rope_BSR)
            return dense_mlp(state, x_BTD), latent_BSL, rope_BSR

        def attention_route(state, x_BTD, rope, start_B, latent_BSL, rope_BSR):
            x_BTD, latent_BSL, rope_BSR = attention(state, x_BTD, rope, start_B, latent_BSL, rope_BSR)
            return (x_BTD, *_route(merge(state), x_BTD, cfg), latent_BSL, rope_BSR)

        def shared(state, x_BTD, h_ND):
            """The residual plus the shared expert: device work that need not wait for expert transfers."""
            layer = merge(state)
            if layer.mlp.shared_experts is None:
                return x_BTD
            return x_BTD + layer.mlp.shared_experts(h_ND.reshape(x_BTD.shape))

        self.attention = jax.jit(attention, donate_argnums=(4, 5))
        self.dense_mlp = jax.jit(dense_mlp)
        self.dense_layer = jax.jit(dense_layer, donate_argnums=(4, 5))
        self.route = jax.jit(lambda state, x_BTD: _route(merge(state), x_BTD, cfg))
        self.attention_route = jax.jit(attention_route, donate_argnums=(4, 5))
        self.shared = jax.jit(shared)


@functools.partial(jax.jit, static_argnames=("capacity",), donate_argnums=0)
def experts_segment(acc_ND, h_ND, weights_NK, idx_NK, ids_C, experts: tuple[ExpertWeights, ...], *, capacity: int):
    """Add the contribution of a chunk of experts (ids_C[c] uses experts[c]; id -1 is padding) to
    acc_ND (None: start from zeros).

    Tokens routed to each expert are gathered up to `capacity` (chosen on the host from the real
    counts, so nothing is dropped) and computed as dense matmuls.
    """
    N, D = h_ND.shape
    K = idx_NK.shape[1]
    dt = h_ND.dtype
    if acc_ND is None:
        acc_ND = jnp.zeros((N, D), jnp.float32)
    # Dispatch once for the chunk: a stable sort of the N*K assignments by their expert's slot lays
    # each expert's tokens out contiguously (slot C: routed elsewhere), so each expert takes a slice.
    hit_AC = idx_NK.reshape(-1, 1) == ids_C[None, :]
    slot_A = jnp.where(hit_AC.any(-1), jnp.argmax(hit_AC, axis=-1), len(experts))
    order_A = jnp.argsort(slot_A, stable=True)
    count_C = hit_AC.sum(0)
    start_C = jnp.cumsum(count_C) - count_C
    pad = jnp.full((capacity,), N, order_A.dtype)
    tok_A = jnp.concatenate([order_A // K, pad])  # token N: the zero row below
    w_A = jnp.concatenate([weights_NK.reshape(-1)[order_A], jnp.zeros((capacity,), weights_NK.dtype)])
    h_pad = jnp.concatenate([h_ND, jnp.zeros((1, D), dt)])
    for c, ex in enumerate(experts):
        valid_C = jnp.arange(capacity) < count_C[c]
        tok_C = jnp.where(valid_C, jax.lax.dynamic_slice_in_dim(tok_A, start_C[c], capacity), N)
        wt_C = jnp.where(valid_C, jax.lax.dynamic_slice_in_dim(w_A, start_C[c], capacity), 0.0)
        y_CD = expert_ffn(h_pad[tok_C], ex)
        acc_ND = acc_ND.at[tok_C].add(y_CD * wt_C[:, None], mode="drop")
    return acc_ND


def expert_ffn(x_CD, ex: ExpertWeights):
    """down(silu(gate x) * up x) as float32. Matmul outputs are rounded to x's dtype, so that the
    backward's matmuls stay in it (see `layers.matmul`). Measured on the H200 (benchmarks/experts.md):
    gate and up as one matmul is faster for bf16 experts, as two for FP8 ones (each dequantised alone)."""
    return (ffn_separate if ex.scale is not None else ffn_fused)(x_CD, ex)


def ffn_fused(x_CD, ex: ExpertWeights):
    dt, f32 = x_CD.dtype, jnp.float32
    g_CF, u_CF = jnp.split(matmul("cd,fd->cf", x_CD, ex.gate_up(dt)).astype(f32), 2, axis=-1)
    return matmul("cf,fd->cd", (jax.nn.silu(g_CF) * u_CF).astype(dt), ex.down(dt)).astype(f32)


def ffn_separate(x_CD, ex: ExpertWeights):
    dt, f32 = x_CD.dtype, jnp.float32
    g_CF = matmul("cd,fd->cf", x_CD, ex.matrices(slice(0, 1), dt)[0]).astype(f32)
    u_CF = matmul("cd,fd->cf", x_CD, ex.matrices(slice(1, 2), dt)[0]).astype(f32)
    return matmul("cf,fd->cd", (jax.nn.silu(g_CF) * u_CF).astype(dt), ex.down(dt)).astype(f32)


@jax.jit
def combine_segment(x_BTD, acc_ND):
    return x_BTD + acc_ND.astype(x_BTD.dtype).reshape(x_BTD.shape)


@functools.partial(jax.jit, static_argnums=0)
def embed_segment(cfg, embed_VD, tokens_BT, start_B):
    tokens_BT = tokens_BT.reshape(tokens_BT.shape[0], -1).astype(jnp.int32)  # [B] (a decode step) or [B, T]
    start_B = start_B.astype(jnp.int32)
    T = tokens_BT.shape[1]
    positions_BT = start_B[:, None] + jnp.arange(T, dtype=start_B.dtype)[None, :]
    return embed_VD[tokens_BT], cos_sin(cfg, positions_BT), start_B


@jax.jit
def final_logits(norm_D, head_VD, eps, x_BXD):
    """Final RMSNorm and LM head over any leading dims; float32 logits."""
    x32 = x_BXD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    x = norm_D.astype(x_BXD.dtype) * x32.astype(x_BXD.dtype)
    return jnp.einsum("...d,vd->...v", x, head_VD.astype(x.dtype), preferred_element_type=jnp.float32)


@jax.jit
def head_segment(norm_D, head_VD, eps, x_BTD, last_B, key, temperature, top_k, top_p):
    """Sample from row last_B[b] of each sequence."""
    x_BD = jnp.take_along_axis(x_BTD, last_B.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
    logits_BV = final_logits(norm_D, head_VD, eps, x_BD)
    return sample(logits_BV, key, temperature, top_k, top_p), logits_BV


@functools.partial(jax.jit, static_argnums=0)
def move_segment(sharding, experts):
    """Host experts copied to the device by a compiled program (the alternative to `jax.device_put`)."""
    return jax.device_put(experts, sharding)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---- the model -----------------------------------------------------------------------------

@dataclasses.dataclass
class StepStats:
    """Transfers and time of the last prefill or decode step."""

    bytes_from_host: int = 0
    experts_fetched: int = 0
    seconds: float = 0.0
    segment_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # When each MoE layer's routing reached the host, in seconds from the step's start: the spacing
    # is the per-layer time, which shows how close each layer's transfers run to the link's speed.
    routed_at: list[float] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def host_gb_per_s(self) -> float:
        return self.bytes_from_host / self.seconds / 1e9 if self.seconds else 0.0


class OffloadedModel:
    """Core parameters on the device, routed experts per the placement plan (host or device)."""

    def __init__(self, config: ModelConfig, plan: PlacementPlan, dtype, top: dict[str, jax.Array],
                 layers: list[nnx.State], experts: dict[int, list[ExpertWeights]], path: str | None = None):
        self.config, self.placement, self.dtype, self.path = config, plan, jnp.dtype(dtype), path
        self.segments = {k: LayerSegments(layer_graphdef(config, k, dtype)[0], config) for k in set(config.layer_kinds)}
        self.device = jax.devices()[0]
        self.on_device = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
        # Device experts get the very sharding fetched ones have: a segment's compiled variant is keyed
        # on its arguments' shardings, and a mix of kinds per step would recompile it.
        experts = {i: [ex if (i, e) in plan.host_experts else jax.device_put(ex, self.on_device)
                       for e, ex in enumerate(slots)] for i, slots in experts.items()}
        self.top, self.layers, self.experts = top, layers, experts
        self._eps = jnp.float32(config.rms_norm_eps)
        # Decode computes the chosen experts in groups of this many, each as soon as its transfers land,
        # so only the last group's compute is not hidden behind the link.
        self.decode_group = 1  # measured fastest on the H200 (benchmarks/offload.md): 29.1 vs 31.6 ms for 2
        self.fetch_in_program = False  # move experts with a compiled copy program instead of jax.device_put
        self.tokenizer = None
        self.prefill_chunk = 512
        self.profile = False  # block after every segment to time it (slower: no overlap)
        self.last_step = StepStats()
        self.history: list[StepStats] = []

    # The generation loop's interface ------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        cfg = self.config
        return [(jnp.zeros((batch, max_len, cfg.kv_lora_rank), self.dtype),
                 jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), self.dtype)) for _ in cfg.layer_kinds]

    def prefill(self, cache, tokens_BT, lengths_B, key, temperature, top_k, top_p):
        """The whole (padded) prompt layer by layer, so each layer's experts stream once."""
        B = tokens_BT.shape[0]
        x_BTD, cache = self.forward(cache, tokens_BT, np.zeros(B, np.int32))
        tok, _ = self._head(x_BTD, np.asarray(lengths_B) - 1, key, temperature, top_k, top_p)
        return tok, cache

    def decode_and_sample(self, cache, token_B, pos_B, key, temperature, top_k, top_p):
        # No eager jnp work here: each would be a separate dispatch (~0.1-0.5 ms) on the step's path.
        x_BTD, cache = self.forward(cache, token_B, pos_B)
        tok, _ = self._head(x_BTD, np.zeros((x_BTD.shape[0],), np.int32), key, temperature, top_k, top_p)
        return tok, cache

    def logits(self, tokens_BT) -> jax.Array:
        """float32 logits [B, T, V] of a full forward pass (prompts up to any length)."""
        tokens_BT = np.asarray(tokens_BT, np.int32)
        B, T = tokens_BT.shape
        x_BTD, _ = self.forward(self.init_cache(B, T), tokens_BT, np.zeros((B,), np.int32))
        return final_logits(self.top["norm"], self._head_weight(), self._eps, x_BTD)

    def _head_weight(self) -> jax.Array:
        return self.top["embed_tokens"] if self.top.get("lm_head") is None else self.top["lm_head"]

    # The forward pass ------------------------------------------------------------------------
    def _head(self, x_BTD, last_B, key, temperature, top_k, top_p):
        return self._timed("head", head_segment, self.top["norm"], self._head_weight(), self._eps, x_BTD, last_B,
                           key, temperature, top_k, top_p)

    def _timed(self, name: str, fn, *args, **kwargs):
        if not self.profile:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        seg = self.last_step.segment_seconds
        seg[name] = seg.get(name, 0.0) + time.perf_counter() - t
        return out

    def forward(self, cache, tokens_BT, start_B):
        """Hidden states after the last layer for a chunk at positions start[b] + t; updates the cache."""
        self.last_step = StepStats()
        t0 = self.last_step.started
        cfg = self.config
        # Token ids and positions may be host arrays; they cross to the device once, here.
        x_BTD, rope, start_B = self._timed("embed", embed_segment, cfg, self.top["embed_tokens"], tokens_BT, start_B)
        T = x_BTD.shape[1]
        cache = list(cache)
        prefetched: list = []  # the next MoE layer's first chunk, fetched ahead; a list so _moe can take it
        short = T <= self.prefill_chunk  # attention and what follows fit one segment
        for i, kind in enumerate(cfg.layer_kinds):
            seg, state = self.segments[kind], self.layers[i]
            latent, rp = cache[i]
            if kind == "dense" and short:
                x_BTD, latent, rp = self._timed("dense_layer", seg.dense_layer, state, x_BTD, rope, start_B, latent, rp)
            elif kind == "dense":
                x_BTD, latent, rp = self._attention(seg, state, x_BTD, rope, start_B, latent, rp)
                x_BTD = self._timed("dense_mlp", seg.dense_mlp, state, x_BTD)
            else:
                if short:
                    x_BTD, h_ND, weights_NK, idx_NK, latent, rp = self._timed(
                        "attention_route", seg.attention_route, state, x_BTD, rope, start_B, latent, rp)
                else:
                    x_BTD, latent, rp = self._attention(seg, state, x_BTD, rope, start_B, latent, rp)
                    h_ND, weights_NK, idx_NK = self._timed("route", seg.route, state, x_BTD)
                idx_NK.copy_to_host_async()  # queued behind the routing: no host round trip before it
                x_BTD = self._moe(i, seg, state, x_BTD, h_ND, weights_NK, idx_NK, prefetched)
            cache[i] = (latent, rp)
        jax.block_until_ready(x_BTD)
        self.last_step.seconds = time.perf_counter() - t0
        self.history.append(self.last_step)
        return x_BTD, cache

    def _attention(self, seg: LayerSegments, state, x_BTD, rope, start_B, latent, rp):
        """Attention over query chunks, so prefill activations stay bounded for long prompts."""
        T = x_BTD.shape[1]
        outs = []
        for q0 in range(0, T, self.prefill_chunk):
            q1 = min(T, q0 + self.prefill_chunk)
            rope_q = (rope[0][:, q0:q1], rope[1][:, q0:q1])
            out, latent, rp = self._timed("attention", seg.attention, state, x_BTD[:, q0:q1], rope_q, start_B + q0,
                                          latent, rp)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), latent, rp

    # MoE with streamed experts ------------------------------------------------------------
    def _stream_all(self, n_tokens: int) -> bool:
        """Prefill-sized chunks route to nearly every expert: stream whole layers, ahead of routing."""
        return n_tokens * self.config.num_experts_per_tok >= 2 * self.config.n_routed_experts

    def _chunks(self, layer: int, ids: Sequence[int]) -> list[list[int]]:
        """Chunks of the plan's size, device-resident experts first (their compute need not wait)."""
        hosted = self.placement.host_experts
        ordered = [e for e in ids if (layer, e) not in hosted] + [e for e in ids if (layer, e) in hosted]
        size = self.placement.expert_chunk
        return [ordered[k:k + size] for k in range(0, len(ordered), size)]

    def _fetch(self, layer: int, ids: Sequence[int]):
        """Start the transfers of a chunk's host experts (asynchronous); device experts as they are."""
        slots = self.experts[layer]
        hosted = [e for e in ids if (layer, e) in self.placement.host_experts]
        if not hosted:
            moved = []
        elif self.fetch_in_program:  # one program per expert, so each lands (and is usable) on its own
            moved = [move_segment(self.on_device, slots[e]) for e in hosted]
        else:
            moved = jax.device_put([slots[e] for e in hosted], self.on_device)
        by_id = dict(zip(hosted, moved))
        self.last_step.experts_fetched += len(hosted)
        self.last_step.bytes_from_host += sum(slots[e].nbytes for e in hosted)
        return [by_id.get(e, slots[e]) for e in ids]

    def _next_layer_prefetch(self, layer: int, n_tokens: int):
        nxt = next((j for j in range(layer + 1, self.config.num_hidden_layers)
                    if self.config.layer_kinds[j] == "moe"), None)
        if nxt is None or not self._stream_all(n_tokens):
            return None
        first = self._chunks(nxt, range(self.config.n_routed_experts))[0]
        return nxt, first, self._fetch(nxt, first)

    def stream_experts(self, i: int, counts: np.ndarray, n_tokens: int, compute, acc, *,
                       prefetched: list | None = None, started=None):
        """acc = compute(acc, ids_C, experts, capacity) over the experts layer i needs, in groups.

        Host experts are fetched one chunk ahead of the compute, and at most two chunks live on the
        device (what the plan's workspace holds): no chunk's arrays are referenced here once its
        compute is issued, and the chunk after next is fetched only when that compute is done.
        Prefill-sized batches stream every expert; decode-sized ones only those routed to.
        prefetched: a list holding at most one (layer, ids, arrays) fetched ahead; taken, and refilled
        with the next MoE layer's first chunk (so that transfer overlaps the end of this layer).
        started: called once the first transfer is under way (device work that need not wait for it).
        """
        stream_all = self._stream_all(n_tokens)
        ids = list(range(self.config.n_routed_experts)) if stream_all else [int(e) for e in np.flatnonzero(counts)]
        chunks = self._chunks(i, ids)
        ahead = prefetched.pop() if prefetched else None
        if ahead is not None and ahead[0] == i and chunks and chunks[0] == ahead[1]:
            fetched = ahead[2]
        else:
            fetched = self._fetch(i, chunks[0]) if chunks else []
        del ahead
        if started is not None:
            started()
        # Decode computes small groups, each as soon as its experts land; prefill whole chunks.
        group = self.placement.expert_chunk if stream_all else self.decode_group
        for c, ids_c in enumerate(chunks):
            # Issue the next transfer before this chunk's compute, so the copy engine never idles.
            upcoming = self._fetch(i, chunks[c + 1]) if c + 1 < len(chunks) else None
            if upcoming is None and stream_all and prefetched is not None:
                if c > 0:
                    jax.block_until_ready(acc)  # the previous chunk's compute done: two chunks on the device
                nxt = self._next_layer_prefetch(i, n_tokens)
                if nxt is not None:
                    prefetched.append(nxt)
            # Few static shapes: slots padded to a power of two (full groups when there are several),
            # capacity = every token for decode-sized batches, else the chunk's largest count.
            size = _pow2(len(ids_c)) if len(ids_c) <= group else group
            capacity = _pow2(n_tokens) if n_tokens <= 64 else _pow2(int(counts[list(ids_c)].max()))
            for g in range(0, len(ids_c), size):
                ids_g, slots = list(ids_c[g:g + size]), tuple(fetched[g:g + size])
                pad = size - len(ids_g)
                slots += (slots[0],) * pad  # padding reuses a fetched array: no transfer
                acc = compute(acc, np.array(ids_g + [-1] * pad, np.int32), slots, capacity)
            del slots, fetched  # drop this chunk's arrays, so they free once its compute is done
            if upcoming is not None and c + 2 < len(chunks):
                jax.block_until_ready(acc)  # bound device memory: at most two chunks in flight
            fetched = upcoming
        return acc

    def _moe(self, i: int, seg: LayerSegments, state, x_BTD, h_ND, weights_NK, idx_NK, prefetched: list):
        """The routed experts of layer i added to x (and the shared expert, while the first transfer runs)."""
        idx_host = np.asarray(idx_NK)  # the one device->host sync per MoE layer
        self.last_step.routed_at.append(time.perf_counter() - self.last_step.started)
        counts = np.bincount(idx_host.ravel(), minlength=self.config.n_routed_experts)
        shared = []

        def run_shared():
            shared.append(self._timed("shared_expert", seg.shared, state, x_BTD, h_ND))

        def compute(acc, ids_C, slots, capacity):
            return self._timed("experts", experts_segment, acc, h_ND, weights_NK, idx_NK, ids_C, slots,
                               capacity=capacity)

        acc = self.stream_experts(i, counts, h_ND.shape[0], compute, None, prefetched=prefetched, started=run_shared)
        return self._timed("combine", combine_segment, shared[0], acc)


# ---- building ------------------------------------------------------------------------------

def split_layers(cfg: ModelConfig, params: nnx.State) -> tuple[dict[str, jax.Array | None], list[nnx.State]]:
    """Top-level arrays and one state per layer (routed experts left out) from a stacked model state."""
    flat = dict(nnx.to_flat_state(params))
    top = {"embed_tokens": flat[("embed_tokens",)][...], "norm": flat[("norm", "weight")][...],
           "lm_head": flat[("lm_head", "weight")][...] if ("lm_head", "weight") in flat else None}
    seen = {"dense": 0, "moe": 0}
    layers = []
    for kind in cfg.layer_kinds:
        j = seen[kind]
        seen[kind] += 1
        prefix = "dense_layers" if kind == "dense" else "moe_layers"
        items = [(p[1:], v.replace(v[...][j])) for p, v in flat.items()
                 if p[0] == prefix and p[1:3] != ("mlp", "experts")]
        layers.append(nnx.to_pure_dict(nnx.from_flat_state(items)))
    return top, layers


def offload_model(model, plan: PlacementPlan) -> OffloadedModel:
    """Re-place an already loaded (resident) model per the plan: experts go to host memory one at a
    time. For checkpoints larger than the device, `ktjax.load(..., gpu_memory=...)` streams them
    there directly instead."""
    cfg = model.config
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    flat = dict(nnx.to_flat_state(model.params))
    gate, up, down = (flat[("moe_layers", "mlp", "experts", n)][...] for n in ("gate_proj", "up_proj", "down_proj"))
    moe_layers = [i for i, k in enumerate(cfg.layer_kinds) if k == "moe"]
    experts = {}
    for j, i in enumerate(moe_layers):
        slots = []
        for e in range(cfg.n_routed_experts):
            w, _, _ = pack_expert(gate[j, e], up[j, e], down[j, e])
            slots.append(ExpertWeights(jax.device_put(w, host) if (i, e) in plan.host_experts else w))
        experts[i] = slots
    top, layers = split_layers(cfg, model.params)
    return OffloadedModel(cfg, plan, model.dtype, top, layers, experts, model.path)


def expected_unique_experts(cfg: ModelConfig, n_tokens: int) -> float:
    """Expected distinct experts a batch of tokens picks, for uniform routing (a floor estimate)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - K / E) ** n_tokens) if n_tokens else 0.0




def load_offloaded(path: str, cfg: ModelConfig, dtype, plan: PlacementPlan, *, progress: bool | None = None
                   ) -> OffloadedModel:
    """Load a checkpoint straight into the offloaded layout: core leaves onto the device, each
    routed expert packed and moved on its own to where the plan puts it (host experts keep FP8)."""
    from tqdm import tqdm

    from ktjax.checkpoint import Checkpoint
    from ktjax.loading import _show_progress, abstract_model, plan_leaves, read_leaf

    graphdef, abstract = abstract_model(cfg, dtype)
    ckpt = Checkpoint(path)
    sources = plan_leaves(ckpt, cfg, abstract)  # checks every tensor before reading any
    variables = dict(nnx.to_flat_state(abstract))
    core = [(p, src) for p, src in sources if p[1:3] != ("mlp", "experts")]
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    total = sum(src.stored_nbytes for _, src in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.rstrip('/').split('/')[-1]}",
               disable=not _show_progress(progress), file=__import__("sys").stderr)
    with bar:
        flat = [(p, variables[p].replace(read_leaf(ckpt, src, on_tensor=bar.update))) for p, src in core]
        # The stacked expert leaves are not materialised: give them empty placeholders.
        for p, var in variables.items():
            if p[1:3] == ("mlp", "experts"):
                flat.append((p, var.replace(jnp.zeros((0,), dtype))))
        top, layers = split_layers(cfg, nnx.from_flat_state(flat))
        del flat
        experts = {}
        block = next(src.block for p, src in sources if p[1:3] == ("mlp", "experts"))
        for i in [i for i, k in enumerate(cfg.layer_kinds) if k == "moe"]:
            slots = []
            for e in range(cfg.n_routed_experts):
                names = [f"model.layers.{i}.mlp.experts.{e}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
                mats = [ckpt.read(n) for n in names]
                fp8 = all(m.dtype == np.dtype(jnp.float8_e4m3fn) for m in mats)
                if fp8:
                    if block[0] != block[1]:
                        raise ValueError(f"{path}: FP8 experts need square scale blocks, got {block}")
                    names += [n + "_scale_inv" for n in names]
                    w, s, b = pack_expert(*mats, *[ckpt.read(n) for n in names[3:]], block=block[0])
                    ex = ExpertWeights(w, s, b)  # stays FP8 wherever it lives; dequantised after transfer
                else:
                    w, _, _ = pack_expert(*[np.asarray(m).astype(np.dtype(dtype)) for m in mats])
                    ex = ExpertWeights(w)
                slots.append(jax.block_until_ready(jax.device_put(ex, host if (i, e) in plan.host_experts else device)))
                bar.update(sum(ckpt.info(n).nbytes for n in names))
                del mats
            experts[i] = slots
    return OffloadedModel(cfg, plan, dtype, top, layers, experts, path)
