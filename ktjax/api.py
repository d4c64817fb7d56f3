"""The public entry points: `ktjax.load` and what takes the model it returns."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ktjax import kernels, models
from ktjax.config import ModelConfig, resolve_dtype
from ktjax.experts.host import check_activations
from ktjax.experts.weights import FLOAT_FORMATS, FORMATS, ExpertFormat
from ktjax.io.checkpoint import Checkpoint
from ktjax.io.experts import stored_fp8
from ktjax.io.gguf import is_gguf, open_gguf
from ktjax.io.load import abstract_params, load_params, model_config
from ktjax.io.peft import read_adapter
from ktjax.io.quantized import quantize_checkpoint
from ktjax.lora.config import LoRAConfig
from ktjax.runtime import placement as placing
from ktjax.runtime.host_memory import host_room, room_error
from ktjax.runtime.mesh import devices_of, expert_mesh, param_sharding
from ktjax.runtime.model import LoadedModel, Sampling
from ktjax.runtime.offload.build import load_offloaded
from ktjax.runtime.offload.path_rates import cached_rates, kernel_name
from ktjax.runtime.resident import ResidentExecutor
from ktjax.text import load_tokenizer
from ktjax.text.gguf_vocab import gguf_tokenizer
from ktjax.train import finetune as finetuning

EXPERT_ALIASES = {"bfloat16": "bf16", "fp32": "float32"}


def default_model_path() -> str:
    """The embedded default model shipped in the package (ktjax/models/tiny)."""
    return os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "tiny")


def resolve_path(path: str | os.PathLike | None) -> str:
    """A checkpoint path as given (~ expanded), or the embedded model for None."""
    return default_model_path() if path is None else os.path.expanduser(os.fspath(path))


def expert_format(path: str, cfg: ModelConfig, dtype, experts: str | None) -> ExpertFormat:
    """The format routed experts are kept in: as asked, else the integer format of a `ktjax quantize`
    checkpoint, else FP8 where the checkpoint stores them so, else the model dtype. A directory with a
    config alone (planning a download) trusts its quantization_config."""
    F, D = cfg.moe_intermediate_size, cfg.hidden_size
    block = (cfg.fp8_block_size or (128, 128))[0]
    if is_gguf(path):  # what the stored blocks map into (printed where not exactly)
        experts, notes = open_gguf(path).expert_format(EXPERT_ALIASES.get(experts, experts), dtype)
        for line in notes:
            print(line, file=sys.stderr)
    elif experts is None and cfg.expert_quant is not None:  # a `ktjax quantize` checkpoint: as it stores them
        experts = cfg.expert_quant
    if experts is None:
        configured_only = not any(f.endswith(".safetensors") for f in os.listdir(path))
        fp8 = bool(cfg.fp8_block_size) if configured_only else stored_fp8(Checkpoint(path), cfg)
        experts = "fp8" if fp8 else ("bf16" if np.dtype(dtype).name == "bfloat16" else "float32")
    experts = EXPERT_ALIASES.get(experts, experts)
    if experts not in FORMATS:
        raise ValueError(f"experts={experts!r} is not an expert format (use one of {', '.join(FORMATS)})")
    return ExpertFormat(experts, F, D, block)


def plan_placement(path: str | os.PathLike | None = None, *, dtype: Any = None, experts: str | None = None,
                   gpu_memory: str | int | None = None, placement: Mapping[str, str] | None = None,
                   max_batch: int = 1, max_context: int = 4096, expert_chunk: int = 32,
                   training: int = 0, devices: int = 1) -> placing.PlacementPlan:
    """Where every parameter of the checkpoint would live, computed from its config and headers only;
    devices: the routed experts split over that many devices, each with a gpu_memory budget."""
    path = resolve_path(path)
    cfg = model_config(path)
    dtype = resolve_dtype(dtype, cfg)
    _, abstract = abstract_params(cfg, dtype)
    return placing.plan(cfg, abstract, dtype, expert_format(path, cfg, dtype, experts), gpu_memory=gpu_memory,
                        placement=placement, max_batch=max_batch, max_context=max_context, expert_chunk=expert_chunk,
                        training=training, devices=devices)


def generation_defaults(path: str) -> dict[str, Any]:
    """The checkpoint's recommended sampling settings (generation_config.json, or a GGUF's
    general.sampling.*), as generate() arguments."""
    if is_gguf(path):
        return open_gguf(path).generation_defaults()
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


def load(path: str | os.PathLike | None = None, *, dtype: Any = None, experts: str | None = None,
         expert_compute: str = "auto", gpu_memory: str | int | None = None, placement: Mapping[str, str] | None = None,
         max_batch: int = 1, max_context: int = 4096, expert_chunk: int = 32, attention: str | None = None,
         adapter: str | os.PathLike | None = None, training: int = 0, hot_experts: str | Sequence[int] | None = None,
         progress: bool | None = None, devices: int | None = None, mesh: jax.sharding.Mesh | None = None,
         host_activations: str = "int8") -> LoadedModel:
    """Load a transformers-format DeepSeek checkpoint directory (the embedded tiny model if None), or
    a DeepSeek GGUF file as llama.cpp writes it (one .gguf, the first of a split set, or their directory).

    dtype: compute dtype, "bfloat16" or "float32" (default: the checkpoint's).
    experts: the format routed experts are kept in: "bf16", "float32", "fp8", "int8" or "int4"
        (default: the checkpoint's own precision); int8/int4 quantize while loading, except from a
        `ktjax.quantize` checkpoint in that format, whose arrays load as written (the other integer
        format is re-quantized from its dequantized values; a float format dequantizes).
    expert_compute: where experts in host memory are computed: "auto" (the host CPU or the GPU,
        whichever the measured rates favour per step; int8/int4 only), "gpu" (streamed over the
        link), "cpu" (on the host CPU where they live; int8/int4). With "cpu" and no placement
        rules, every routed expert is kept in host memory: asking for the CPU never silently means
        the device.
    host_activations: what the host CPU multiplies int8/int4 experts by: "int8" (default), the
        activations quantized per group of 32 as llama.cpp's CPU kernels do (integer dot products: int4
        experts 2-3x faster on the host, measured in benchmarks/host_experts.md; ~0.5% error per expert
        output, so the output depends slightly on which path computed each expert), or "float32"
        (exact: every path computes the same model).
    gpu_memory: device memory budget ("24GiB" or bytes), per device; routed experts that do not fit stay
        in pinned host memory. Default: the device's own limit on GPUs, no limit on the CPU.
    devices, mesh: split the routed experts over the first `devices` devices, or over the `expert`
        axis of a jax.sharding.Mesh (expert parallelism: device d owns a contiguous block of E/n
        experts per layer; core parameters and KV cache replicated on each; host experts stream to
        the device that owns them: the host-CPU path and hot_experts are single-device for now).
    placement: rules {regex: "device" | "host"} on expert names model.layers.{i}.mlp.experts.{e}.
    max_batch, max_context: the largest generation the KV cache and workspace are sized for;
        generation refuses larger ones.
    attention: the MLA kernels, one of ktjax.kernels.IMPLS (default: KTJAX_PALLAS's, else "auto").
    training: also reserve room for LoRA training steps of that many micro-batches (True: one) of
        max_batch x max_context tokens.
    adapter: a PEFT LoRA adapter directory to apply (merged into the weights of offloaded models).
    hot_experts: a calibration prompt (text or token ids): the experts its tokens route to most fill
        the device's free room (the hot-expert cache); default: experts spread evenly over the layers.
    """
    check_activations(host_activations)  # before anything is read
    path = resolve_path(path)
    cfg = model_config(path)
    dtype = resolve_dtype(dtype, cfg)
    attention = kernels.DEFAULT_IMPL if attention is None else attention
    if expert_compute == "cpu" and placement is None:
        placement = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
    xmesh = expert_mesh(cfg, devices, mesh)
    if xmesh is not None and expert_compute == "cpu":
        raise placing.PlacementError(f"expert_compute='cpu' on {devices_of(xmesh)} devices: several devices stream "
                                     "their host experts to the device that owns them (use 'gpu' or 'auto')")
    plan = plan_placement(path, dtype=dtype, experts=experts, gpu_memory=gpu_memory, placement=placement,
                          max_batch=max_batch, max_context=max_context, expert_chunk=expert_chunk, training=training,
                          devices=devices_of(xmesh))
    if plan.offloaded:  # before a long load that would end in an OOM kill or XLA's pinned-pool error
        problem = room_error(*host_room(plan))
        if problem:
            raise placing.PlacementError(problem)
    fmt = plan.expert_format
    experts_in_model_dtype = fmt.name in FLOAT_FORMATS and np.dtype(FLOAT_FORMATS[fmt.name]) == dtype
    if not plan.offloaded and experts_in_model_dtype and expert_compute != "cpu":
        sharding = None if xmesh is None else (lambda leaf_path: param_sharding(xmesh, leaf_path))
        graphdef, params = load_params(path, cfg, dtype, progress=progress, attention=attention, expert_mesh=xmesh,
                                       sharding=sharding)
        executor = ResidentExecutor(cfg, graphdef, params, attention=attention, mesh=xmesh)
    else:
        executor = load_offloaded(path, cfg, dtype, plan, progress=progress, attention=attention,
                                  expert_compute=expert_compute, mesh=xmesh, host_activations=host_activations)
        if executor.host is not None and expert_compute == "auto" and jax.default_backend() == "gpu":
            # The split's cost model, measured once per machine and kernel as decode steps use the paths.
            kernel = kernel_name(fmt.name, host_activations)
            executor = executor.with_rates(cached_rates(kernel, executor.measure_rates))
    tokenizer = gguf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)
    model = LoadedModel(cfg, executor, plan, tokenizer=tokenizer, generation_defaults=generation_defaults(path),
                        path=path)
    if hot_experts is not None and plan.offloaded:
        model = place_hot_experts(model, hot_experts)
    if adapter is not None:
        model = load_adapter(model, adapter)
    return model


def quantize(path: str | os.PathLike | None = None, *, experts: str, output: str | os.PathLike,
             progress: bool | None = None) -> str:
    """Write the checkpoint at `path` (the embedded tiny model if None) to the new directory `output`
    with its routed experts stored as `experts` ("int8" or "int4"), the layout of
    docs/quantized_checkpoints.md; `ktjax.load(output)` then keeps them so without quantizing.
    Streamed (bounded memory); the output appears only once complete. Returns the output path."""
    return quantize_checkpoint(resolve_path(path), os.path.expanduser(os.fspath(output)), experts, progress=progress)


def routing_counts(model: LoadedModel, prompt: str | Sequence[int]) -> dict[int, np.ndarray]:
    """How many tokens of `prompt` chose each routed expert, per MoE layer (a prefill of it)."""
    ids = list(model.tokenizer.encode(prompt)) if isinstance(prompt, str) else [int(t) for t in prompt]
    tokens = np.asarray([ids], np.int32)
    with model.lock:
        ex = model.executor
        _, _, stats = ex.prefill(ex.init_cache(1, len(ids)), tokens, np.asarray([len(ids)], np.int32),
                                 jax.random.key(0), Sampling.of())
    return stats.expert_counts


def place_hot_experts(model: LoadedModel, prompt: str | Sequence[int]) -> LoadedModel:
    """`model` with the experts `prompt` routes to most filling the device's free room (an offloaded
    model; the plan's budget and format unchanged)."""
    counts = routing_counts(model, prompt)
    spread = placing.spread_over_layers(model.config)
    preference = sorted(spread, key=lambda key: -int(counts[key[0]][key[1]]) if key[0] in counts else 0)
    plan = model.placement
    if plan.budget is None:
        raise ValueError("hot_experts fills a gpu_memory budget's free room: give gpu_memory too")
    _, abstract = abstract_params(model.config, model.dtype)
    hot = placing.plan(model.config, abstract, model.dtype, plan.expert_format, gpu_memory=plan.budget,
                       max_batch=plan.max_batch, max_context=plan.max_context, expert_chunk=plan.expert_chunk,
                       training=plan.training, preference=preference)
    return dataclasses.replace(model, executor=model.executor.with_placement(hot), placement=hot)


def logits(model: LoadedModel, token_ids) -> Any:
    """float32 logits [B, T, V] of a full forward pass over a [B, T] array of token ids."""
    try:
        tokens = np.asarray(token_ids)
    except ValueError:  # numpy refuses rows of different lengths
        tokens = np.empty(0, object)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids must be a rectangular [batch, length] array of integers, got "
                         f"{'shape ' + str(tokens.shape) if tokens.dtype != object else 'ragged rows'}")
    bad = tokens[(tokens < 0) | (tokens >= model.config.vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    with model.lock:
        return model.executor.logits(tokens.astype(np.int32))


def apply_adapter(model: LoadedModel, adapters: Mapping, lora: LoRAConfig) -> LoadedModel:
    """`model` computing with `adapters`: beside the base weights on a resident model (exactly PEFT's
    forward), merged into the core weights of an offloaded one."""
    return dataclasses.replace(model, executor=model.executor.with_adapter(adapters, lora),
                               adapter=(dict(adapters), lora))


def load_adapter(model: LoadedModel, path: str | os.PathLike, *, merge: bool | None = None) -> LoadedModel:
    """`model` with the PEFT adapter in directory `path` applied (see `apply_adapter`); merge=True
    merges it on a resident model too."""
    adapters, lora = read_adapter(os.path.expanduser(os.fspath(path)), model.config)
    if merge:
        return dataclasses.replace(model, executor=model.executor.with_adapter(adapters, lora, merge=True),
                                   adapter=(adapters, lora))
    return apply_adapter(model, adapters, lora)


def merge_adapter(model: LoadedModel) -> LoadedModel:
    """The applied adapter's deltas added into the base weights (W + s B A in float32, cast back)."""
    if model.adapter is None:
        raise ValueError("merge_adapter: the model has no adapter applied; load one with ktjax.load(..., adapter=DIR)")
    adapters, lora = model.adapter
    return dataclasses.replace(model, executor=model.executor.with_adapter(adapters, lora, merge=True))


def finetune(model: LoadedModel | str | os.PathLike | None, data, **kwargs) -> finetuning.FinetuneResult:
    """LoRA fine-tuning (`ktjax.train.finetune.finetune`); a path or None is loaded with room for
    the training steps."""
    if not isinstance(model, LoadedModel):
        model = resolve_path(model)
    return finetuning.finetune(model, data, load=load, **kwargs)
