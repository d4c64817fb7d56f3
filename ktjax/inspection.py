"""`ktjax info`: what a checkpoint holds, without loading its weights."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.loading import abstract_model, resolve_dtype

# Parameter groups, in the order the table prints them; `param_group` maps a leaf path to one.
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


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def describe(path: str, dtype=None) -> str:
    cfg = ModelConfig.from_json(path)
    dtype = resolve_dtype(dtype, cfg)
    _, abstract = abstract_model(cfg, dtype)
    counts, nbytes = defaultdict(int), defaultdict(int)
    for leaf_path, var in nnx.to_flat_state(abstract):
        g = param_group(leaf_path)
        n = int(np.prod(var.shape))
        counts[g] += n
        nbytes[g] += n * var.dtype.itemsize
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
        f"intermediate {cfg.moe_intermediate_size}",
        f"rope        theta {cfg.rope_theta:g}, " + (
            f"YaRN x{cfg.rope_scaling.factor:g} from {cfg.rope_scaling.original_max_position_embeddings}"
            if cfg.rope_scaling else "no scaling") + f", max positions {cfg.max_position_embeddings}",
        f"weights     {'FP8 e4m3 blocks ' + str(cfg.fp8_block_size) + ' in the checkpoint, ' if cfg.fp8_block_size else ''}"
        f"{np.dtype(dtype).name} when loaded",
        "",
        f"{'group':<16}{'parameters':>18}{'share':>8}{'bytes (' + np.dtype(dtype).name + ')':>20}",
    ]
    for g in GROUPS:
        if counts[g]:
            lines.append(f"{g:<16}{counts[g]:>18,}{100 * counts[g] / total:>7.1f}%{_gb(nbytes[g]):>20}")
    lines.append(f"{'total':<16}{total:>18,}{100.0:>7.1f}%{_gb(sum(nbytes.values())):>20}")
    return "\n".join(lines)
