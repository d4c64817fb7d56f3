"""LoRA training of an offloaded model: core weights on the device, routed experts streamed from
host memory in chunks, twice per step (forward, and again in the backward pass).

Forward: per layer, one segment for attention + routing + shared expert, then the expert chunks
(next chunk's transfer issued before the current chunk's compute); only each layer's input is
kept. Backward, layers in reverse: recompute the layer's routing, stream its experts again and take
each chunk's vjp (d h, d routing weights), then one segment for the vjp of attention + router +
shared expert, which gives d x and the layer's adapter gradients. The layer phases are the ones
inference composes (`ktjax.runtime.offload.segments`). Routed-expert adapters are not supported.

Gradient accumulation is layer-major: a step's micro-batches go through each layer together, so
each expert chunk, once on the device, serves all of them, and the link carries the experts twice
per step whatever the number of micro-batches. The layer inputs saved for the backward pass wait in
pinned host memory (28 MiB per layer and micro-batch at 2K tokens, against gigabytes of experts).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ktjax.experts.device import add_experts, experts_segment
from ktjax.lora.config import GROUP_ATTR, LoRAConfig
from ktjax.lora.modules import inject_layer, layer_key, prepare_layer
from ktjax.models import DecoderLayer, final_logits
from ktjax.runtime.model import StepStats
from ktjax.runtime.offload.segments import attend_fresh, combine_segment, dense_mlp, embed_segment, route, shared
from ktjax.train.config import TrainConfig, tree_norm
from ktjax.train.loss import head_nll


def lora_layer_graph(cfg, kind: str, dtype, lcfg: LoRAConfig, sites) -> nnx.GraphDef:
    """One decoder layer's LoRA structure as the offloaded model holds it (MoE layers without their
    routed experts, which are streamed); reference attention, which has a backward pass."""

    def make():
        layer = DecoderLayer(cfg, kind, dtype=dtype, rngs=nnx.Rngs(0), attention="reference")
        if kind == "moe":
            layer.mlp.experts = None
        inject_layer(layer, [s for s in sites if s.group == kind], lcfg)
        return layer

    return nnx.split(nnx.eval_shape(make))[0]


def _layer(gd, state, adapters, key) -> DecoderLayer:
    layer = nnx.merge(gd, state, nnx.State(dict(adapters)))
    prepare_layer(layer, key)
    return layer


def _dense(gd, state, adapters, x_BTD, rope, key):
    layer = _layer(gd, state, adapters, key)
    return dense_mlp(layer, attend_fresh(layer, x_BTD, rope))


def _moe_core(gd, state, adapters, x_BTD, rope, key):
    """A MoE layer up to its routed experts: (x after attention, shared expert, h, routing weights),
    and the chosen expert ids as aux."""
    layer = _layer(gd, state, adapters, key)
    x_BTD = attend_fresh(layer, x_BTD, rope)
    h_ND, w_NK, idx_NK = route(layer, x_BTD)
    return (x_BTD, shared(layer, h_ND), h_ND, w_NK), idx_NK


@functools.partial(jax.jit, static_argnums=0)
def dense_fwd_segment(gd, state, adapters, x_BTD, rope, key):
    return _dense(gd, state, adapters, x_BTD, rope, key)


@functools.partial(jax.jit, static_argnums=0)
def dense_bwd_segment(gd, state, adapters, x_BTD, rope, key, dy_BTD):
    _, vjp = jax.vjp(lambda x, a: _dense(gd, state, a, x, rope, key), x_BTD, adapters)
    return vjp(dy_BTD)


@functools.partial(jax.jit, static_argnums=0)
def moe_fwd_segment(gd, state, adapters, x_BTD, rope, key):
    return _moe_core(gd, state, adapters, x_BTD, rope, key)


@functools.partial(jax.jit, static_argnums=0)
def moe_bwd_segment(gd, state, adapters, x_BTD, rope, key, d_core):
    _, vjp, _ = jax.vjp(lambda x, a: _moe_core(gd, state, a, x, rope, key), x_BTD, adapters, has_aux=True)
    return vjp(d_core)


@jax.jit
def combine_bwd_segment(dy_BTD, shared_ND):
    """d (x, shared, routed) of the combine x + (routed + shared), which is linear."""
    dy_ND = dy_BTD.reshape(-1, dy_BTD.shape[-1])
    return dy_BTD, (None if shared_ND is None else dy_ND.astype(shared_ND.dtype)), dy_ND.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("capacity",), donate_argnums=(0, 1))
def experts_bwd_segment(dh_ND, dw_NK, h_ND, weights_NK, idx_NK, ids_C, experts, dacc_ND, *, capacity: int):
    """Add a chunk of streamed experts' contribution to d h and d routing-weights (the experts are frozen)."""
    _, vjp = jax.vjp(lambda h, w: add_experts(None, h, w, idx_NK, ids_C, experts, capacity=capacity),
                     h_ND, weights_NK)
    dh, dw = vjp(dacc_ND)
    return dh_ND + dh.astype(dh_ND.dtype), dw_NK + dw


@functools.partial(jax.jit, static_argnums=(2, 6))
def head_loss_segment(norm_D, head_VD, eps: float, x_BTD, tokens_BT, mask_BT, chunk: int):
    return head_nll(functools.partial(final_logits, norm_D, head_VD, eps), x_BTD, tokens_BT, mask_BT, chunk)


@functools.partial(jax.jit, static_argnums=(2, 6))
def head_bwd_segment(norm_D, head_VD, eps: float, x_BTD, tokens_BT, mask_BT, chunk: int):
    head = functools.partial(final_logits, norm_D, head_VD, eps)
    (s, n), vjp = jax.vjp(lambda x: head_nll(head, x, tokens_BT, mask_BT, chunk), x_BTD)
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
    """The training step and held-out loss of an offloaded model's LoRA adapters (see the module doc)."""

    def __init__(self, executor, lcfg: LoRAConfig, sites, tc: TrainConfig):
        routed = sorted({s.name for s in sites if s.routed})
        if routed:
            raise ValueError(f"LoRA targets {', '.join(routed)} are routed experts, which an offloaded model cannot "
                             "train (they live in host memory, possibly quantized); target attention, shared_experts "
                             "or dense_mlp, or load the model with every expert on the device")
        self.ex, self.lcfg, self.tc = executor, lcfg, tc
        self.cfg = executor.config
        self.graphdefs = {k: lora_layer_graph(self.cfg, k, executor.dtype, lcfg, sites) for k in set(self.cfg.layer_kinds)}
        self.tx = tc.optimizer()
        self._update = jax.jit(self._apply_update, donate_argnums=(0, 1))
        self.saved_memory = executor.store.on_host

    # -- pieces ---------------------------------------------------------------------------------
    def per_layer(self, adapters: Mapping) -> list[dict]:
        """The stacked adapters as one dict per decoder layer ({} where a layer has none)."""
        out: list[dict] = [{} for _ in self.cfg.layer_kinds]
        for g, idx in self.cfg.layer_groups.items():
            group = adapters.get(GROUP_ATTR[g])
            if group is not None and idx:
                group = jax.device_put(group, self.ex.store.on_device)  # one placement: one compiled variant
                for i, a in zip(idx, _unstack(group, len(idx))):
                    out[i] = a
        return out

    def _head(self):
        return self.ex.top["norm"], self.ex.head_weight, self.cfg.rms_norm_eps

    def _key(self, key, i):
        # No key without dropout: one compiled variant of each segment for training and evaluation.
        return layer_key(key, i) if self.lcfg.dropout > 0 and key is not None else None

    def _stream(self, i: int, counts: list[np.ndarray], n_tokens: int, compute, accs: list, stats: StepStats) -> list:
        """One pass over layer i's experts serving every micro-batch: each chunk, once on the device,
        is computed for all of them. Capacity comes from the largest count over the micro-batches."""
        return self.ex.store.stream(i, np.max(counts, axis=0), n_tokens, compute, accs, stats)

    # -- forward / backward -------------------------------------------------------------------------
    def forward(self, layer_adapters: list[dict], tokens: list, keys: list, stats: StepStats, *, save: bool = True):
        """Hidden states after the last layer for each micro-batch ([B, T] token arrays), and what
        the backward pass needs (each layer's inputs, rope, expert counts per MoE layer; no layer
        inputs without `save`). Layer by layer over all micro-batches."""
        ex, cfg = self.ex, self.cfg
        xs, rope = [], None
        for t in tokens:
            x, rope, _ = embed_segment(cfg, ex.top["embed_tokens"], t, jnp.zeros((t.shape[0],), jnp.int32))
            xs.append(x)
        inputs, counts = [], {}
        for i, kind in enumerate(cfg.layer_kinds):
            if save:
                inputs.append(jax.device_put(xs, self.saved_memory))
            gd, state, a = self.graphdefs[kind], ex.layers[i], layer_adapters[i]
            ks = [self._key(k, i) for k in keys]
            if kind == "dense":
                xs = [dense_fwd_segment(gd, state, a, x, rope, k) for x, k in zip(xs, ks)]
                continue
            outs = [moe_fwd_segment(gd, state, a, x, rope, k) for x, k in zip(xs, ks)]
            counts[i] = [np.bincount(np.asarray(idx).ravel(), minlength=cfg.n_routed_experts) for _, idx in outs]

            def compute(accs, ids_C, slots, capacity, outs=outs):
                return [experts_segment(acc, h, w, idx, ids_C, slots, capacity=capacity)
                        for acc, ((_, _, h, w), idx) in zip(accs, outs)]

            accs = self._stream(i, counts[i], outs[0][0][2].shape[0], compute, [None] * len(outs), stats)
            xs = [combine_segment(x_attn, sh, (acc,)) for ((x_attn, sh, _, _), _), acc in zip(outs, accs)]
        return xs, (inputs, rope, counts)

    def backward(self, adapters, layer_adapters, saved, dxs: list, keys: list, stats: StepStats):
        """Adapter gradients (stacked like `adapters`, summed over the micro-batches) given each
        micro-batch's d loss / d (last hidden states)."""
        ex, cfg = self.ex, self.cfg
        inputs, rope, counts = saved
        grads: dict[int, dict] = {}
        for i in reversed(range(len(cfg.layer_kinds))):
            kind = cfg.layer_kinds[i]
            gd, state, a = self.graphdefs[kind], ex.layers[i], layer_adapters[i]
            ks = [self._key(k, i) for k in keys]
            xs = jax.device_put(inputs[i], ex.store.on_device)
            if kind == "dense":
                res = [dense_bwd_segment(gd, state, a, x, rope, k, dx) for x, k, dx in zip(xs, ks, dxs)]
            else:
                outs = [moe_fwd_segment(gd, state, a, x, rope, k) for x, k in zip(xs, ks)]
                d_combine = [combine_bwd_segment(dx, sh) for dx, ((_, sh, _, _), _) in zip(dxs, outs)]

                def compute(dh_dw, ids_C, slots, capacity, outs=outs, d_combine=d_combine):
                    return [experts_bwd_segment(*d, h, w, idx, ids_C, slots, dacc, capacity=capacity)
                            for d, ((_, _, h, w), idx), (_, _, dacc) in zip(dh_dw, outs, d_combine)]

                zeros = [(jnp.zeros_like(h), jnp.zeros_like(w)) for (_, _, h, w), _ in outs]
                dhdw = self._stream(i, counts[i], outs[0][0][2].shape[0], compute, zeros, stats)
                res = [moe_bwd_segment(gd, state, a, x, rope, k, (dxa, dsh, dh, dw))
                       for x, k, (dxa, dsh, _), (dh, dw) in zip(xs, ks, d_combine, dhdw)]
            dxs = [dx for dx, _ in res]
            grads[i] = functools.reduce(_tree_add, [g for _, g in res])
        out = {}
        for name in adapters:
            group = {v: k for k, v in GROUP_ATTR.items()}[name]
            out[name] = _stack([grads[i] for i in cfg.layer_groups[group]])
        return out

    def micro_loss_and_grads(self, adapters, tokens_MBT, mask_MBT, keys):
        """(NLL sum, target count, d NLL-sum / d adapters, step stats), summed over M micro-batches
        that share each expert transfer. keys: one per micro-batch, or None."""
        stats = StepStats()
        tokens = [jnp.asarray(t, jnp.int32) for t in tokens_MBT]
        masks = [jnp.asarray(mk) for mk in mask_MBT]
        keys = list(keys) if keys is not None else [None] * len(tokens)
        layer_adapters = self.per_layer(adapters)
        xs, saved = self.forward(layer_adapters, tokens, keys, stats)
        head = [head_bwd_segment(*self._head(), x, t, mk, self.tc.loss_chunk) for x, t, mk in zip(xs, tokens, masks)]
        del xs
        s, n = sum(h[0] for h in head), sum(h[1] for h in head)
        return s, n, self.backward(adapters, layer_adapters, saved, [h[2] for h in head], keys, stats), stats

    def _apply_update(self, adapters, opt_state, grad_sum, n):
        grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grad_sum)
        updates, opt_state = self.tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, tree_norm(grads)

    def step(self, adapters, opt_state, tokens_MBT, mask_MBT, key):
        """adapters, opt_state, metrics after one optimizer step (the contract of the resident
        step): the micro-batches go through each layer together."""
        adapters, opt_state = jax.device_put((adapters, opt_state), self.ex.store.on_device)  # one compiled update
        keys = [jax.random.fold_in(key, mb) for mb in range(tokens_MBT.shape[0])]
        s, n, g, stats = self.micro_loss_and_grads(adapters, tokens_MBT, mask_MBT, keys)
        n = jnp.maximum(n, 1.0)
        adapters, opt_state, gnorm = self._update(adapters, opt_state, g, n)
        return adapters, opt_state, {"loss": s / n, "grad_norm": gnorm, "targets": n, "host_bytes": stats.bytes_from_host}

    def eval_nll(self, adapters, tokens_BT, mask_BT):
        tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
        xs, _ = self.forward(self.per_layer(adapters), [tokens_BT], [None], StepStats(), save=False)
        return head_loss_segment(*self._head(), xs[0], tokens_BT, jnp.asarray(mask_BT), self.tc.loss_chunk)
