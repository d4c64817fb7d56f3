"""LoRA adapters for ktjax's DeepSeek models: a separate pytree of low-rank factors, a LoRA-aware
forward, PEFT export / import, and merging into the base weights.

The adapters are a plain nested dict (float32), stacked like the model's layer groups:

    {"moe_layers": {"self_attn": {"q_a_proj": {"lora_a": [L, r, in], "lora_b": [L, out, r]}}, ...},
     "dense_layers": {...}}

Routed experts (target "experts") carry one factor pair per expert and projection:
``{"mlp": {"experts": {"gate_proj_lora_a": [L, E, r, D], "gate_proj_lora_b": [L, E, F, r], ...}}}``.

The forward with adapters is the model's own forward on a *LoRA graph*: the same module tree with
the target `Linear`s replaced by `LoRALinear`s that hold the base weight (frozen) and the factors
(`LoRAParam`), built abstractly with `nnx.eval_shape` so nothing is allocated. The model without
adapters is untouched, so its forward stays exactly what it was. Parameter paths of the base weights
are unchanged, so the LoRA graph merges with the model's own `params` plus the adapter dict.

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

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.models.deepseek import DeepseekForCausalLM, LayerCache, group_layers, layer_schedule
from ktjax.models.layers import Linear, linear
from ktjax.models.moe import Experts
from ktjax.models.rope import cos_sin

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION
# Linears whose weight the model reads directly instead of calling them: their LoRA delta is folded.
FOLDED_LINEARS = ("kv_b_proj",)
ALIASES = {
    "attention": tuple("self_attn." + p for p in ATTENTION),
    "dense_mlp": tuple("mlp." + p for p in MLP_PROJ),  # "mlp.gate_proj" is only the dense layers' MLP
    "shared_experts": tuple("mlp.shared_experts." + p for p in MLP_PROJ),
    "experts": tuple("mlp.experts." + p for p in MLP_PROJ),
    "routed_experts": tuple("mlp.experts." + p for p in MLP_PROJ),
}
GROUP_ATTR = {"dense": "dense_layers", "moe": "moe_layers"}


class LoRAParam(nnx.Param):
    """A trainable LoRA factor (everything else in a LoRA graph is a frozen base parameter)."""


# ---- configuration and target sites ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (scale alpha / r), dropout on the LoRA input, target modules (see `resolve_sites`)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("no LoRA target modules given")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module of a layer group: group "dense"/"moe" and its path inside a decoder layer,
    e.g. ("self_attn", "q_a_proj"), ("mlp", "shared_experts", "up_proj"), ("mlp", "experts", "down_proj")."""

    group: str
    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def routed(self) -> bool:
        return self.path[:2] == ("mlp", "experts")

    @property
    def folded(self) -> bool:
        return self.routed or self.path[-1] in FOLDED_LINEARS

    @property
    def a_path(self) -> tuple[str, ...]:
        if self.routed:
            return (GROUP_ATTR[self.group], "mlp", "experts", f"{self.path[2]}_lora_a")
        return (GROUP_ATTR[self.group], *self.path, "lora_a")

    @property
    def b_path(self) -> tuple[str, ...]:
        return self.a_path[:-1] + (self.a_path[-1][:-1] + "b",)


def candidate_sites(cfg: ModelConfig) -> list[Site]:
    """Every module of this model that can carry an adapter, in a fixed order."""
    present = {g for g in cfg.layer_kinds}
    attn = ("q_proj",) if cfg.q_lora_rank is None else ("q_a_proj", "q_b_proj")
    attn += ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    sites = []
    for g in ("dense", "moe"):
        if g not in present:
            continue
        sites += [Site(g, ("self_attn", p)) for p in attn]
        if g == "dense":
            sites += [Site(g, ("mlp", p)) for p in MLP_PROJ]
        else:
            if cfg.n_shared_experts:
                sites += [Site(g, ("mlp", "shared_experts", p)) for p in MLP_PROJ]
            sites += [Site(g, ("mlp", "experts", p)) for p in MLP_PROJ]
    return sites


def _known_names() -> set[str]:
    names = set(ATTENTION) | set(MLP_PROJ) | set(ALIASES) | {"all"}
    names |= {"self_attn." + p for p in ATTENTION} | {"mlp." + p for p in MLP_PROJ}
    names |= {f"mlp.{k}.{p}" for k in ("shared_experts", "experts") for p in MLP_PROJ}
    names |= {f"{k}.{p}" for k in ("shared_experts", "experts") for p in MLP_PROJ}
    return names


def resolve_sites(cfg: ModelConfig, targets: Iterable[str]) -> list[Site]:
    """The sites selected by target names.

    A name matches the modules whose dotted path inside a decoder layer equals it or ends with
    "." + it (PEFT's rule): "q_a_proj", "o_proj", "mlp.shared_experts.gate_proj", "experts.down_proj";
    "gate_proj" alone selects every gate_proj (dense MLPs, shared and routed experts). Aliases:
    "attention" (all attention projections), "dense_mlp", "shared_experts", "experts" (routed),
    "all". Names of modules this model lacks (q_proj in a model with q LoRA) are skipped; unknown
    names raise ValueError.
    """
    cands = candidate_sites(cfg)
    chosen: set[Site] = set()
    for t in targets:
        t = t.strip()
        if t == "all":
            chosen |= set(cands)
            continue
        if t in ALIASES:
            patterns = list(ALIASES[t])
        elif t in _known_names():
            patterns = [t]
        else:
            raise ValueError(f"unknown LoRA target {t!r}: use attention projection names ({', '.join(ATTENTION)}), "
                             f"gate_proj/up_proj/down_proj, shared_experts, dense_mlp, experts, attention or all")
        for pat in patterns:
            chosen |= {s for s in cands if s.name == pat or s.name.endswith("." + pat)}
    sites = [s for s in cands if s in chosen]
    if not sites:
        raise ValueError(f"LoRA targets {list(targets)} select no module of this model")
    return sites


# ---- LoRA modules ------------------------------------------------------------------------------

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


def scan_layers(stack: nnx.Module, x_BTD: jax.Array, rope, start_B: jax.Array, cache: LayerCache | None,
                first: int, count: int, *, remat: bool = False, dropout_key: jax.Array | None = None,
                model_layers: Sequence[int] | None = None):
    """Run `count` stacked (LoRA) layers from `first`, as `run_layers`, with the adapters prepared in
    each layer; remat=True rematerialises each layer in the backward pass (only its input is kept).
    cache=None runs from position 0 with a fresh per-layer cache (training) and returns only x.
    model_layers: the model-wide index of each layer of the stack (for per-layer dropout keys)."""
    graphdef, state = nnx.split(stack)
    total = jax.tree.leaves(state)[0].shape[0]
    if (first, count) != (0, total):
        state = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, first, first + count), state)
    B, T, _ = x_BTD.shape

    def one_layer(x, layer_state, latent, rp, model_layer):
        layer = nnx.merge(graphdef, layer_state)
        prepare_layer(layer, layer_key(dropout_key, model_layer))
        if latent is None:
            cfg = layer.self_attn.cfg
            latent = jnp.zeros((B, T, cfg.kv_lora_rank), x.dtype)
            rp = jnp.zeros((B, T, cfg.qk_rope_head_dim), x.dtype)
        return layer(x, rope, start_B, latent, rp)

    if remat:
        one_layer = jax.checkpoint(one_layer)
    layer_ids = first + jnp.arange(count)
    model_ids = jnp.asarray(model_layers[first:first + count] if model_layers is not None else layer_ids, jnp.int32)

    if cache is None:
        def body(x, xs):
            layer_state, _, m = xs
            return one_layer(x, layer_state, None, None, m)[0], None

        x_BTD, _ = jax.lax.scan(body, x_BTD, (state, layer_ids, model_ids))
        return x_BTD

    def body_cached(carry, xs):
        x, latent_L, rope_L = carry
        layer_state, i, m = xs
        x, lat, rp = one_layer(x, layer_state, latent_L[i], rope_L[i], m)
        latent_L = jax.lax.dynamic_update_index_in_dim(latent_L, lat, i, 0)
        rope_L = jax.lax.dynamic_update_index_in_dim(rope_L, rp, i, 0)
        return (x, latent_L, rope_L), None

    (x_BTD, latent, rope_c), _ = jax.lax.scan(body_cached, (x_BTD, cache.latent, cache.rope),
                                              (state, layer_ids, model_ids))
    return x_BTD, LayerCache(latent, rope_c)


class LoRACausalLM(DeepseekForCausalLM):
    """DeepseekForCausalLM whose stacked layers carry LoRA modules (built by `lora_graph`).

    Same interface as the base model: `__call__`/`hidden`/`head`, so the engine's compiled segments
    (prefill, decode, generation) run it unchanged."""

    def run_group(self, group, x_BTD, rope, start_B, cache, first, count):
        return scan_layers(self.layers(group), x_BTD, rope, start_B, cache, first, count,
                           model_layers=group_layers(self.cfg)[group])

    def train_hidden(self, tokens_BT, *, remat: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
        """Hidden states of a [B, T] chunk from position 0 (no cache kept), rematerialised per layer."""
        B, T = tokens_BT.shape
        start_B = jnp.zeros((B,), jnp.int32)
        rope = cos_sin(self.cfg, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T)))
        x_BTD = self.embed(tokens_BT)
        for group, first, count in layer_schedule(self.cfg):
            x_BTD = scan_layers(self.layers(group), x_BTD, rope, start_B, None, first, count, remat=remat,
                                dropout_key=dropout_key, model_layers=group_layers(self.cfg)[group])
        return x_BTD


# ---- building the LoRA graph and the adapters ------------------------------------------------

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


def lora_graph(cfg: ModelConfig, dtype: Any, lcfg: LoRAConfig, sites: Sequence[Site] | None = None
               ) -> tuple[nnx.GraphDef, dict]:
    """The LoRA model's structure (graphdef) and the adapters' abstract shapes (a nested dict of
    jax.ShapeDtypeStruct), without allocating anything."""
    sites = resolve_sites(cfg, lcfg.targets) if sites is None else sites

    def build():
        m = LoRACausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))
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
    for path, sds in sorted(_flatten(shapes).items()):
        if path[-1].endswith("lora_a"):
            bound = 1.0 / math.sqrt(sds.shape[-1])
            out[path] = rng.uniform(-bound, bound, sds.shape).astype(np.float32)
        else:
            out[path] = np.zeros(sds.shape, np.float32)
    return _unflatten(out)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def sites_of(adapters: Mapping) -> list[Site]:
    """The sites an adapter dict covers."""
    groups = {v: k for k, v in GROUP_ATTR.items()}
    sites = []
    for path in _flatten(adapters):
        if not path[-1].endswith("lora_a"):
            continue
        if path[-1] == "lora_a":
            sites.append(Site(groups[path[0]], tuple(path[1:-1])))
        else:
            sites.append(Site(groups[path[0]], tuple(path[1:-1]) + (path[-1][:-len("_lora_a")],)))
    return sites


# ---- models with adapters ----------------------------------------------------------------------

def _carry_extras(src, dst):
    """Attributes set on a loaded model after construction (placement, tokenizer)."""
    for k in ("placement", "tokenizer"):
        if hasattr(src, k):
            setattr(dst, k, getattr(src, k))
    return dst


def base_params(model) -> nnx.State:
    """The frozen base parameters of a (possibly adapted) resident model."""
    return model.base_params if getattr(model, "adapter", None) is not None else model.params


def apply_adapter(model, adapters: Mapping, lcfg: LoRAConfig):
    """A resident `Model` whose forward includes `adapters` (unmerged: the base weights are shared,
    the LoRA factors ride along in params). Runs anywhere the base model runs (ktjax.logits,
    generate, chat); save it with `merge_adapter` first."""
    from ktjax.loading import Model

    base = base_params(model)
    sites = sites_of(adapters)
    graphdef, shapes = lora_graph(model.config, model.dtype, lcfg, sites)
    _check_shapes(shapes, adapters)
    lora_state = nnx.State(jax.tree.map(jnp.asarray, dict(adapters)))
    merged = nnx.from_flat_state(list(nnx.to_flat_state(base)) + list(nnx.to_flat_state(
        _as_params(graphdef, base, lora_state))))
    out = Model(model.config, graphdef, merged, model.path)
    out.adapter = (dict(adapters), lcfg)
    out.base_params = base
    return _carry_extras(model, out)


def _as_params(graphdef, base, lora_state) -> nnx.State:
    # The LoRA leaves as Variables (LoRAParam), so the combined state is a normal model state.
    module = nnx.merge(graphdef, base, lora_state)
    _, lora, _ = nnx.split(module, LoRAParam, ...)
    return lora


def _check_shapes(shapes: Mapping, adapters: Mapping) -> None:
    want, got = _flatten(shapes), _flatten(adapters)
    if set(want) != set(got):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for p, sds in want.items():
        if tuple(got[p].shape) != tuple(sds.shape):
            raise ValueError(f"adapter tensor {'.'.join(p)} has shape {tuple(got[p].shape)}, "
                             f"the model needs {tuple(sds.shape)}")


def _weight_path(s: Site) -> tuple[str, ...]:
    """The base parameter a site's delta adds to (stacked over the group's layers)."""
    if s.routed:
        return (GROUP_ATTR[s.group], "mlp", "experts", s.path[2])
    return (GROUP_ATTR[s.group], *s.path, "weight")


@functools.partial(jax.jit, static_argnames=("scale", "stacked"))
def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, *, scale: float, stacked: bool) -> jax.Array:
    """W + s B A, added in float32 and cast back to W's dtype; a, b: [..., r, in], [..., out, r].
    stacked: w has a leading layer axis, merged one layer at a time (float32 temporaries of one layer)."""
    def one(args):
        w, a, b = args
        d = scale * jnp.einsum("...or,...ri->...oi", b.astype(jnp.float32), a.astype(jnp.float32))
        return (w.astype(jnp.float32) + d).astype(w.dtype)
    return jax.lax.map(one, (w, a, b)) if stacked else one((w, a, b))


def _get(tree: Mapping, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def merge_adapter(model, adapter: str | os.PathLike | tuple[Mapping, LoRAConfig] | None = None):
    """The base model with the adapter's deltas added to its weights (W + s B A, in float32, then
    cast to the weight's dtype): a plain `Model` (or `OffloadedModel`) that `ktjax.saving.save`
    writes as an ordinary checkpoint. `adapter`: a PEFT directory, an (adapters, LoRAConfig) pair,
    or None for the adapter already applied to `model`."""
    from ktjax.loading import Model

    if adapter is None:
        if getattr(model, "adapter", None) is None:
            raise ValueError("merge_adapter: the model has no adapter applied; pass one")
        adapters, lcfg = model.adapter
    elif isinstance(adapter, tuple):
        adapters, lcfg = adapter
    else:
        adapters, lcfg = read_adapter(adapter, model.config)
    sites = sites_of(adapters)
    if hasattr(model, "layers") and hasattr(model, "experts"):  # an OffloadedModel
        return _merge_offloaded(model, adapters, lcfg, sites)

    flat = list(nnx.to_flat_state(base_params(model)))
    where = {path: k for k, (path, _) in enumerate(flat)}
    for s in sites:
        k = where[_weight_path(s)]
        path, var = flat[k]
        flat[k] = (path, var.replace(merged_weight(var[...], _get(adapters, s.a_path), _get(adapters, s.b_path),
                                                   scale=float(lcfg.scale), stacked=True)))
    graphdef = model.graphdef if getattr(model, "adapter", None) is None else _plain_graphdef(model)
    out = Model(model.config, graphdef, nnx.from_flat_state(flat), model.path)
    return _carry_extras(model, out)


def _plain_graphdef(model) -> nnx.GraphDef:
    from ktjax.loading import abstract_model
    return abstract_model(model.config, model.dtype)[0]


def _merge_offloaded(model, adapters, lcfg: LoRAConfig, sites: Sequence[Site]):
    """Merge into an OffloadedModel's per-layer core weights (routed-expert deltas are not supported there)."""
    import copy

    if any(s.routed for s in sites):
        raise ValueError("merging routed-expert adapters into an offloaded model is not supported; "
                         "merge on a resident model (ktjax.load without gpu_memory) and save it")
    groups = group_layers(model.config)
    out = copy.copy(model)
    layers = list(model.layers)
    for s in sites:
        a, b = _get(adapters, s.a_path), _get(adapters, s.b_path)
        for j, i in enumerate(groups[s.group]):
            layers[i] = _replace_at(layers[i], s.path + ("weight",), lambda w: merged_weight(
                w, a[j], b[j], scale=float(lcfg.scale), stacked=False))
    out.layers = layers
    return out


def _replace_at(tree, path: Sequence[str], fn):
    """A copy of a layer's parameters (a plain nested dict or an nnx.State) with fn applied at path."""
    if isinstance(tree, nnx.State):
        flat = dict(nnx.to_flat_state(tree))
        flat[tuple(path)] = flat[tuple(path)].replace(fn(flat[tuple(path)][...]))
        return nnx.from_flat_state(list(flat.items()))
    out = dict(tree)
    out[path[0]] = fn(out[path[0]]) if len(path) == 1 else _replace_at(out[path[0]], path[1:], fn)
    return out


# ---- PEFT format ---------------------------------------------------------------------------------

def peft_names(cfg: ModelConfig, site: Site) -> list[tuple[str, tuple[int, ...]]]:
    """PEFT module names (without .lora_A.weight) of a site, with the index into the stacked factor."""
    layers = group_layers(cfg)[site.group]
    if site.routed:
        return [(f"base_model.model.model.layers.{i}.mlp.experts.{e}.{site.path[2]}", (j, e))
                for j, i in enumerate(layers) for e in range(cfg.n_routed_experts)]
    return [(f"base_model.model.model.layers.{i}.{site.name}", (j,)) for j, i in enumerate(layers)]


def peft_targets(sites: Sequence[Site]) -> tuple[list[str], list[str]]:
    """PEFT's (target_modules, target_parameters) for these sites, as PEFT on transformers 5 reads them.

    Attention projections are target_modules by name. Routed experts are written per expert with
    the published module names (model.layers.{i}.mlp.experts.{e}.gate_proj), so target_modules
    names gate_proj/up_proj/down_proj, which PEFT converts to transformers 5's fused expert tensors
    (it needs gate_proj and up_proj together). That conversion claims every module named
    gate/up/down_proj, so dense-MLP and shared-expert projections are given as target_parameters
    (their 2-D weights: same tensor names, same math without dropout).
    """
    modules = sorted({s.path[-1] for s in sites if s.path[0] == "self_attn" or s.routed})
    params = sorted({s.name + ".weight" for s in sites if s.path[0] == "mlp" and not s.routed})
    return modules, params


def save_adapter(path: str | os.PathLike, cfg: ModelConfig, adapters: Mapping, lcfg: LoRAConfig, *,
                 base_model_name_or_path: str | None = None) -> str:
    """Write `adapters` as a PEFT LoRA adapter directory: adapter_model.safetensors (names such as
    base_model.model.model.layers.{i}.self_attn.q_a_proj.lora_A.weight, [r, in] / lora_B [out, r],
    routed experts per expert as model.layers.{i}.mlp.experts.{e}.gate_proj) and adapter_config.json."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sites = sites_of(adapters)
    modules, params = peft_targets(sites)
    tensors: dict[str, np.ndarray] = {}
    for s in sites:
        a = np.asarray(_get(adapters, s.a_path), np.float32)
        b = np.asarray(_get(adapters, s.b_path), np.float32)
        for name, idx in peft_names(cfg, s):
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[idx])
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[idx])
    file = os.path.join(path, ADAPTER_WEIGHTS)
    save_file(tensors, file, metadata={"format": "pt"})
    os.chmod(file, 0o644)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lcfg.rank,
        "lora_alpha": int(lcfg.alpha) if float(lcfg.alpha).is_integer() else lcfg.alpha,
        # PEFT refuses dropout on parameter (and fused-expert) targets; it only matters for training.
        "lora_dropout": 0.0 if params or any(s.routed for s in sites) else lcfg.dropout,
        "target_modules": modules,
        "target_parameters": params or None,
        "use_rslora": lcfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return path


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+?)\.lora_([AB])(?:\.default)?\.weight$")


def read_adapter(path: str | os.PathLike, cfg: ModelConfig) -> tuple[dict, LoRAConfig]:
    """Read a PEFT LoRA adapter directory (ours or PEFT's) for a model with config `cfg`.

    Layers the adapter does not cover get zero factors (no change). Raises ValueError naming the
    file on anything this model cannot take (other PEFT types, DoRA, rank/alpha patterns, biases,
    unknown modules, shapes)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    w_file = os.path.join(path, ADAPTER_WEIGHTS)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise ValueError(f"{f}: not found (a PEFT adapter directory has {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: cannot read ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {conf.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora",):
        if conf.get(key):
            raise ValueError(f"{cfg_file}: {key}=true is not supported")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{cfg_file}: bias={conf.get('bias')!r} is not supported (only 'none')")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"{cfg_file}: rank_pattern / alpha_pattern are not supported")
    if conf.get("modules_to_save"):
        raise ValueError(f"{cfg_file}: modules_to_save is not supported")
    r = int(conf.get("r", 8))
    tensors = load_file(w_file)

    layer_pos = {i: (g, j) for g, idx in group_layers(cfg).items() for j, i in enumerate(idx)}
    cands = {(s.group, s.name): s for s in candidate_sites(cfg)}
    found: dict[Site, dict[str, dict[tuple[int, ...], np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{w_file}: tensor {key} is not a LoRA factor of a decoder layer module")
        i, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if i not in layer_pos:
            raise ValueError(f"{w_file}: tensor {key}: the model has no layer {i}")
        g, j = layer_pos[i]
        em = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$", mod)
        if em:
            e = int(em.group(1))
            if e >= cfg.n_routed_experts:
                raise ValueError(f"{w_file}: tensor {key}: the model has {cfg.n_routed_experts} experts")
            site, idx = cands.get((g, f"mlp.experts.{em.group(2)}")), (j, e)
        else:
            site, idx = cands.get((g, mod)), (j,)
        if site is None:
            raise ValueError(f"{w_file}: tensor {key}: no module {mod} in layer {i} of this model")
        found.setdefault(site, {"A": {}, "B": {}})[ab][idx] = value
    if not found:
        raise ValueError(f"{w_file}: no LoRA tensors")

    sites = [s for s in candidate_sites(cfg) if s in found]
    lcfg = LoRAConfig(rank=r, alpha=float(conf.get("lora_alpha", 8)), dropout=float(conf.get("lora_dropout", 0.0)),
                      targets=tuple(dict.fromkeys(s.name for s in sites)),
                      use_rslora=bool(conf.get("use_rslora", False)))
    _, shapes = lora_graph(cfg, jnp.float32, lcfg, sites)
    flat = {}
    for s in sites:
        for which, p in (("A", s.a_path), ("B", s.b_path)):
            sds = _get(shapes, p)
            arr = np.zeros(sds.shape, np.float32)
            inner = sds.shape[2:] if s.routed else sds.shape[1:]
            for idx, v in found[s][which].items():
                if tuple(v.shape) != tuple(inner):
                    raise ValueError(f"{w_file}: {s.name} lora_{which} has shape {tuple(v.shape)}, expected "
                                     f"{tuple(inner)} (r={r})")
                arr[idx] = np.asarray(v, np.float32)
            flat[p] = arr
    return _unflatten(flat), lcfg


def load_adapter(model, path: str | os.PathLike, *, merge: bool | None = None):
    """`model` with the PEFT adapter in directory `path` applied.

    Resident models keep the adapter separate (unmerged, exactly PEFT's forward) unless merge=True;
    offloaded models get it merged into their device-resident weights (merge=None picks this)."""
    adapters, lcfg = read_adapter(path, model.config)
    offloaded = hasattr(model, "experts") and hasattr(model, "layers")
    if merge is False and offloaded:
        raise ValueError("an offloaded model takes adapters merged only (merge=True or None)")
    if merge or offloaded:
        return merge_adapter(model, (adapters, lcfg))
    return apply_adapter(model, adapters, lcfg)


__all__ = [
    "DEFAULT_TARGETS", "LoRAConfig", "LoRACausalLM", "LoRAExperts", "LoRALinear", "LoRAParam", "Site",
    "apply_adapter", "candidate_sites", "init_adapters", "load_adapter", "lora_graph", "merge_adapter",
    "merged_weight", "read_adapter", "resolve_sites", "save_adapter", "scan_layers",
]
