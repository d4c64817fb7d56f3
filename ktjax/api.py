"""The public entry points: `ktjax.load` and friends."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any


from ktjax import loading
from ktjax import placement as placing
from ktjax.checkpoint import Checkpoint
from ktjax.config import ModelConfig
from ktjax.tokenizer import load_tokenizer


def default_model_path() -> str:
    """The embedded default model shipped in the package (models/tiny)."""
    import ktjax.models
    return os.path.join(os.path.dirname(os.path.abspath(ktjax.models.__file__)), "tiny")


def _experts_are_fp8(path: str, cfg: ModelConfig) -> bool:
    moe = next((i for i, k in enumerate(cfg.layer_kinds) if k == "moe"), None)
    if moe is None or cfg.fp8_block_size is None:
        return False
    name = f"model.layers.{moe}.mlp.experts.0.gate_proj.weight"
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        return True  # a config alone (planning before download): trust its quantization_config
    ckpt = Checkpoint(path)
    return name in ckpt and ckpt.info(name).dtype == "F8_E4M3"


def plan_placement(path: str, *, dtype: Any = None, gpu_memory: str | int | None = None,
                   placement: Mapping[str, str] | None = None, max_batch: int = 1, max_context: int = 4096,
                   expert_chunk: int = 32, training: int = 0) -> placing.PlacementPlan:
    """Where every parameter of the checkpoint would live, computed from its config and headers only."""
    cfg = ModelConfig.from_json(path)
    dtype = loading.resolve_dtype(dtype, cfg)
    _, abstract = loading.abstract_model(cfg, dtype)
    return placing.plan(cfg, abstract, dtype, gpu_memory=gpu_memory, placement=placement,
                          fp8_experts=_experts_are_fp8(path, cfg), max_batch=max_batch, max_context=max_context,
                          expert_chunk=expert_chunk, training=training)


def generation_defaults(path: str) -> dict[str, Any]:
    """The checkpoint's recommended sampling settings (generation_config.json), as generate() arguments."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not cfg.get("do_sample", False):
        return {"temperature": 0.0}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}


def load(path: str | os.PathLike | None = None, *, dtype: Any = None, progress: bool | None = None,
         gpu_memory: str | int | None = None, placement: Mapping[str, str] | None = None, max_batch: int = 1,
         max_context: int = 4096, expert_chunk: int = 32, adapter: str | os.PathLike | None = None,
         training: int = 0):
    """Load a transformers-format DeepSeek checkpoint directory (the embedded tiny model if None).

    gpu_memory: device memory budget ("24GiB" or bytes); routed experts that do not fit stay in
        pinned host memory and are streamed in as needed. Default: the device's own limit on GPUs,
        no limit on the CPU.
    placement: rules {regex: "device" | "host"} on expert names model.layers.{i}.mlp.experts.{e}.
    max_batch, max_context: the KV cache the budget reserves room for.
    training: also reserve room for LoRA training steps of that many micro-batches (True: one) of
    max_batch x max_context tokens.
    adapter: a PEFT LoRA adapter directory to apply (merged into the weights of offloaded models).
    """
    from ktjax.offload import load_offloaded

    path = default_model_path() if path is None else os.fspath(path)
    plan = plan_placement(path, dtype=dtype, gpu_memory=gpu_memory, placement=placement, max_batch=max_batch,
                          max_context=max_context, expert_chunk=expert_chunk, training=training)
    if plan.offloaded:
        cfg = plan.config
        model = load_offloaded(path, cfg, loading.resolve_dtype(dtype, cfg), plan, progress=progress)
    else:
        model = loading.load(path, dtype=dtype, progress=progress)
    model.placement = plan
    model.tokenizer = load_tokenizer(path)
    model.generation_defaults = generation_defaults(path)
    if adapter is not None:
        from ktjax.lora import load_adapter
        model = load_adapter(model, adapter)
    return model


__all__ = ["default_model_path", "load", "plan_placement"]
