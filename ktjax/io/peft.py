"""PEFT's LoRA adapter format: adapter_model.safetensors (names such as
base_model.model.model.layers.{i}.self_attn.q_a_proj.lora_A.weight, [r, in] / lora_B [out, r];
routed experts per expert as model.layers.{i}.mlp.experts.{e}.gate_proj) and adapter_config.json,
read and written so PEFT and ktjax load each other's adapters."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from ktjax.config import ModelConfig
from ktjax.lora.config import LoRAConfig, Site, candidate_sites, get_path, sites_of, unflatten
from ktjax.lora.modules import lora_graph

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_names(cfg: ModelConfig, site: Site) -> list[tuple[str, tuple[int, ...]]]:
    """PEFT module names (without .lora_A.weight) of a site, with the index into the stacked factor."""
    layers = cfg.layer_groups[site.group]
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
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sites = sites_of(adapters)
    modules, params = peft_targets(sites)
    tensors: dict[str, np.ndarray] = {}
    for s in sites:
        a = np.asarray(get_path(adapters, s.a_path), np.float32)
        b = np.asarray(get_path(adapters, s.b_path), np.float32)
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

    layer_pos = {i: (g, j) for g, idx in cfg.layer_groups.items() for j, i in enumerate(idx)}
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
            sds = get_path(shapes, p)
            arr = np.zeros(sds.shape, np.float32)
            inner = sds.shape[2:] if s.routed else sds.shape[1:]
            for idx, v in found[s][which].items():
                if tuple(v.shape) != tuple(inner):
                    raise ValueError(f"{w_file}: {s.name} lora_{which} has shape {tuple(v.shape)}, expected "
                                     f"{tuple(inner)} (r={r})")
                arr[idx] = np.asarray(v, np.float32)
            flat[p] = arr
    return unflatten(flat), lcfg
