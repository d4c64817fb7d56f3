"""`ktjax info`: what a checkpoint holds, without loading its weights (its files' headers are
checked), and with --gpu-memory where each part would live."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
from flax import nnx

from ktjax.api import expert_format, plan_placement, resolve_path
from ktjax.cli.common import check_model_args, model_args
from ktjax.config import resolve_dtype
from ktjax.quantization_config import EXPERT_QUANT_GROUP
from ktjax.io.checkpoint import Checkpoint
from ktjax.io.gguf import is_gguf, open_gguf
from ktjax.io.load import abstract_params, model_config, plan_leaves
from ktjax.runtime.host_memory import host_room, room_error
from ktjax.runtime.offload.path_rates import DEFAULT_RATES, kernel_name, known_rates
from ktjax.runtime.placement import GROUPS, fmt_bytes, param_group


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="describe a checkpoint: config, parameter counts, placement",
                       description="Print the config summary and parameter counts and bytes by group, without "
                       "loading the weights (the files' headers are checked); with --gpu-memory or --devices, the "
                       "placement plan too (per device), and where host experts would be computed.")
    model_args(i, adapter=False)
    i.set_defaults(func=run)


def describe(path: str, dtype=None, experts: str | None = None) -> str:
    cfg = model_config(path)
    dtype = resolve_dtype(dtype, cfg)
    _, abstract = abstract_params(cfg, dtype)
    gguf_lines = []
    if is_gguf(path):  # every tensor found and its shape checked, and what each type becomes
        ckpt = open_gguf(path)
        plan_leaves(ckpt, cfg, abstract)
        gguf_lines = ckpt.type_table(dtype, experts)
    elif any(f.endswith(".safetensors") for f in os.listdir(path)):
        Checkpoint(path)  # every header parsed and every tensor's extent checked against its file
    fmt = expert_format(path, cfg, dtype, experts)
    counts, nbytes = defaultdict(int), defaultdict(int)
    for leaf_path, var in nnx.to_flat_state(abstract):
        g = param_group(leaf_path)
        n = int(np.prod(var.shape))
        counts[g] += n
        nbytes[g] += n * var.dtype.itemsize
    if cfg.moe_layers:
        nbytes["routed_experts"] = len(cfg.moe_layers) * cfg.n_routed_experts * fmt.nbytes
    total = sum(counts.values())
    kinds = cfg.layer_kinds
    lines = [
        f"model       {path}",
        f"type        {cfg.model_type}: {cfg.num_hidden_layers} layers ({kinds.count('dense')} dense, "
        f"{kinds.count('moe')} MoE), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
        f"attention   MLA, {cfg.num_attention_heads} heads, q LoRA {cfg.q_lora_rank or 'none'}, KV latent "
        f"{cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim} ({cfg.cache_dim} cached values per token per layer)",
        f"experts     {cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}, {cfg.scoring_func}, "
        f"{cfg.topk_method}, {cfg.n_group} groups keep {cfg.topk_group}) + {cfg.n_shared_experts} shared, "
        f"intermediate {cfg.moe_intermediate_size}; kept as {fmt.name} ({fmt_bytes(fmt.nbytes)} each)",
        f"rope        theta {cfg.rope_theta:g}, " + (
            f"YaRN x{cfg.rope_scaling.factor:g} from {cfg.rope_scaling.original_max_position_embeddings}"
            if cfg.rope_scaling else "no scaling") + f", max positions {cfg.max_position_embeddings}",
        f"weights     {'FP8 e4m3 blocks ' + str(cfg.fp8_block_size) + ' in the checkpoint, ' if cfg.fp8_block_size else ''}"
        f"{np.dtype(dtype).name} when loaded" + (f"; routed experts stored as {cfg.expert_quant} (ktjax quantize, "
                                                 f"groups of {EXPERT_QUANT_GROUP})" if cfg.expert_quant else ""),
        "",
        f"{'group':<16}{'parameters':>18}{'share':>8}{'bytes as loaded':>20}",
    ]
    for g in GROUPS:
        if counts[g]:
            lines.append(f"{g:<16}{counts[g]:>18,}{100 * counts[g] / total:>7.1f}%{fmt_bytes(nbytes[g]):>20}")
    lines.append(f"{'total':<16}{total:>18,}{100.0:>7.1f}%{fmt_bytes(sum(nbytes.values())):>20}")
    if gguf_lines:
        lines += [""] + gguf_lines
    return "\n".join(lines)


def run(args) -> int:
    check_model_args(args)
    path = resolve_path(args.model)
    print(describe(path, dtype=args.dtype, experts=args.experts))
    if args.gpu_memory is not None or args.devices > 1:
        plan = plan_placement(path, dtype=args.dtype, experts=args.experts, gpu_memory=args.gpu_memory,
                              max_context=args.max_context, max_batch=args.max_batch, devices=args.devices)
        over = f" on each of {args.devices} devices" if args.devices > 1 else ""
        print(f"\nplacement under gpu_memory={args.gpu_memory}{over} (KV cache for {args.max_batch} x "
              f"{args.max_context} tokens):")
        print(plan.table())
        if plan.offloaded:  # what `ktjax.load` checks before it reads anything
            host_bytes, available, pool = host_room(plan)
            print(f"host memory: {fmt_bytes(host_bytes)} of routed experts; this machine has "
                  + (f"{fmt_bytes(available)} available" if available is not None else "an unknown amount available")
                  + (f", XLA's pinned host pool stops at {fmt_bytes(pool)}" if pool is not None else ""))
            problem = room_error(host_bytes, available, pool)
            if problem:
                print(f"host memory: loading would stop: {problem}")
        kernel = kernel_name(plan.expert_format.name, args.host_activations)
        measured = known_rates(kernel)
        rates = measured or DEFAULT_RATES.get(kernel)
        if plan.offloaded and plan.devices > 1:
            print("host experts: streamed to the device that owns them (the host-CPU path serves one device only)")
        elif plan.offloaded and rates is not None and args.expert_compute != "gpu":
            source = ("measured on this machine by an earlier load" if measured else
                      "assumed until the first load on a GPU measures them")
            print(f"host experts: computed on the host CPU when they serve up to {rates.max_cpu_tokens()} token(s) "
                  f"in a step and the link is busier, else streamed to the GPU (rates {source}: CPU "
                  f"{rates.cpu_gbps:.3g} GB/s per token and {rates.cpu_call_s * 1e3:.2g} ms per call, link "
                  f"{rates.link_gbps:.3g} GB/s; --expert-compute overrides)")
    return 0
