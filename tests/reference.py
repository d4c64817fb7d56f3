"""Tiny random DeepSeek checkpoints written by transformers (the reference implementation)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

BASE_V3 = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=12, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
)
BASE_V2 = dict(
    vocab_size=89, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
    n_group=1, topk_group=1, topk_method="greedy", first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.0, norm_topk_prob=False,
    max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
)


def make_reference(kind: str = "v3", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A transformers DeepSeek model with random weights scaled so routing and attention are not degenerate."""
    base = BASE_V3 if kind == "v3" else BASE_V2
    cfg_cls = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
    model_cls = transformers.DeepseekV3ForCausalLM if kind == "v3" else transformers.DeepseekV2ForCausalLM
    cfg = cfg_cls(**{**base, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return model


def save_reference(model: transformers.PreTrainedModel, path: str | os.PathLike, **kwargs) -> str:
    path = os.fspath(path)
    model.save_pretrained(path, **kwargs)
    return path


def reference_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def load_reference(path: str | os.PathLike) -> transformers.PreTrainedModel:
    """transformers' model of a float checkpoint directory (e.g. the numpy-dequantised twin of an FP8 one)."""
    with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
        model_type = json.load(f)["model_type"]
    cls = transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    return cls.from_pretrained(os.fspath(path), dtype=torch.float32).eval()


def reference_greedy(model: transformers.PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: exactly n tokens (no end-of-sentence stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
