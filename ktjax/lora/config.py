"""What a LoRA adapter adapts: its configuration and the sites (modules of a layer group) it targets.

Adapters are a plain nested dict of float32 factors, stacked like the model's layer groups:

    {"moe_layers": {"self_attn": {"q_a_proj": {"lora_a": [L, r, in], "lora_b": [L, out, r]}}, ...},
     "dense_layers": {...}}

Routed experts (target "experts") carry one factor pair per expert and projection:
``{"mlp": {"experts": {"gate_proj_lora_a": [L, E, r, D], "gate_proj_lora_b": [L, E, F, r], ...}}}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ktjax.config import ModelConfig

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


def sites_of(adapters: Mapping) -> list[Site]:
    """The sites an adapter dict covers."""
    groups = {v: k for k, v in GROUP_ATTR.items()}
    sites = []
    for path in flatten(adapters):
        if not path[-1].endswith("lora_a"):
            continue
        if path[-1] == "lora_a":
            sites.append(Site(groups[path[0]], tuple(path[1:-1])))
        else:
            sites.append(Site(groups[path[0]], tuple(path[1:-1]) + (path[-1][:-len("_lora_a")],)))
    return sites


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def get_path(tree: Mapping, path: Iterable[str]):
    for p in path:
        tree = tree[p]
    return tree
