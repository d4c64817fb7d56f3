"""Adapters joined to base weights: unmerged (the LoRA graph's parameters beside the base ones:
exactly PEFT's forward) or merged (W + s B A, in float32, cast back to W's dtype). Pure functions
over parameter pytrees; the executors apply them to what they hold."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.lora.config import GROUP_ATTR, LoRAConfig, Site, flatten, get_path, sites_of
from ktjax.lora.modules import LoRAParam, lora_graph


def check_shapes(shapes: Mapping, adapters: Mapping) -> None:
    want, got = flatten(shapes), flatten(adapters)
    if set(want) != set(got):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise ValueError(f"adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for p, sds in want.items():
        if tuple(got[p].shape) != tuple(sds.shape):
            raise ValueError(f"adapter tensor {'.'.join(p)} has shape {tuple(got[p].shape)}, "
                             f"the model needs {tuple(sds.shape)}")


def with_lora_params(cfg: ModelConfig, dtype, base: nnx.State, adapters: Mapping, lcfg: LoRAConfig, *,
                     attention: str = "auto") -> tuple[nnx.GraphDef, nnx.State]:
    """The LoRA graph and its parameters: the base state plus the factors as `LoRAParam`s."""
    graphdef, shapes = lora_graph(cfg, dtype, lcfg, sites_of(adapters), attention=attention)
    check_shapes(shapes, adapters)
    lora_state = nnx.State(jax.tree.map(jnp.asarray, dict(adapters)))
    _, lora, _ = nnx.split(nnx.merge(graphdef, base, lora_state), LoRAParam, ...)
    return graphdef, nnx.from_flat_state(list(nnx.to_flat_state(base)) + list(nnx.to_flat_state(lora)))


@functools.partial(jax.jit, static_argnames=("scale", "stacked"))
def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, *, scale: float, stacked: bool) -> jax.Array:
    """W + s B A, added in float32 and cast back to W's dtype; a, b: [..., r, in], [..., out, r].
    stacked: w has a leading layer axis, merged one layer at a time (float32 temporaries of one layer)."""
    def one(args):
        w, a, b = args
        d = scale * jnp.einsum("...or,...ri->...oi", b.astype(jnp.float32), a.astype(jnp.float32))
        return (w.astype(jnp.float32) + d).astype(w.dtype)
    return jax.lax.map(one, (w, a, b)) if stacked else one((w, a, b))


def weight_path(s: Site) -> tuple[str, ...]:
    """The base parameter a site's delta adds to (stacked over the group's layers)."""
    if s.routed:
        return (GROUP_ATTR[s.group], "mlp", "experts", s.path[2])
    return (GROUP_ATTR[s.group], *s.path, "weight")


def merge_stacked(base: nnx.State, adapters: Mapping, lcfg: LoRAConfig) -> nnx.State:
    """A stacked model state with the adapter's deltas added to its weights."""
    flat = list(nnx.to_flat_state(base))
    where = {path: k for k, (path, _) in enumerate(flat)}
    for s in sites_of(adapters):
        k = where[weight_path(s)]
        path, var = flat[k]
        flat[k] = (path, var.replace(merged_weight(var[...], get_path(adapters, s.a_path),
                                                   get_path(adapters, s.b_path), scale=float(lcfg.scale), stacked=True)))
    return nnx.from_flat_state(flat)


def merge_layers(cfg: ModelConfig, layers: Sequence[dict], adapters: Mapping, lcfg: LoRAConfig) -> list[dict]:
    """Per-layer parameter dicts (routed experts held apart) with the adapter's deltas added.
    Routed-expert deltas cannot be merged there: those experts are stored in their own format."""
    sites = sites_of(adapters)
    routed = sorted({s.name for s in sites if s.routed})
    if routed:
        raise ValueError(f"the adapter targets routed experts ({', '.join(routed)}), which an offloaded model "
                         "cannot merge; load the model with every expert on the device (no gpu_memory) to use it")
    layers = list(layers)
    for s in sites:
        a, b = get_path(adapters, s.a_path), get_path(adapters, s.b_path)
        for j, i in enumerate(cfg.layer_groups[s.group]):
            layers[i] = _replace_at(layers[i], s.path + ("weight",), lambda w, j=j: merged_weight(
                w, a[j], b[j], scale=float(lcfg.scale), stacked=False))
    return layers


def _replace_at(tree: dict, path: Sequence[str], fn) -> dict:
    """A copy of a layer's parameters (a plain nested dict) with fn applied at path."""
    out = dict(tree)
    out[path[0]] = fn(out[path[0]]) if len(path) == 1 else _replace_at(out[path[0]], path[1:], fn)
    return out
