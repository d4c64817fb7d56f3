"""LoRA as modules: the model's own forward on a *LoRA graph*, the same module tree with the target
`Linear`s replaced by `LoRALinear`s that hold the base weight (frozen) and the factors (`LoRAParam`),
built abstractly with `nnx.eval_shape` so nothing is allocated. Parameter paths of the base weights
are unchanged, so a LoRA graph merges with a model's own parameters plus the adapter dict.

Two kinds of target:
  * called projections (q_a/q_b/q_proj, kv_a_proj_with_mqa, o_proj, dense MLP and shared-expert
    projections): y = x W^T + s * (dropout(x) A^T) B^T, as PEFT's `lora.Linear`;
  * weights the model reads directly (kv_b_proj, which MLA absorbs into the query/output, and the
    stacked routed experts): the delta s * B A is folded into the weight inside the layer, per layer
    (as PEFT's `ParamWrapper` does for the experts). Dropout is not applied on these (PEFT refuses
    dropout on ParamWrapper targets; for kv_b_proj PEFT would drop its input on the LoRA path).

s = alpha / r (alpha / sqrt(r) with use_rslora).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.lora.config import FOLDED_LINEARS, LoRAConfig, Site, flatten, resolve_sites, unflatten
from ktjax.models import DeepseekForCausalLM
from ktjax.models.layers import Linear, linear
from ktjax.models.moe import Experts


class LoRAParam(nnx.Param):
    """A trainable LoRA factor (everything else in a LoRA graph is a frozen base parameter)."""


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class LoRALinear(Linear):
    """A `Linear` plus a low-rank update: y = x W^T + b + s * (dropout(x) A^T) B^T.

    A [r, in] and B [out, r] are `LoRAParam`s (kept in float32, cast to the compute dtype).
    `folded` ones (kv_b_proj) have their delta added to the weight by `prepare_layer` instead.
    """

    def __init__(self, weight: nnx.Param, bias: nnx.Param | None, lora_a: LoRAParam, lora_b: LoRAParam, *,
                 scale: float, dropout: float, folded: bool):
        self.weight = weight
        self.bias = bias
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.dropout = dropout
        self.folded = folded
        self.dropout_key = None  # set per call by `prepare_layer` while training

    def delta(self) -> jax.Array:
        """s * B A, float32 [out, in]."""
        return self.scale * jnp.einsum("or,ri->oi", self.lora_b[...].astype(jnp.float32),
                                       self.lora_a[...].astype(jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.folded:
            return y
        h = _dropout(x, self.dropout, self.dropout_key)
        z = linear(linear(h, self.lora_a[...]), self.lora_b[...])
        return y + (self.scale * z.astype(jnp.float32)).astype(y.dtype)


class LoRAExperts(Experts):
    """Routed experts with per-expert factors for some of gate_proj / up_proj / down_proj
    (attributes `{proj}_lora_a` [E, r, in], `{proj}_lora_b` [E, out, r]), folded per layer."""

    def __init__(self, base: Experts, factors: Mapping[str, tuple[LoRAParam, LoRAParam]], *, scale: float):
        self.gate_proj, self.up_proj, self.down_proj = base.gate_proj, base.up_proj, base.down_proj
        for proj, (a, b) in factors.items():
            setattr(self, f"{proj}_lora_a", a)
            setattr(self, f"{proj}_lora_b", b)
        self.lora_projections = tuple(factors)
        self.scale = scale


def _fold(weight: nnx.Variable, delta_f32: jax.Array) -> None:
    w = weight.get_value()
    weight.set_value((w.astype(jnp.float32) + delta_f32).astype(w.dtype))


def prepare_layer(layer: nnx.Module, dropout_key: jax.Array | None = None) -> None:
    """Make a freshly merged decoder layer (one slice of a LoRA stack) compute with its adapters:
    fold the deltas of directly-read weights into them and hand each LoRALinear its dropout key."""
    j = 0
    for _, node in nnx.iter_graph(layer):
        if isinstance(node, LoRALinear):
            if node.folded:
                _fold(node.weight, node.delta())
            elif dropout_key is not None and node.dropout > 0.0:
                object.__setattr__(node, "dropout_key", jax.random.fold_in(dropout_key, j))
            j += 1
        elif isinstance(node, LoRAExperts):
            for proj in node.lora_projections:
                a = getattr(node, f"{proj}_lora_a")[...].astype(jnp.float32)
                b = getattr(node, f"{proj}_lora_b")[...].astype(jnp.float32)
                _fold(getattr(node, proj), node.scale * jnp.einsum("eor,eri->eoi", b, a))


def layer_key(dropout_key: jax.Array | None, layer: jax.Array | int) -> jax.Array | None:
    """The dropout key of decoder layer `layer` (its index in the model) for a step's key."""
    return None if dropout_key is None else jax.random.fold_in(dropout_key, layer)


class LoRACausalLM(DeepseekForCausalLM):
    """DeepseekForCausalLM whose stacked layers carry LoRA modules (built by `lora_graph`); the
    base model's forward, with each layer's adapters prepared as the scan merges it."""

    def prepare_layer(self, layer, model_layer, dropout_key):
        prepare_layer(layer, layer_key(dropout_key, model_layer))


def _shape_of(stack: nnx.Module, path: Sequence[str]):
    node = stack
    for p in path:
        node = getattr(node, p)
    return node


def _inject(module: DeepseekForCausalLM, sites: Sequence[Site], lcfg: LoRAConfig) -> None:
    """Replace the target modules of a (possibly abstract) model with their LoRA versions, in place."""
    for group in {s.group for s in sites}:
        inject_layer(module.layers(group), [s for s in sites if s.group == group], lcfg)


def inject_layer(layer: nnx.Module, sites: Sequence[Site], lcfg: LoRAConfig) -> None:
    """Give a decoder layer -- a stack of them (leading layer axis) or a single one -- LoRA modules
    at `sites` (zero factors of the right shapes; abstract under nnx.eval_shape)."""
    r = lcfg.rank
    routed: dict[str, tuple[LoRAParam, LoRAParam]] = {}
    for s in sites:
        if s.routed:
            w = getattr(layer.mlp.experts, s.path[2])  # [..., E, out, in]
            *lead, O, I = w.shape
            routed[s.path[2]] = (LoRAParam(jnp.zeros((*lead, r, I), jnp.float32)),
                                 LoRAParam(jnp.zeros((*lead, O, r), jnp.float32)))
            continue
        parent = _shape_of(layer, s.path[:-1])
        base = getattr(parent, s.path[-1])
        *lead, O, I = base.weight.shape
        setattr(parent, s.path[-1], LoRALinear(
            base.weight, base.bias, LoRAParam(jnp.zeros((*lead, r, I), jnp.float32)),
            LoRAParam(jnp.zeros((*lead, O, r), jnp.float32)), scale=lcfg.scale, dropout=lcfg.dropout,
            folded=s.path[-1] in FOLDED_LINEARS))
    if routed:
        layer.mlp.experts = LoRAExperts(layer.mlp.experts, routed, scale=lcfg.scale)


def lora_graph(cfg: ModelConfig, dtype: Any, lcfg: LoRAConfig, sites: Sequence[Site] | None = None, *,
               attention: str = "auto") -> tuple[nnx.GraphDef, dict]:
    """The LoRA model's structure (graphdef) and the adapters' abstract shapes (a nested dict of
    jax.ShapeDtypeStruct), without allocating anything. Training needs attention="reference" (the
    Pallas kernels have no backward pass)."""
    sites = resolve_sites(cfg, lcfg.targets) if sites is None else sites

    def build():
        m = LoRACausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), attention=attention)
        _inject(m, sites, lcfg)
        return m

    graphdef, lora_state, _ = nnx.split(nnx.eval_shape(build), LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(lora_state)


def init_adapters(cfg: ModelConfig, lcfg: LoRAConfig, key: jax.Array | int, sites: Sequence[Site] | None = None
                  ) -> dict:
    """Fresh adapters as PEFT initialises them: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
    a=sqrt(5)), B = 0, so the adapted model starts equal to the base model. float32 numpy arrays,
    a pure function of `key` (a jax key or an int seed)."""
    _, shapes = lora_graph(cfg, jnp.float32, lcfg, sites)
    seed = int(key) if isinstance(key, (int, np.integer)) else np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng(seed)
    out = {}
    for path, sds in sorted(flatten(shapes).items()):
        if path[-1].endswith("lora_a"):
            bound = 1.0 / math.sqrt(sds.shape[-1])
            out[path] = rng.uniform(-bound, bound, sds.shape).astype(np.float32)
        else:
            out[path] = np.zeros(sds.shape, np.float32)
    return unflatten(out)

