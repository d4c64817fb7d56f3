"""LoRA fine-tuning: `ktjax.finetune.finetune(...)` and the `ktjax finetune` / `ktjax merge` commands.

One training step is one jitted program: gradient accumulation over micro-batches (lax.scan),
the forward rematerialised per layer (jax.checkpoint), the LM head and cross-entropy in chunks of
tokens, Optax AdamW on the adapter parameters only (warmup + cosine schedule, global-norm
clipping). The base weights are an input the step never differentiates nor changes: no gradients
and no optimizer state for them. Compute runs in the model's dtype (bf16 for real checkpoints),
adapter weights and optimizer state in float32.

Checkpoints (orbax) hold the adapters, the optimizer state, the step and the data position; since
batch k and the dropout key of step k are pure functions of (data, seed, k), a resumed run
continues exactly as an uninterrupted one. At the end the adapter is exported in PEFT format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ktjax import data as data_lib
from ktjax import lora as lora_lib
from ktjax.lora import DEFAULT_TARGETS, LoRAConfig

CHECKPOINTS = "checkpoints"
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm
SUMMARY = "finetune_summary.json"


# ---- configuration --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    seq_len: int = 1024
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    remat: bool = True
    loss_chunk: int = 1024  # tokens per chunk of the LM head + cross-entropy

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "loss_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup, self.steps) if self.warmup is not None else min(100, self.steps // 10)

    def schedule(self) -> optax.Schedule:
        w = self.warmup_steps
        return optax.warmup_cosine_decay_schedule(0.0 if w else self.lr, self.lr, w, max(self.steps, w + 1),
                                                  end_value=self.lr * self.min_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        if self.max_grad_norm:
            return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)
        return adamw


# ---- loss and the train step -----------------------------------------------------------------------

@contextlib.contextmanager
def differentiable_attention():
    """Trace attention with the pure-JAX reference: the Pallas MLA kernels (chosen on GPUs) have no
    backward pass. ktjax.kernels reads KTJAX_PALLAS when a program is traced, so this only matters
    around the first call of each training program; the setting is restored afterwards."""
    old = os.environ.get("KTJAX_PALLAS")
    os.environ["KTJAX_PALLAS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KTJAX_PALLAS", None)
        else:
            os.environ["KTJAX_PALLAS"] = old


def _with_reference_attention(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with differentiable_attention():
            return fn(*args, **kwargs)
    return wrapped


def head_nll(module, x_BTD: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array, chunk: int
             ) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over the targets, number of targets), float32. The final norm, LM head
    and log-softmax run over chunks of tokens, each rematerialised: the [tokens, vocab] logits
    never exist whole."""
    B, T, D = x_BTD.shape
    target_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
    w_BT = jnp.concatenate([mask_BT[:, 1:], jnp.zeros((B, 1), mask_BT.dtype)], axis=1).astype(jnp.float32)
    N = B * T
    C = min(chunk, N)
    pad = (-N) % C
    x_ND = jnp.pad(x_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(target_BT.reshape(N), (0, pad))
    w_N = jnp.pad(w_BT.reshape(N), (0, pad))

    @jax.checkpoint
    def one(args):
        x_CD, t_C, w_C = args
        logits_CV = module.head(x_CD[None])[0]
        logp = jax.nn.log_softmax(logits_CV.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum(nll * w_C)

    K = (N + pad) // C
    sums = jax.lax.map(one, (x_ND.reshape(K, C, D), t_N.reshape(K, C), w_N.reshape(K, C)))
    return jnp.sum(sums), jnp.sum(w_N)


def adapter_nll(graphdef: nnx.GraphDef, base: nnx.State, adapters: Mapping, tokens_BT: jax.Array,
                mask_BT: jax.Array, dropout_key: jax.Array | None = None, *, remat: bool = True,
                loss_chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """(NLL sum, target count) of the LoRA model (graphdef from `lora.lora_graph`) on one batch."""
    module = nnx.merge(graphdef, base, nnx.State(dict(adapters)))
    x_BTD = module.train_hidden(tokens_BT, remat=remat, dropout_key=dropout_key)
    return head_nll(module, x_BTD, tokens_BT, mask_BT, loss_chunk)


@functools.lru_cache(maxsize=8)
def train_step_for(graphdef: nnx.GraphDef, tc: TrainConfig) -> Callable:
    """The compiled step for a LoRA graph and training config (cached: a resumed or repeated run in
    the same process reuses the compiled programs)."""
    return make_train_step(graphdef, tc.optimizer(), remat=tc.remat, loss_chunk=tc.loss_chunk)


@functools.lru_cache(maxsize=8)
def opt_init_for(tc: TrainConfig) -> Callable:
    """The optimizer's init, jitted (one compile, not one per leaf) and cached per config."""
    return jax.jit(tc.optimizer().init)


@functools.lru_cache(maxsize=8)
def eval_fn_for(graphdef: nnx.GraphDef, loss_chunk: int) -> Callable:
    return make_eval_fn(graphdef, loss_chunk=loss_chunk)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, remat: bool = True,
                    loss_chunk: int = 1024) -> Callable:
    """step(adapters, opt_state, base, tokens [M,B,T], mask [M,B,T], key) -> (adapters, opt_state, metrics).

    The M micro-batches' gradients are summed and divided by the total number of targets, so the
    update equals the one of a single batch of M*B rows. adapters and opt_state are donated."""

    def step(adapters, opt_state, base, tokens_MBT, mask_MBT, key):
        def micro(carry, xs):
            g_acc, s_acc, n_acc = carry
            tokens, mask, i = xs
            (s, n), g = jax.value_and_grad(
                lambda ad: adapter_nll(graphdef, base, ad, tokens, mask, jax.random.fold_in(key, i), remat=remat,
                                       loss_chunk=loss_chunk), has_aux=True)(adapters)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, adapters)
        M = tokens_MBT.shape[0]
        (g, s, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                    (tokens_MBT, mask_MBT, jnp.arange(M)))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        return adapters, opt_state, {"loss": s / n, "grad_norm": _tree_norm(grads), "targets": n}

    return _with_reference_attention(jax.jit(step, donate_argnums=(0, 1)))


def make_eval_fn(graphdef: nnx.GraphDef, *, loss_chunk: int = 1024) -> Callable:
    @jax.jit
    def evaluate(adapters, base, tokens_BT, mask_BT):
        return adapter_nll(graphdef, base, adapters, tokens_BT, mask_BT, None, remat=False, loss_chunk=loss_chunk)
    return _with_reference_attention(evaluate)


def evaluate_loss(eval_fn, adapters, base, examples, *, batch_size: int, seq_len: int, pad_id: int) -> float | None:
    """Mean NLL per target token over the held-out examples."""
    if not examples:
        return None
    s_tot, n_tot = 0.0, 0.0
    for tokens, mask in data_lib.eval_batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id):
        s, n = eval_fn(adapters, base, jnp.asarray(tokens), jnp.asarray(mask))
        s_tot += float(s)
        n_tot += float(n)
    return s_tot / max(n_tot, 1.0)


# ---- training an offloaded model: per-layer segments, experts streamed forward and backward ----------

def lora_layer_graph(cfg, kind: str, dtype, lcfg: LoRAConfig, sites) -> nnx.GraphDef:
    """One decoder layer's LoRA structure as the offloaded model holds it (MoE layers without their
    routed experts, which are streamed)."""
    from ktjax.models.deepseek import DecoderLayer

    def make():
        layer = DecoderLayer(cfg, kind, dtype=dtype, rngs=nnx.Rngs(0))
        if kind == "moe":
            layer.mlp.experts = None
        lora_lib.inject_layer(layer, [s for s in sites if s.group == kind], lcfg)
        return layer

    return nnx.split(nnx.eval_shape(make))[0]


def _lora_layer(gd, state, adapters, key):
    layer = nnx.merge(gd, state, nnx.State(dict(adapters)))
    lora_lib.prepare_layer(layer, key)
    return layer


def _attend_from_zero(layer, x_BTD, rope):
    B, T, _ = x_BTD.shape
    cfg = layer.self_attn.cfg
    out, _, _ = layer.attend(x_BTD, rope, jnp.zeros((B,), jnp.int32), jnp.zeros((B, T, cfg.kv_lora_rank), x_BTD.dtype),
                             jnp.zeros((B, T, cfg.qk_rope_head_dim), x_BTD.dtype))
    return out


def _dense_layer(gd, state, adapters, x_BTD, rope, key):
    layer = _lora_layer(gd, state, adapters, key)
    x_BTD = _attend_from_zero(layer, x_BTD, rope)
    return x_BTD + layer.mlp(layer.post_attention_layernorm(x_BTD))


def _moe_core(gd, state, adapters, x_BTD, rope, key, cfg):
    """A MoE layer without its routed experts: (x + attention + shared expert, normed h, routing
    weights), and the chosen expert ids as aux."""
    from ktjax.models.moe import route

    layer = _lora_layer(gd, state, adapters, key)
    x_BTD = _attend_from_zero(layer, x_BTD, rope)
    h_BTD = layer.post_attention_layernorm(x_BTD)
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    gate = layer.mlp.gate
    bias = None if gate.e_score_correction_bias is None else gate.e_score_correction_bias[...]
    weights_NK, idx_NK = route(h_ND, gate.weight[...], bias, cfg)
    y_BTD = x_BTD if layer.mlp.shared_experts is None else x_BTD + layer.mlp.shared_experts(h_BTD)
    return (y_BTD, h_ND, weights_NK), idx_NK


@functools.partial(jax.jit, static_argnums=0)
def dense_fwd_segment(gd, state, adapters, x_BTD, rope, key):
    return _dense_layer(gd, state, adapters, x_BTD, rope, key)


@functools.partial(jax.jit, static_argnums=0)
def dense_bwd_segment(gd, state, adapters, x_BTD, rope, key, dy_BTD):
    _, vjp = jax.vjp(lambda x, a: _dense_layer(gd, state, a, x, rope, key), x_BTD, adapters)
    return vjp(dy_BTD)


@functools.partial(jax.jit, static_argnums=(0, 6))
def moe_fwd_segment(gd, state, adapters, x_BTD, rope, key, cfg):
    (y, h, w), idx = _moe_core(gd, state, adapters, x_BTD, rope, key, cfg)
    return y, h, w, idx


@functools.partial(jax.jit, static_argnums=(0, 6))
def moe_bwd_segment(gd, state, adapters, x_BTD, rope, key, cfg, dy_BTD, dh_ND, dw_NK):
    _, vjp, _ = jax.vjp(lambda x, a: _moe_core(gd, state, a, x, rope, key, cfg), x_BTD, adapters, has_aux=True)
    return vjp((dy_BTD, dh_ND, dw_NK))


@functools.partial(jax.jit, static_argnames=("capacity",), donate_argnums=(0, 1))
def experts_bwd_segment(dh_ND, dw_NK, h_ND, weights_NK, idx_NK, ids_C, experts, dacc_ND, *, capacity: int):
    """Add a chunk of streamed experts' contribution to d h and d routing-weights (the experts are frozen)."""
    from ktjax.offload import experts_segment

    def f(h, w):
        return experts_segment(None, h, w, idx_NK, ids_C, experts, capacity=capacity)

    _, vjp = jax.vjp(f, h_ND, weights_NK)
    dh, dw = vjp(dacc_ND)
    return dh_ND + dh.astype(dh_ND.dtype), dw_NK + dw


class _Head:
    def __init__(self, norm_D, head_VD, eps):
        self.norm_D, self.head_VD, self.eps = norm_D, head_VD, eps

    def head(self, x_BTD):
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        x_BTD = self.norm_D.astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)
        return jnp.einsum("btd,vd->btv", x_BTD, self.head_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=(6,))
def head_loss_segment(norm_D, head_VD, eps, x_BTD, tokens_BT, mask_BT, chunk):
    return head_nll(_Head(norm_D, head_VD, eps), x_BTD, tokens_BT, mask_BT, chunk)


@functools.partial(jax.jit, static_argnums=(6,))
def head_bwd_segment(norm_D, head_VD, eps, x_BTD, tokens_BT, mask_BT, chunk):
    (s, n), vjp = jax.vjp(lambda x: head_nll(_Head(norm_D, head_VD, eps), x, tokens_BT, mask_BT, chunk), x_BTD)
    (dx,) = vjp((jnp.ones_like(s), jnp.zeros_like(n)))
    return s, n, dx


@jax.jit
def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, n: int) -> list:
    return [jax.tree.map(lambda a: a[j], tree) for j in range(n)]


@jax.jit
def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class OffloadedTrainer:
    """LoRA training of an `OffloadedModel`: core weights on the device, routed experts streamed from
    host memory in chunks, twice per step (forward, and again in the backward pass).

    Forward: per layer, one segment for attention + routing + shared expert, then the expert chunks
    (next chunk's transfer issued before the current chunk's compute); only each layer's input is
    kept. Backward, layers in reverse: recompute the layer's routing, stream its experts again and
    take each chunk's vjp (d h, d routing weights), then one segment for the vjp of attention +
    router + shared expert, which gives d x and the layer's adapter gradients. Each segment is a
    static-shape jitted program, as in inference. Routed-expert adapters are not supported here.

    Gradient accumulation is layer-major: a step's micro-batches go through each layer together,
    so each expert chunk, once on the device, serves all of them. The link carries the experts
    twice per step whatever the number of micro-batches.

    The layer inputs saved for the backward pass wait in pinned host memory, so device memory
    holds one layer's worth, not every layer's: at 2K tokens, 61 layers x 28 MiB per micro-batch
    (DeepSeek-V3). That costs 28 MiB each way per layer and micro-batch on the link, next to the
    gigabytes of experts that cross it per layer.
    """

    def __init__(self, model, lcfg: LoRAConfig, sites, tc: TrainConfig):
        if any(s.routed for s in sites):
            raise NotImplementedError("routed-expert adapters on an offloaded model are not supported; "
                                      "target attention, shared experts or dense MLPs")
        self.model, self.lcfg, self.tc = model, lcfg, tc
        self.cfg = model.config
        self.graphdefs = {k: lora_layer_graph(self.cfg, k, model.dtype, lcfg, sites) for k in set(self.cfg.layer_kinds)}
        from ktjax.models import group_layers
        self.position = {i: (g, j) for g, idx in group_layers(self.cfg).items() for j, i in enumerate(idx)}
        self.tx = tc.optimizer()
        self._update = jax.jit(self._apply_update, donate_argnums=(0, 1))
        self.saved_memory = jax.sharding.SingleDeviceSharding(model.device, memory_kind="pinned_host")

    # -- pieces --------------------------------------------------------------------------------
    def per_layer(self, adapters: Mapping) -> list[dict]:
        """The stacked adapters as one dict per decoder layer ({} where a layer has none)."""
        from ktjax.models import group_layers
        out: list[dict] = [{} for _ in self.cfg.layer_kinds]
        for g, idx in group_layers(self.cfg).items():
            group = adapters.get(lora_lib.GROUP_ATTR[g])
            if group is not None and idx:
                group = jax.device_put(group, self.model.on_device)  # one placement: one compiled variant
                for i, a in zip(idx, _unstack(group, len(idx))):
                    out[i] = a
        return out

    def _head(self):
        top = self.model.top
        head = top["embed_tokens"] if top.get("lm_head") is None else top["lm_head"]
        return top["norm"], head, jnp.float32(self.cfg.rms_norm_eps)

    def _stream(self, i: int, counts: list[np.ndarray], n_tokens: int, compute, accs: list) -> list:
        """One pass over layer i's experts serving every micro-batch: each chunk, once on the device,
        is computed for all of them. Capacity comes from the largest count over the micro-batches."""
        return self.model.stream_experts(i, np.max(counts, axis=0), n_tokens, compute, accs)

    # -- forward / backward -----------------------------------------------------------------------
    def _key(self, key, i):
        # No key without dropout: one compiled variant of each segment for training and evaluation.
        return lora_lib.layer_key(key, i) if self.lcfg.dropout > 0 and key is not None else None

    def forward(self, layer_adapters: list[dict], tokens: list, keys: list, *, save: bool = True):
        """Hidden states after the last layer for each micro-batch ([B, T] token arrays), and what
        the backward pass needs (each layer's inputs, rope, expert counts per MoE layer; no layer
        inputs without `save`). Layer by layer over all micro-batches, so each host expert crosses
        the link once per pass whatever their number. layer_adapters: `per_layer(adapters)`; keys:
        one per micro-batch (or None)."""
        from ktjax.offload import combine_segment, embed_segment, experts_segment
        m, cfg = self.model, self.cfg
        xs, rope = [], None
        for t in tokens:
            x, rope, _ = embed_segment(cfg, m.top["embed_tokens"], t, jnp.zeros((t.shape[0],), jnp.int32))
            xs.append(x)
        inputs, counts = [], {}
        for i, kind in enumerate(cfg.layer_kinds):
            if save:
                inputs.append(jax.device_put(xs, self.saved_memory))
            gd, state, a = self.graphdefs[kind], m.layers[i], layer_adapters[i]
            ks = [self._key(k, i) for k in keys]
            if kind == "dense":
                xs = [dense_fwd_segment(gd, state, a, x, rope, k) for x, k in zip(xs, ks)]
                continue
            outs = [moe_fwd_segment(gd, state, a, x, rope, k, cfg) for x, k in zip(xs, ks)]
            counts[i] = [np.bincount(np.asarray(idx).ravel(), minlength=cfg.n_routed_experts) for *_, idx in outs]

            def compute(accs, ids_C, slots, capacity, outs=outs):
                return [experts_segment(acc, h, w, idx, ids_C, slots, capacity=capacity)
                        for acc, (_, h, w, idx) in zip(accs, outs)]

            accs = self._stream(i, counts[i], outs[0][1].shape[0], compute, [None] * len(outs))
            xs = [combine_segment(y, acc) for (y, *_), acc in zip(outs, accs)]
        return xs, (inputs, rope, counts)

    def backward(self, adapters, layer_adapters, saved, dxs: list, keys: list):
        """Adapter gradients (stacked like `adapters`, summed over the micro-batches) given each
        micro-batch's d loss / d (last hidden states)."""
        m, cfg = self.model, self.cfg
        inputs, rope, counts = saved
        grads: dict[int, dict] = {}
        for i in reversed(range(len(cfg.layer_kinds))):
            kind = cfg.layer_kinds[i]
            gd, state, a = self.graphdefs[kind], m.layers[i], layer_adapters[i]
            ks = [self._key(k, i) for k in keys]
            xs = jax.device_put(inputs[i], m.on_device)
            if kind == "dense":
                res = [dense_bwd_segment(gd, state, a, x, rope, k, dx) for x, k, dx in zip(xs, ks, dxs)]
            else:
                outs = [moe_fwd_segment(gd, state, a, x, rope, k, cfg) for x, k in zip(xs, ks)]
                daccs = [dx.reshape(h.shape).astype(jnp.float32) for dx, (_, h, _, _) in zip(dxs, outs)]

                def compute(dh_dw, ids_C, slots, capacity, outs=outs, daccs=daccs):
                    return [experts_bwd_segment(*d, h, w, idx, ids_C, slots, dacc, capacity=capacity)
                            for d, (_, h, w, idx), dacc in zip(dh_dw, outs, daccs)]

                zeros = [(jnp.zeros_like(h), jnp.zeros_like(w)) for _, h, w, _ in outs]
                dhdw = self._stream(i, counts[i], outs[0][1].shape[0], compute, zeros)
                res = [moe_bwd_segment(gd, state, a, x, rope, k, cfg, dx, dh, dw)
                       for x, k, dx, (dh, dw) in zip(xs, ks, dxs, dhdw)]
            dxs = [dx for dx, _ in res]
            grads[i] = functools.reduce(_tree_add, [g for _, g in res])
        out = {}
        for name, group in adapters.items():
            g = {v: k for k, v in lora_lib.GROUP_ATTR.items()}[name]
            layers = sorted(i for i, (gg, _) in self.position.items() if gg == g)
            out[name] = _stack([grads[i] for i in layers])
        return out

    @_with_reference_attention
    def micro_loss_and_grads(self, adapters, tokens_MBT, mask_MBT, keys):
        """(NLL sum, target count, d NLL-sum / d adapters), summed over M micro-batches that share
        each expert transfer. keys: one per micro-batch, or None."""
        from ktjax.offload import StepStats
        self.model.last_step = StepStats()
        tokens = [jnp.asarray(t, jnp.int32) for t in tokens_MBT]
        masks = [jnp.asarray(mk) for mk in mask_MBT]
        keys = list(keys) if keys is not None else [None] * len(tokens)
        layer_adapters = self.per_layer(adapters)
        xs, saved = self.forward(layer_adapters, tokens, keys)
        head = [head_bwd_segment(*self._head(), x, t, mk, self.tc.loss_chunk) for x, t, mk in zip(xs, tokens, masks)]
        del xs
        s, n = sum(h[0] for h in head), sum(h[1] for h in head)
        return s, n, self.backward(adapters, layer_adapters, saved, [h[2] for h in head], keys)

    def loss_and_grads(self, adapters, tokens_BT, mask_BT, key=None):
        """(NLL sum, target count, d NLL-sum / d adapters) for one batch."""
        return self.micro_loss_and_grads(adapters, [tokens_BT], [mask_BT], [key])

    def _apply_update(self, adapters, opt_state, grad_sum, n):
        grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grad_sum)
        updates, opt_state = self.tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, _tree_norm(grads)

    def step(self, adapters, opt_state, base, tokens_MBT, mask_MBT, key):
        """The same contract as `make_train_step`'s step (base is unused: the model holds it). The
        micro-batches go through each layer together: the experts cross the link twice per step, not
        twice per micro-batch."""
        adapters, opt_state = jax.device_put((adapters, opt_state), self.model.on_device)  # one compiled update
        keys = [jax.random.fold_in(key, mb) for mb in range(tokens_MBT.shape[0])]
        s, n, g = self.micro_loss_and_grads(adapters, tokens_MBT, mask_MBT, keys)
        n = jnp.maximum(n, 1.0)
        adapters, opt_state, gnorm = self._update(adapters, opt_state, g, n)
        self.bytes_from_host = self.model.last_step.bytes_from_host
        return adapters, opt_state, {"loss": s / n, "grad_norm": gnorm, "targets": n}

    @_with_reference_attention
    def eval_nll(self, adapters, base, tokens_BT, mask_BT):
        tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
        xs, _ = self.forward(self.per_layer(adapters), [tokens_BT], [None], save=False)
        return head_loss_segment(*self._head(), xs[0], tokens_BT, jnp.asarray(mask_BT), self.tc.loss_chunk)


# ---- checkpoints ------------------------------------------------------------------------------------

class Checkpoints:
    """Orbax checkpoints of a run under DIR/checkpoints: {adapters, opt_state} and JSON metadata."""

    def __init__(self, directory: str, *, keep: int = 2):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, adapters, opt_state, meta: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"adapters": adapters, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())).meta

    def restore(self, step: int, adapters, opt_state):
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"adapters": adapters, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state["adapters"], out.state["opt_state"], out.meta

    def close(self) -> None:
        self.manager.close()


# ---- the API --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneResult:
    output: str  # the PEFT adapter directory (adapter_model.safetensors, adapter_config.json)
    steps: int  # steps done in total
    start_step: int  # where this call started (non-zero when it resumed)
    train_loss: float | None  # mean loss over the last logged steps of this call
    eval_loss: float | None  # held-out loss at the end (None without a held-out set)
    tokens: int  # non-padding tokens trained on in total
    seconds: float  # wall time of this call
    history: list[dict]  # per-step metrics of the whole run
    adapters: dict = dataclasses.field(repr=False)
    lora: LoRAConfig | None = None

    def apply(self, model):
        """`model` with the trained adapter (see `ktjax.lora.apply_adapter`)."""
        return lora_lib.apply_adapter(model, self.adapters, self.lora)


def is_offloaded(model) -> bool:
    return hasattr(model, "experts") and hasattr(model, "layers") and hasattr(model, "top")


def _show_progress(progress) -> bool:
    from ktjax.loading import _show_progress as show
    return show(progress)


def _load_model(model, *, dtype, gpu_memory, batch_size: int, seq_len: int, grad_accum: int):
    if isinstance(model, (str, os.PathLike)):
        import ktjax
        return ktjax.load(model, dtype=dtype, gpu_memory=gpu_memory, max_batch=batch_size, max_context=seq_len,
                          training=grad_accum)
    if model is None:
        raise ValueError("finetune: give a checkpoint directory or a loaded model")
    return model


def _check_training_room(plan, dtype, batch_size: int, seq_len: int, grad_accum: int) -> None:
    """Warn when an offloaded model's plan did not reserve a step's activations (it was loaded for
    serving, or for smaller steps): the step may then run out of device memory mid-run."""
    from ktjax.placement import fmt_bytes, training_nbytes
    need = training_nbytes(plan.config, batch_size, seq_len, dtype, grad_accum)
    if plan.budget is not None and plan.training_bytes < need:
        warnings.warn(f"the model's placement reserves {fmt_bytes(plan.training_bytes)} for training, but a step of "
                      f"{grad_accum} x {batch_size} x {seq_len} tokens needs {fmt_bytes(need)}: load it with "
                      f"ktjax.load(..., training={grad_accum}, max_batch={batch_size}, max_context={seq_len}) "
                      f"(or pass its path) to keep experts out of that room", stacklevel=3)


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def finetune(model, data, *, output: str | os.PathLike, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             lr: float = 2e-4, steps: int = 1000, batch_size: int = 4, seq_len: int = 1024, grad_accum: int = 1,
             warmup: int | None = None, targets: Sequence[str] | str = DEFAULT_TARGETS, seed: int = 0,
             gpu_memory: str | int | None = None, resume: bool = True, progress: bool | None = None,
             dtype: Any = None, eval_data=None, eval_fraction: float = 0.0, eval_every: int | None = None,
             save_every: int = 100, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
             min_lr_ratio: float = 0.0, remat: bool = True, callback: Callable[[dict], None] | None = None
             ) -> FinetuneResult:
    """LoRA-fine-tune a DeepSeek model on JSONL conversations and write a PEFT adapter to `output`.

    model: checkpoint directory (loaded with ktjax.load(dtype=..., gpu_memory=...)) or a loaded Model.
    data: JSONL file ({"messages": [...]}, {"prompt", "completion"} or {"text"} per line; see
        ktjax.data) or a list of such dicts. eval_data / eval_fraction: the held-out set.
    rank, alpha, dropout, targets: the adapters (see ktjax.lora.resolve_sites for target names).
    steps, batch_size (rows per micro-batch), grad_accum (micro-batches per step), seq_len (longest
        example; longer ones are cut), lr (peak; linear warmup over `warmup` steps, then cosine).
    output: the adapter directory; checkpoints go to output/checkpoints every `save_every` steps
        and at the end (and on Ctrl-C), and resume=True continues from the latest one.
    progress: a progress bar with loss, tokens/s and time left (default: when stderr is a terminal).
    callback(metrics): called after every step (metrics: step, loss, grad_norm, lr, tokens, seconds, ...).
    """
    t_start = time.perf_counter()
    output = os.fspath(output)
    lcfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
                     warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                     max_grad_norm=max_grad_norm, seed=seed, remat=remat)
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if isinstance(model, (str, os.PathLike)):  # check the data before a long load
        from ktjax.config import ModelConfig
        from ktjax.tokenizer import load_tokenizer
        tokenizer, vocab = load_tokenizer(model), ModelConfig.from_json(model).vocab_size
    else:
        tokenizer, vocab = getattr(model, "tokenizer", None), model.config.vocab_size
    ds = data_lib.load_dataset(data, tokenizer, seq_len=seq_len, eval_fraction=eval_fraction, eval_data=eval_data,
                               seed=seed, vocab_size=vocab)
    model = _load_model(model, dtype=dtype, gpu_memory=gpu_memory, batch_size=batch_size, seq_len=seq_len,
                        grad_accum=grad_accum)
    offloaded = is_offloaded(model)
    cfg = model.config
    if ds.truncated or ds.dropped:
        warnings.warn(f"{ds.source}: {ds.truncated} examples cut to seq_len={seq_len}, {ds.dropped} dropped "
                      "(no target token left)", stacklevel=2)
    pad_id = data_lib.pad_id_of(tokenizer)
    loader = data_lib.Loader(ds.train, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, seed=seed,
                             pad_id=pad_id)

    base = None if offloaded else lora_lib.base_params(model)
    sites = lora_lib.resolve_sites(cfg, lcfg.targets)
    graphdef, _ = lora_lib.lora_graph(cfg, model.dtype, lcfg, sites)
    trainer = OffloadedTrainer(model, lcfg, sites, tc) if offloaded else None
    if offloaded:
        _check_training_room(model.placement, model.dtype, batch_size, seq_len, grad_accum)
    root_key = jax.random.key(seed)
    adapters = lora_lib.init_adapters(cfg, lcfg, jax.random.fold_in(root_key, 0x10A), sites)
    # Committed to the device like the step's outputs, so the first step compiles the same program.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    adapters = jax.device_put(adapters, device)
    opt_state = jax.device_put(opt_init_for(tc)(adapters), device)

    os.makedirs(output, exist_ok=True)
    ckpt_dir = os.path.join(output, CHECKPOINTS)
    if not resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)
    ckpts = Checkpoints(ckpt_dir)
    run_meta = {"lora": lcfg.to_dict(), "train": dataclasses.asdict(tc), "data": ds.fingerprint(),
                "model": getattr(model, "path", None)}
    start, history, tokens_total = 0, [], 0
    latest = ckpts.latest_step() if resume else None
    if latest is not None:
        _check_resume(ckpts.meta(latest), run_meta, ckpt_dir)
        adapters, opt_state, meta = ckpts.restore(latest, adapters, opt_state)
        adapters, opt_state = jax.device_put((adapters, opt_state), device)
        start, history, tokens_total = int(meta["step"]), list(meta.get("history", [])), int(meta.get("tokens", 0))

    if trainer is not None:
        train_step, eval_fn = trainer.step, (trainer.eval_nll if ds.eval else None)
    else:
        train_step = train_step_for(graphdef, tc)
        eval_fn = eval_fn_for(graphdef, tc.loss_chunk) if ds.eval else None
    if eval_every is None:
        eval_every = max(1, steps // 5)
    schedule = tc.schedule()

    def save(step: int) -> None:
        meta = dict(run_meta, step=step, position=loader.position(step), tokens=tokens_total, history=history)
        ckpts.save(step, adapters, opt_state, meta)

    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not _show_progress(progress),
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    done = start
    first_new = len(history)
    try:
        with bar:
            for step in range(start, steps):
                batch = loader.batch(step)
                t0 = time.perf_counter()
                adapters, opt_state, m = train_step(adapters, opt_state, base, jnp.asarray(batch.tokens),
                                                    jnp.asarray(batch.mask), jax.random.fold_in(root_key, step))
                loss = float(m["loss"])  # waits for the step
                dt = time.perf_counter() - t0
                done = step + 1
                tokens_total += batch.real_tokens
                rec = {"step": done, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step)),
                       "tokens": batch.real_tokens, "targets": batch.targets, "seq_len": int(batch.tokens.shape[-1]),
                       "seconds": dt, "tokens_per_s": batch.real_tokens / dt if dt else 0.0}
                if trainer is not None:
                    rec["host_bytes"] = trainer.bytes_from_host
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {done}; lower the learning rate")
                if eval_fn is not None and (done % eval_every == 0 or done == steps):
                    rec["eval_loss"] = evaluate_loss(eval_fn, adapters, base, ds.eval, batch_size=batch_size,
                                                     seq_len=seq_len, pad_id=pad_id)
                history.append(rec)
                post = f"loss={loss:.4f}, {_fmt_rate(rec['tokens_per_s'])} tok/s"
                if "eval_loss" in rec:
                    post += f", eval={rec['eval_loss']:.4f}"
                bar.set_postfix_str(post, refresh=False)
                bar.update(1)
                if done % save_every == 0 or done == steps:
                    save(done)
                if callback is not None:
                    callback(dict(rec))
    except KeyboardInterrupt:
        # Keep what was done: the state after the last completed step, unless a step was cut mid-dispatch.
        leaves = jax.tree.leaves((adapters, opt_state))
        if done > start and not any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            if ckpts.latest_step() != done:
                save(done)
        ckpts.close()
        raise
    ckpts.close()

    lora_lib.save_adapter(output, cfg, adapters, lcfg, base_model_name_or_path=getattr(model, "path", None))
    new = history[first_new:]
    train_loss = float(np.mean([h["loss"] for h in new[-10:]])) if new else None
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    if eval_fn is not None and (not history or "eval_loss" not in history[-1]):
        eval_loss = evaluate_loss(eval_fn, adapters, base, ds.eval, batch_size=batch_size, seq_len=seq_len,
                                  pad_id=pad_id)
    result = FinetuneResult(output=output, steps=done, start_step=start, train_loss=train_loss, eval_loss=eval_loss,
                            tokens=tokens_total, seconds=time.perf_counter() - t_start, history=history,
                            adapters=jax.tree.map(np.asarray, adapters), lora=lcfg)
    with open(os.path.join(output, SUMMARY), "w", encoding="utf-8") as f:
        json.dump({f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                   if f.name not in ("adapters", "lora")}
                  | {"lora": lcfg.to_dict(), "train": dataclasses.asdict(tc)}, f, indent=1)
    return result


def _check_resume(meta: dict, run: dict, where: str) -> None:
    # What shapes the saved state: a mismatch cannot resume.
    fixed = [("lora", "rank"), ("lora", "targets"), ("train", "max_grad_norm")]
    for part, k in fixed:
        a, b = meta[part].get(k), run[part].get(k)
        if a != b and not (k == "max_grad_norm" and bool(a) == bool(b)):
            raise ValueError(f"{where}: the checkpoint has {k}={a!r}, this run {b!r}; use another output "
                             "directory or resume=False (--no-resume)")
    changed = [k for k in ("batch_size", "grad_accum", "seq_len", "seed", "steps", "lr", "warmup", "min_lr_ratio",
                           "weight_decay", "max_grad_norm")
               if meta["train"].get(k) != run["train"].get(k)]
    changed += [k for k in ("alpha", "dropout") if meta["lora"].get(k) != run["lora"].get(k)]
    if meta.get("data") != run["data"]:
        changed.append("data")
    if changed:
        warnings.warn(f"{where}: resuming with changed settings ({', '.join(changed)}); the run will not be "
                      "identical to an uninterrupted one", stacklevel=3)


def merge_to_checkpoint(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, output: str | os.PathLike, *,
                        dtype: Any = None) -> str:
    """Load a checkpoint, merge a PEFT LoRA adapter into its weights and save a transformers-format
    checkpoint (with the tokenizer files) to `output`: what `ktjax merge` does."""
    from ktjax.loading import load
    from ktjax.saving import save

    model = load(model_dir, dtype=dtype)  # resident: the merged weights are written whole
    merged = lora_lib.merge_adapter(model, adapter_dir)
    out = save(merged, output)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        src = os.path.join(os.fspath(model_dir), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    return out


# ---- CLI ------------------------------------------------------------------------------------------------

def add_finetune_parser(subparsers):
    p = subparsers.add_parser(
        "finetune", help="LoRA-fine-tune a model on a JSONL file and write a PEFT adapter",
        description="LoRA fine-tuning with Optax. Data: one JSON object per line, {\"messages\": [...]} (chat "
        "template; loss on the assistant turns), {\"prompt\": ..., \"completion\": ...} or {\"text\": ...}. Writes "
        "adapter_model.safetensors + adapter_config.json (PEFT format) to --output, with resumable checkpoints "
        "under OUTPUT/checkpoints.")
    p.add_argument("--model", metavar="DIR", required=True, help="base checkpoint directory (transformers format)")
    p.add_argument("--data", metavar="FILE", required=True, help="training data (JSONL)")
    p.add_argument("--output", metavar="DIR", required=True, help="adapter and checkpoint directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the base weights (default: the checkpoint's)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated modules to adapt: attention projection names, gate_proj/up_proj/down_proj, "
                        "dense_mlp, shared_experts, experts (routed), attention, all (default: the attention "
                        "projections)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1); with experts in host memory they share "
                   "each expert transfer, so more tokens per step cost little extra time")
    p.add_argument("--seq-len", type=int, default=1024, help="longest sequence; longer examples are cut (default 1024)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm; 0: off")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and dropout (default 0)")
    p.add_argument("--eval-data", metavar="FILE", default=None, help="held-out data (JSONL)")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of --data when --eval-data is not given (default 0)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default steps/5)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="device memory budget, e.g. 24GiB")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if OUTPUT/checkpoints has a checkpoint")
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args) -> int:
    r = finetune(args.model, args.data, output=args.output, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                 lr=args.lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                 grad_accum=args.grad_accum, warmup=args.warmup, targets=args.targets, seed=args.seed,
                 gpu_memory=args.gpu_memory, resume=args.resume, dtype=args.dtype, eval_data=args.eval_data,
                 eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every,
                 max_grad_norm=args.max_grad_norm or None, weight_decay=args.weight_decay)
    msg = f"adapter written to {r.output} ({r.steps} steps"
    if r.train_loss is not None:
        msg += f", train loss {r.train_loss:.4f}"
    if r.eval_loss is not None:
        msg += f", held-out loss {r.eval_loss:.4f}"
    print(msg + f", {r.seconds:.0f} s)", file=sys.stderr)
    return 0


def add_merge_parser(subparsers):
    p = subparsers.add_parser(
        "merge", help="merge a LoRA adapter into a model's weights and save the result",
        description="Add a PEFT LoRA adapter's updates to the base weights (W + alpha/r B A) and write an ordinary "
        "transformers-format checkpoint, tokenizer files included.")
    p.add_argument("--model", metavar="DIR", required=True, help="base checkpoint directory")
    p.add_argument("--adapter", metavar="DIR", required=True, help="PEFT adapter directory")
    p.add_argument("--output", metavar="DIR", required=True, help="where to write the merged checkpoint")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the merged weights (default: the checkpoint's)")
    p.set_defaults(func=cmd_merge)
    return p


def cmd_merge(args) -> int:
    out = merge_to_checkpoint(args.model, args.adapter, args.output, dtype=args.dtype)
    print(f"merged checkpoint written to {out}", file=sys.stderr)
    return 0


__all__ = ["FinetuneResult", "OffloadedTrainer", "TrainConfig", "add_finetune_parser", "add_merge_parser", "adapter_nll",
           "cmd_finetune", "cmd_merge", "finetune", "make_train_step", "merge_to_checkpoint"]
