"""DeepSeek-V3 layers at full size with random weights, built cheaply on the device.

Filling ~90 GB on the host with numpy takes many minutes; generating each tensor on the GPU and
copying experts to pinned host memory one at a time takes seconds. Shared by the benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.offload import ExpertWeights, OffloadedModel, layer_graphdef

# A copy of shared/reference/deepseek-v3/config_671B.json, so the benchmarks travel with the repository.
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepseek_v3_671B_config.json")


def fullsize_config(moe_layers: int, *, dense_layers: int = 1, n_routed_experts: int | None = None,
                    path: str = REFERENCE) -> ModelConfig:
    """DeepSeek-V3's config with fewer layers (and optionally fewer experts per layer)."""
    with open(path) as f:
        d = json.load(f)
    d.update(num_hidden_layers=dense_layers + moe_layers, first_k_dense_replace=dense_layers,
             num_nextn_predict_layers=0)
    if n_routed_experts is not None:
        d.update(n_routed_experts=n_routed_experts, n_group=min(d["n_group"], n_routed_experts // 2),
                 topk_group=min(d["topk_group"], n_routed_experts // 4 or 1))
    return ModelConfig.from_dict(d)


def _normal(key, shape, dtype, scale):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(1, 2, 3))


@jax.jit
def quantize_fp8_blocks(w_3FD: jax.Array, block: int = 128):
    """float -> (float8_e4m3fn values, float32 per-block scales) as DeepSeek's FP8 checkpoints store them."""
    _, F, D = w_3FD.shape
    fb, db = -(-F // block), -(-D // block)
    padded = jnp.pad(w_3FD.astype(jnp.float32), ((0, 0), (0, fb * block - F), (0, db * block - D)))
    blocks = padded.reshape(3, fb, block, db, block)
    scale = jnp.max(jnp.abs(blocks), axis=(2, 4)) / 448.0 + 1e-12
    q = (blocks / scale[:, :, None, :, None]).reshape(3, fb * block, db * block)[:, :F, :D]
    return q.astype(jnp.float8_e4m3fn), scale


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


def random_offloaded_model(cfg: ModelConfig, plan, dtype=jnp.bfloat16, *, fp8: bool = False, seed: int = 0,
                           progress=print) -> OffloadedModel:
    key = jax.random.key(seed)
    dev = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    D, V = cfg.hidden_size, cfg.vocab_size
    top = {"embed_tokens": _normal_jit(jax.random.fold_in(key, 1), (V, D), dtype, 1.0),
           "norm": jnp.ones((D,), dtype),
           "lm_head": _normal_jit(jax.random.fold_in(key, 2), (V, D), dtype, D ** -0.5)}
    layers = [nnx.to_pure_dict(random_state(layer_graphdef(cfg, kind, dtype)[1], jax.random.fold_in(key, 100 + i),
                                            dtype)) for i, kind in enumerate(cfg.layer_kinds)]
    experts = {}
    F = cfg.moe_intermediate_size
    for i, kind in enumerate(cfg.layer_kinds):
        if kind != "moe":
            continue
        slots = []
        for e in range(cfg.n_routed_experts):
            w = _normal_jit(jax.random.fold_in(key, 10_000 * i + e), (3, F, D), dtype, D ** -0.5)
            ex = ExpertWeights(*quantize_fp8_blocks(w), 128) if fp8 else ExpertWeights(w)
            if (i, e) in plan.host_experts:
                ex = jax.device_put(ex, host)
                jax.block_until_ready(ex)  # one expert in flight: device memory stays bounded
            slots.append(ex)
        experts[i] = slots
        progress(f"layer {i}: {cfg.n_routed_experts} experts built")
    return OffloadedModel(cfg, plan, dtype, top, layers, experts)


def plan_for(cfg: ModelConfig, dtype, *, gpu_memory=None, fp8=False, all_on_device=False, max_batch=32,
             max_context=8192 + 256, expert_chunk=32, training=0):
    from ktjax.loading import abstract_model
    from ktjax.placement import plan
    _, abstract = abstract_model(cfg, dtype)
    rules = {r".*": "device"} if all_on_device else None
    p = plan(cfg, abstract, dtype, gpu_memory=None if all_on_device else gpu_memory, placement=rules,
             fp8_experts=fp8, max_batch=max_batch, max_context=max_context, expert_chunk=expert_chunk,
             training=training)
    return dataclasses.replace(p, budget=None) if all_on_device else p
