"""DeepSeek-V3 layers at full size with random weights, built cheaply on the device, in any expert
format (bf16, FP8, int8, int4).

Filling ~90 GB on the host with numpy takes many minutes; generating each tensor on the GPU (and
quantizing it there) and copying experts to pinned host memory one at a time takes seconds.
Shared by the benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.experts.weights import ExpertFormat, float_expert, fp8_expert, packed_expert
from ktjax.io.experts import fp8_blocks
from ktjax.io.load import abstract_params
from ktjax.models import layer_structure
from ktjax.runtime.offload import OffloadedExecutor
from ktjax.runtime.placement import plan

# A copy of shared/reference/deepseek-v3/config_671B.json, so the benchmarks travel with the repository.
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepseek_v3_671B_config.json")


def reference_config(path: str = REFERENCE, **changes) -> ModelConfig:
    """DeepSeek-V3's config (the whole 671B model: 3 dense and 58 MoE layers, without the next-token
    prediction layer), with `changes` to its fields."""
    with open(path) as f:
        d = json.load(f)
    d.update(num_nextn_predict_layers=0, **changes)
    return ModelConfig.from_dict(d)


def fullsize_config(moe_layers: int, *, dense_layers: int = 1, n_routed_experts: int | None = None,
                    path: str = REFERENCE) -> ModelConfig:
    """DeepSeek-V3's config with fewer layers (and optionally fewer experts per layer)."""
    layers = dict(num_hidden_layers=dense_layers + moe_layers, first_k_dense_replace=dense_layers)
    if n_routed_experts is None:
        return reference_config(path, **layers)
    full = reference_config(path)
    return reference_config(path, **layers, n_routed_experts=n_routed_experts,
                            n_group=min(full.n_group, n_routed_experts // 2),
                            topk_group=min(full.topk_group, n_routed_experts // 4 or 1))


def r1_resident_per_layer(r1: ModelConfig, experts: str, gpu_memory: str, max_context: int) -> float:
    """How many of each MoE layer's routed experts the whole DeepSeek-V3/R1 (`reference_config()`, 58 MoE layers)
    keeps on a GPU of `gpu_memory` in the `experts` format, once its core (32 GiB of bf16), cache and workspace
    are placed: the hot-expert cache a real R1 has, where a few-layer benchmark model under the same budget has
    far more per layer. ktjax's own planner decides it."""
    _, abstract = abstract_params(r1, jnp.bfloat16)
    fmt = ExpertFormat(experts, r1.moe_intermediate_size, r1.hidden_size)
    p = plan(r1, abstract, jnp.bfloat16, fmt, gpu_memory=gpu_memory, max_batch=1, max_context=max_context)
    return len(p.device_experts) / len(r1.moe_layers)


def capped_rules(cfg: ModelConfig, per_layer: int) -> dict[str, str]:
    """Placement rules that keep experts per_layer and above of every MoE layer in host memory."""
    ids = "|".join(map(str, range(per_layer, cfg.n_routed_experts)))
    return {rf"model\.layers\.\d+\.mlp\.experts\.({ids})": "host"} if ids else {}


def _normal(key, shape, dtype, scale):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(1, 2, 3))


def random_state(abstract: nnx.State, key, dtype) -> nnx.State:
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        k = jax.random.fold_in(key, i)
        if path[-2].endswith("norm") or path[-1] == "weight" and "layernorm" in path[-2]:
            value = jnp.ones(var.shape, var.dtype)
        elif path[-1] == "e_score_correction_bias":
            value = _normal_jit(k, var.shape, var.dtype, 0.01)
        else:
            value = _normal_jit(k, var.shape, var.dtype, float(var.shape[-1]) ** -0.5)
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


@functools.partial(jax.jit, static_argnums=(1,))
def random_expert(key, fmt: ExpertFormat):
    """One expert in `fmt`, generated and (for quantized formats) quantized on the device."""
    F, D = fmt.F, fmt.D
    gate, up, down = (_normal(jax.random.fold_in(key, k), s, jnp.float32, D ** -0.5 if k < 2 else F ** -0.5)
                      for k, s in enumerate(((F, D), (F, D), (D, F))))
    if fmt.name == "fp8":
        (g, gs), (u, us), (d, ds) = (fp8_blocks(m, fmt.block) for m in (gate, up, down))
        return fp8_expert(g, u, d, gs, us, ds, fmt)
    if fmt.packed is not None:
        return packed_expert(fmt.packed.pack(gate, up, down), fmt)
    return float_expert(gate, up, down, fmt)


def random_offloaded_model(cfg: ModelConfig, placement, dtype=jnp.bfloat16, *, seed: int = 0, progress=print,
                           expert_compute: str = "auto", attention: str = "auto", rates=None) -> OffloadedExecutor:
    key = jax.random.key(seed)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    D, V = cfg.hidden_size, cfg.vocab_size
    top = {"embed_tokens": _normal_jit(jax.random.fold_in(key, 1), (V, D), dtype, 1.0),
           "norm": jnp.ones((D,), dtype),
           "lm_head": _normal_jit(jax.random.fold_in(key, 2), (V, D), dtype, D ** -0.5)}
    layers = [nnx.to_pure_dict(random_state(layer_structure(cfg, kind, dtype, with_experts=False)[1],
                                            jax.random.fold_in(key, 100 + i), dtype))
              for i, kind in enumerate(cfg.layer_kinds)]
    experts = {}
    for i in cfg.moe_layers:
        slots = []
        for e in range(cfg.n_routed_experts):
            ex = random_expert(jax.random.fold_in(key, 10_000 * i + e), placement.expert_format)
            if (i, e) in placement.host_experts:
                ex = jax.device_put(ex, host)
                jax.block_until_ready(ex)  # one expert in flight: device memory stays bounded
            slots.append(ex)
        experts[i] = slots
        progress(f"layer {i}: {cfg.n_routed_experts} experts built ({placement.expert_format.name})")
    return OffloadedExecutor(cfg, placement, dtype, top, layers, experts, attention=attention,
                             expert_compute=expert_compute, rates=rates)


def plan_for(cfg: ModelConfig, dtype, *, experts: str = "bf16", gpu_memory=None, all_on_device=False,
             rules=None, max_batch=32, max_context=8192 + 256, expert_chunk=32, training=0):
    _, abstract = abstract_params(cfg, dtype)
    rules = {r".*": "device"} if all_on_device else rules
    fmt = ExpertFormat(experts, cfg.moe_intermediate_size, cfg.hidden_size)
    p = plan(cfg, abstract, dtype, fmt, gpu_memory=None if all_on_device else gpu_memory, placement=rules,
             max_batch=max_batch, max_context=max_context, expert_chunk=expert_chunk, training=training)
    return dataclasses.replace(p, budget=None) if all_on_device else p
