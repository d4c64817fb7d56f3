"""Where each parameter lives: a plan computed from rules and a GPU memory budget, before any
weight is loaded.

Core parameters (attention, norms, router, shared experts, dense MLPs, embeddings, LM head), the KV
cache and the workspace of the compiled segments always live on the device. Routed experts live,
one expert of one layer at a time, either on the device or in `pinned_host` memory, in the expert
format the model keeps them in (what the plan counts is what is loaded). Rules match expert names
as the checkpoint spells them, `model.layers.{i}.mlp.experts.{e}`; first match wins. Experts the
budget still has room for fill it in order of preference: most used first where routing counts
are known, else spread evenly over the layers (the host-CPU and link paths of a layer run side by
side, so each layer should keep a similar share of its experts on the device).

Over several devices (expert parallelism, `devices` > 1), device d owns the contiguous block of
experts d*E/n .. (d+1)*E/n - 1 of every MoE layer, the budget is per device, and each device's own
experts fill its free room; core parameters, KV cache and workspace are replicated on every device
(attention is not split: replicated, it keeps the MLA kernels and cache layout of one device and
adds no collective beyond the one sum per MoE layer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.experts.weights import ExpertFormat
from ktjax.kernels.reference import PREFILL_BLOCK_Q

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
HOST, DEVICE = "host", "device"
QUERY_CHUNK = 512  # queries per attention segment of a long offloaded prefill (bounds its scores)
# Parameter groups, in the order tables print them; `param_group` maps a leaf path to one.
GROUPS = ("embeddings", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts", "lm_head")


def param_group(path: tuple[str, ...]) -> str:
    if path[0] == "embed_tokens":
        return "embeddings"
    if path[0] == "lm_head":
        return "lm_head"
    if path[0] == "norm" or path[-2].endswith("layernorm"):
        return "norms"
    if "self_attn" in path:
        return "attention"
    if path[0] == "dense_layers":
        return "dense_mlp"
    return {"gate": "router", "shared_experts": "shared_experts", "experts": "routed_experts"}[path[2]]


class PlacementError(ValueError):
    """A budget or rule that cannot be honoured; the message names the option."""


def parse_size(size: str | int | float) -> int:
    """'24GiB', '24 GB', '1.5e9' or a number of bytes."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size <= 0:
            raise PlacementError(f"gpu_memory must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlacementError(f"gpu_memory {size!r} is not a size (examples: '24GiB', '80GB', 25769803776)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """Human units that fit the size: 1.50 GiB, 3.20 MiB, 512 B."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    config: ModelConfig
    budget: int | None  # bytes of device memory the plan may use; None: no limit
    core_bytes: dict[str, int]  # per parameter group, all on the device
    cache_bytes: int
    workspace_bytes: int
    expert_format: ExpertFormat  # how every routed expert is stored, on the device and in host memory
    device_experts: frozenset[tuple[int, int]]  # (layer, expert) pairs resident on the device
    host_experts: frozenset[tuple[int, int]]
    expert_chunk: int  # experts fetched per segment when streaming
    max_batch: int = 1  # the largest generation batch the cache and workspace are sized for
    max_context: int = 4096  # the longest sequence (prompt plus new tokens) they are sized for
    training_bytes: int = 0  # the part of the workspace reserved for LoRA training steps
    training: int = 0  # the micro-batches of training steps that room was reserved for
    devices: int = 1  # devices the routed experts are split over (each owns E/devices per layer)

    @property
    def offloaded(self) -> bool:
        return bool(self.host_experts)

    @property
    def expert_bytes(self) -> int:
        """One routed expert of one layer, as stored."""
        return self.expert_format.nbytes

    @property
    def device_bytes(self) -> int:
        """Bytes on one device (the fullest, over several)."""
        experts = max(len(self.device_experts_of(d)) for d in range(self.devices))
        return sum(self.core_bytes.values()) + self.cache_bytes + self.workspace_bytes + experts * self.expert_bytes

    def owner(self, expert: int) -> int:
        """The device (index along the expert axis) that owns routed expert `expert` of each layer."""
        return expert // (self.config.n_routed_experts // self.devices)

    def device_experts_of(self, device: int) -> frozenset[tuple[int, int]]:
        return frozenset(k for k in self.device_experts if self.owner(k[1]) == device)

    def host_experts_of(self, device: int) -> frozenset[tuple[int, int]]:
        """Experts `device` owns that live in host memory behind it."""
        return frozenset(k for k in self.host_experts if self.owner(k[1]) == device)

    def per_device_table(self) -> str:
        """Which experts each device owns and holds, and its total (several devices)."""
        E, n, nbytes = self.config.n_routed_experts, self.devices, self.expert_bytes
        layers = len(self.config.moe_layers)
        lines = [f"expert parallel over {n} devices (mesh axis 'expert'): core parameters, KV cache and workspace "
                 "replicated on each; routed experts split",
                 f"{'device':<8}{'owns experts':<24}{'in device memory':>22}{'in host memory':>22}{'device total':>16}"]
        core = sum(self.core_bytes.values()) + self.cache_bytes + self.workspace_bytes
        for d in range(n):
            first, last = d * E // n, (d + 1) * E // n - 1
            on_dev, on_host = len(self.device_experts_of(d)), len(self.host_experts_of(d))
            in_memory = [f"{k} ({fmt_bytes(k * nbytes)})" for k in (on_dev, on_host)]
            lines.append(f"{d:<8}{f'{first}-{last} of {layers} layers':<24}{in_memory[0]:>22}{in_memory[1]:>22}"
                         f"{fmt_bytes(core + on_dev * nbytes):>16}")
        return "\n".join(lines)

    def expert_layers(self, kind: str) -> list[int]:
        chosen = self.device_experts if kind == DEVICE else self.host_experts
        return sorted({layer for layer, _ in chosen})

    def table(self) -> str:
        rows = [(g, DEVICE, b) for g, b in self.core_bytes.items() if b]
        split = DEVICE if self.devices == 1 else f"{self.devices} devices"
        n_dev, n_host = len(self.device_experts), len(self.host_experts)
        fmt = self.expert_format.name
        if n_dev:
            rows.append((f"routed_experts ({n_dev}, {fmt})", split, n_dev * self.expert_bytes))
        if n_host:
            rows.append((f"routed_experts ({n_host}, {fmt})", "pinned_host", n_host * self.expert_bytes))
        rows += [("kv_cache", DEVICE, self.cache_bytes),
                 ("workspace", DEVICE, self.workspace_bytes - self.training_bytes)]
        if self.training_bytes:
            rows.append(("training_activations", DEVICE, self.training_bytes))
        if self.devices > 1:  # core rows are on every device; the experts' total is over all of them
            rows = [(g, "each device" if kind == DEVICE else kind, b) for g, kind, b in rows]
        lines = [f"{'group':<32}{'memory':<14}{'bytes':>14}"]
        lines += [f"{g:<32}{kind:<14}{fmt_bytes(b):>14}" for g, kind, b in rows]
        lines.append(f"{'device total':<32}{'':<14}{fmt_bytes(self.device_bytes):>14}"
                     + (" on each device (the fullest)" if self.devices > 1 else "")
                     + (f"  of {fmt_bytes(self.budget)} budget" if self.budget else ""))
        if n_host:
            layers = self.expert_layers(HOST)
            lines.append(f"did not fit on the device: {n_host} experts ({fmt_bytes(n_host * self.expert_bytes)}) of "
                         f"{len(layers)} MoE layers, in host memory")
        if self.devices > 1:
            lines += ["", self.per_device_table()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def core_group_bytes(cfg: ModelConfig, abstract: nnx.State) -> dict[str, int]:
    out = {g: 0 for g in GROUPS if g != "routed_experts"}
    for leaf_path, var in nnx.to_flat_state(abstract):
        g = param_group(leaf_path)
        if g != "routed_experts":
            out[g] += int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
    return out


def cache_nbytes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
    return cfg.num_hidden_layers * batch * max_len * cfg.cache_dim * np.dtype(dtype).itemsize


def workspace_nbytes(cfg: ModelConfig, batch: int, max_len: int, prefill_chunk: int, expert_bytes: int,
                     expert_chunk: int, dtype) -> int:
    """Device memory the segments need beyond parameters and cache: two expert chunks in flight
    (double buffering) and the largest prefill activations (attention scores of a query chunk)."""
    it = np.dtype(dtype).itemsize
    T = min(prefill_chunk, max_len)
    H = cfg.num_attention_heads
    scores = batch * H * T * max_len * 4 * 2  # f32 scores and probabilities
    expanded_kv = batch * max_len * H * (cfg.qk_head_dim + cfg.v_head_dim) * it
    hidden = batch * max_len * (cfg.hidden_size * 4 + cfg.intermediate_size * 2) * it
    return 2 * expert_chunk * expert_bytes + scores + expanded_kv + hidden + (64 << 20)


def training_nbytes(cfg: ModelConfig, batch: int, seq_len: int, dtype, micro_batches: int = 1) -> int:
    """Device memory an offloaded LoRA training step needs on top of inference's workspace, with its
    micro-batches going through each layer together: two layers' inputs for each micro-batch (the
    saved inputs of the others wait in pinned host memory), the routed-expert operands and
    accumulators of each micro-batch for one layer, and one micro-batch's layer backward over the
    whole sequence (f32 attention scores, probabilities and their gradients for one block of
    queries: training's attention is `kernels.mla_prefill_blocked`; projections and MLP activations
    with their gradients)."""
    it = np.dtype(dtype).itemsize
    M, B, T, H = micro_batches, batch, seq_len, cfg.num_attention_heads
    saved = M * 2 * B * T * cfg.hidden_size * it
    routed = M * B * T * cfg.hidden_size * (3 * it + 2 * 4)  # layer output and h; f32 acc and d h
    attention = 4 * B * H * min(T, PREFILL_BLOCK_Q) * T * 4
    activations = B * T * (3 * H * (cfg.qk_head_dim + cfg.v_head_dim) + 6 * cfg.hidden_size
                           + 4 * cfg.intermediate_size) * 4
    return saved + routed + attention + activations


def device_memory_limit() -> int | None:
    """Bytes the default device's allocator may use, where the backend says (GPUs); else None."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def spread_over_layers(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Every (layer, expert), expert-major: the default order experts fill the device in."""
    return [(i, e) for e in range(cfg.n_routed_experts) for i in cfg.moe_layers]


def check_expert_split(cfg: ModelConfig, devices: int) -> None:
    """Expert parallelism splits each layer's routed experts evenly: `devices` must divide them."""
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise PlacementError(f"devices={devices!r}: give a whole number of devices, at least 1")
    if cfg.n_routed_experts % devices:
        raise PlacementError(f"devices={devices} does not divide the {cfg.n_routed_experts} routed experts of each "
                             f"layer (each device owns an equal contiguous block)")


def plan(cfg: ModelConfig, abstract: nnx.State, dtype, expert_format: ExpertFormat, *,
         gpu_memory: str | int | None = None, placement: Mapping[str, str] | None = None, max_batch: int = 1,
         max_context: int = 4096, expert_chunk: int = 32, training: int = 0,
         preference: list[tuple[int, int]] | None = None, devices: int = 1) -> PlacementPlan:
    """Decide where every routed expert lives. Without a budget or rules, everything stays on the
    device unless the device reports a memory limit (GPUs), which then is the budget. training:
    also reserve a LoRA training step's activations: `training` micro-batches (True: one) of
    max_batch x max_context tokens. preference: the order experts fill the device's free room
    (most used first); default `spread_over_layers`. devices: split the routed experts over that
    many devices, each with its own `gpu_memory` budget filled by the experts it owns."""
    check_expert_split(cfg, devices)
    budget = parse_size(gpu_memory) if gpu_memory is not None else None
    if budget is None and placement is None:
        limit = device_memory_limit()
        budget = int(limit * 0.95) if limit else None
    core = core_group_bytes(cfg, abstract)
    e_bytes = expert_format.nbytes
    moe_layers = cfg.moe_layers
    E = cfg.n_routed_experts
    expert_chunk = max(1, min(expert_chunk, E))
    cache = cache_nbytes(cfg, max_batch, max_context, dtype)

    rules = [(re.compile(pat), kind) for pat, kind in (placement or {}).items()]
    for pat, kind in rules:
        if kind not in (HOST, DEVICE):
            raise PlacementError(f"placement rule {pat.pattern!r}: memory {kind!r} must be 'device' or 'host'")
    forced: dict[tuple[int, int], str] = {}
    for i in moe_layers:
        for e in range(E):
            name = f"model.layers.{i}.mlp.experts.{e}"
            kind = next((k for p, k in rules if p.fullmatch(name) or p.fullmatch(name + ".weight")), None)
            if kind:
                forced[(i, e)] = kind
    for p, kind in rules:
        core_hit = next((n for n in _core_names(cfg) if p.fullmatch(n)), None)
        if core_hit and kind == HOST:
            raise PlacementError(f"placement rule {p.pattern!r} sends {core_hit} to the host: only routed experts "
                                 "(model.layers.N.mlp.experts.E) can live in host memory")

    all_experts = [(i, e) for i in moe_layers for e in range(E)]
    need_host = any(k == HOST for k in forced.values())
    if budget is None and not need_host:
        workspace = 0
    else:
        workspace = workspace_nbytes(cfg, max_batch, max_context, QUERY_CHUNK, e_bytes, expert_chunk, dtype)
    train = training_nbytes(cfg, max_batch, max_context, dtype, int(training)) if training and workspace else 0
    workspace += train
    fixed = sum(core.values()) + cache + workspace
    ruled_on = [sum(v == DEVICE and e // (E // devices) == d for (_, e), v in forced.items()) for d in range(devices)]
    if budget is not None and fixed + max(ruled_on) * e_bytes > budget:
        raise PlacementError(
            f"gpu_memory={fmt_bytes(budget)} is too small: the core parameters ({fmt_bytes(sum(core.values()))}), "
            f"KV cache ({fmt_bytes(cache)} for batch {max_batch} x {max_context} tokens) and workspace "
            f"({fmt_bytes(workspace)}) need {fmt_bytes(fixed)}" + (" plus the experts placed on the device by rule"
                                                                   if DEVICE in forced.values() else ""))
    device = {k for k, v in forced.items() if v == DEVICE}
    owner = [e // (E // devices) for e in range(E)]  # `PlacementPlan.owner`
    # Headroom for the allocator's fragmentation and library workspaces (cuBLAS, autotuning).
    reserve = 0 if budget is None else max(budget // 20, 256 << 20)
    free = [None if budget is None else budget - reserve - fixed - n * e_bytes for n in ruled_on]  # each device's own
    for key in preference or spread_over_layers(cfg):
        d = owner[key[1]]
        if key in forced:
            continue
        if free[d] is None or free[d] >= e_bytes:
            device.add(key)
            free[d] = None if free[d] is None else free[d] - e_bytes
    host = frozenset(k for k in all_experts if k not in device)
    if not host and budget is None:
        workspace = train = 0
    return PlacementPlan(cfg, budget, core, cache, workspace, expert_format, frozenset(device), host, expert_chunk,
                         max_batch, max_context, train, int(training), devices)


def _core_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i, kind in enumerate(cfg.layer_kinds):
        names += [f"model.layers.{i}.self_attn", f"model.layers.{i}.input_layernorm",
                  f"model.layers.{i}.post_attention_layernorm"]
        names += [f"model.layers.{i}.mlp.gate", f"model.layers.{i}.mlp.shared_experts"] if kind == "moe" else \
            [f"model.layers.{i}.mlp"]
    return names
