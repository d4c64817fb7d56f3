"""Model configuration: one frozen dataclass, read from a transformers `config.json`."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from ktjax.config_errors import ConfigError
from ktjax.quantization_config import quantization_config, read_quantization

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}  # compute dtypes a model can load in
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    rope_interleave: bool
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str | None = None
    # FP8 block size of the checkpoint's quantised weights, or None for float checkpoints.
    fp8_block_size: tuple[int, int] | None = None
    # The integer format ("int8"/"int4") routed experts are stored in (a `ktjax quantize` checkpoint), or None.
    expert_quant: str | None = None

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @functools.cached_property
    def layer_kinds(self) -> tuple[str, ...]:
        """"dense" or "moe" for each decoder layer."""
        return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

    @functools.cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return self.layer_groups["moe"]

    @functools.cached_property
    def next_moe_layer(self) -> dict[int, int]:
        """Each MoE layer's next MoE layer (the last has none): where a layer's lookahead guesses."""
        return dict(zip(self.moe_layers, self.moe_layers[1:]))

    @functools.cached_property
    def layer_groups(self) -> dict[str, tuple[int, ...]]:
        """The decoder layers of each kind, in order: the stacks the model keeps them in."""
        return {g: tuple(i for i, k in enumerate(self.layer_kinds) if k == g) for g in ("dense", "moe")}

    @functools.cached_property
    def layer_runs(self) -> tuple[tuple[str, int, int], ...]:
        """Runs of consecutive same-kind layers: (group, first index within its stack, count)."""
        runs: list[tuple[str, int, int]] = []
        seen = {"dense": 0, "moe": 0}
        for kind in self.layer_kinds:
            if runs and runs[-1][0] == kind:
                g, first, n = runs[-1]
                runs[-1] = (g, first, n + 1)
            else:
                runs.append((kind, seen[kind], 1))
            seen[kind] += 1
        return tuple(runs)

    def stack_index(self, layer: int) -> int:
        """Where decoder layer `layer` sits in its kind's stack."""
        return self.layer_groups[self.layer_kinds[layer]].index(layer)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _parse(d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if not path.endswith(".json"):
            if not os.path.isdir(path):
                raise ConfigError(f"{os.path.join(path, 'config.json')}: missing (no such checkpoint directory)")
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: missing (a checkpoint directory needs one)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return _parse(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers' `config.json` spells it (published-checkpoint style)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("rope_scaling")
        d.pop("fp8_block_size")
        d.pop("expert_quant")
        d["architectures"] = [_ARCH[self.model_type]]
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
            if d["rope_scaling"]["attention_factor"] is None:
                del d["rope_scaling"]["attention_factor"]
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        if self.expert_quant is not None:
            d["quantization_config"] = quantization_config(self.expert_quant, self.fp8_block_size)
        elif self.fp8_block_size is not None:
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(self.fp8_block_size),
            }
        d["num_key_value_heads"] = self.num_attention_heads
        return d


_ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

# Defaults of fields a config.json may omit, per model type (as transformers' config classes).
_DEFAULTS = {
    "deepseek_v3": dict(
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
        topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, rope_interleave=True,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, num_nextn_predict_layers=0,
    ),
    "deepseek_v2": dict(
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1,
        topk_group=1, num_experts_per_tok=6, first_k_dense_replace=0, norm_topk_prob=False,
        topk_method="greedy", scoring_func="softmax", moe_layer_freq=1, rope_interleave=True,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=10000.0, attention_bias=False, num_nextn_predict_layers=0,
    ),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "moe_intermediate_size")


def resolve_dtype(dtype: Any, cfg: ModelConfig) -> np.dtype:
    """The compute dtype: as given ("float32"/"bfloat16" or a dtype), else config.json's
    torch_dtype, else bfloat16 for FP8 checkpoints and float32 otherwise."""
    if dtype is None:
        dtype = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16" if cfg.fp8_block_size else "float32"
    try:
        resolved = np.dtype(ml_dtypes.bfloat16 if dtype in ("bfloat16", "bf16") else dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (use 'float32' or 'bfloat16')")
    return resolved


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _field(d: dict, name: str, kind: type | tuple[type, ...], defaults: dict) -> Any:
    value = d.get(name, defaults.get(name))
    if value is None and name in defaults and defaults[name] is not None:
        value = defaults[name]
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _rope(d: dict) -> tuple[float, YarnScaling | None]:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); published checkpoints
    # write `rope_theta` plus a `rope_scaling` dict spelled with `type`.
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    where = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ConfigError(f"field {where!r} must be an object, got {params!r}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"field 'rope_theta' must be a positive number, got {theta!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"field '{where}.rope_type' {kind!r} is not supported (use 'yarn' or 'default')")
    original = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if original is None:
        raise ConfigError(f"field '{where}.original_max_position_embeddings' is required for yarn")
    if factor is None:
        factor = d.get("max_position_embeddings", 4096) / original
    get = lambda k, default: default if params.get(k) is None else params[k]  # noqa: E731
    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(get("beta_fast", 32.0)),
        beta_slow=float(get("beta_slow", 1.0)),
        mscale=float(get("mscale", 1.0)),
        mscale_all_dim=float(get("mscale_all_dim", 0.0)),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(get("truncate", True)),
    )


def _parse(d: dict[str, Any]) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"field 'model_type' {model_type!r} is not supported (use one of {SUPPORTED_MODEL_TYPES})")
    defaults = _DEFAULTS[model_type]
    for name in _REQUIRED:
        if d.get(name) is None:
            raise ConfigError(f"field {name!r} is missing")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"field 'hidden_act' {act!r} is not supported (only 'silu')")
    i = lambda name: _field(d, name, int, defaults)  # noqa: E731
    fl = lambda name: _field(d, name, float, defaults)  # noqa: E731
    b = lambda name: _field(d, name, bool, defaults)  # noqa: E731
    s = lambda name: _field(d, name, str, defaults)  # noqa: E731

    # transformers' V2 spells the expert count `num_experts` through an attribute map.
    if d.get("n_routed_experts") is None and d.get("num_experts") is not None:
        d = {**d, "n_routed_experts": d["num_experts"]}
    rope_theta, rope_scaling = _rope(d)
    topk_method = s("topk_method")
    scoring_func = s("scoring_func")
    n_group = i("n_group") or 1
    topk_group = i("topk_group") or 1
    fp8_block, expert_quant = read_quantization(d.get("quantization_config"))
    eos = d.get("eos_token_id")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=i("vocab_size"),
        hidden_size=i("hidden_size"),
        intermediate_size=i("intermediate_size"),
        num_hidden_layers=i("num_hidden_layers"),
        num_attention_heads=i("num_attention_heads"),
        q_lora_rank=_field(d, "q_lora_rank", int, {}) if "q_lora_rank" in d else defaults["q_lora_rank"],
        kv_lora_rank=i("kv_lora_rank"),
        qk_nope_head_dim=i("qk_nope_head_dim"),
        qk_rope_head_dim=i("qk_rope_head_dim"),
        v_head_dim=i("v_head_dim"),
        n_routed_experts=i("n_routed_experts") or 0,
        num_experts_per_tok=i("num_experts_per_tok"),
        n_shared_experts=i("n_shared_experts") or 0,
        moe_intermediate_size=i("moe_intermediate_size"),
        first_k_dense_replace=i("first_k_dense_replace"),
        moe_layer_freq=i("moe_layer_freq"),
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        scoring_func=scoring_func,
        norm_topk_prob=b("norm_topk_prob"),
        routed_scaling_factor=fl("routed_scaling_factor"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_interleave=b("rope_interleave"),
        rms_norm_eps=fl("rms_norm_eps"),
        tie_word_embeddings=b("tie_word_embeddings"),
        max_position_embeddings=i("max_position_embeddings"),
        attention_bias=b("attention_bias"),
        num_nextn_predict_layers=i("num_nextn_predict_layers") or 0,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        fp8_block_size=fp8_block,
        expert_quant=expert_quant,
    )
    _validate(cfg)
    return cfg


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"field {field!r} {msg}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                 "qk_rope_head_dim", "v_head_dim", "moe_layer_freq", "max_position_embeddings"):
        need(getattr(c, name) > 0, name, f"must be positive, got {getattr(c, name)}")
    need(c.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
    need(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {c.qk_rope_head_dim}")
    need(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank", "must be positive or null")
    need(c.topk_method in TOPK_METHODS, "topk_method", f"{c.topk_method!r} is not supported (use one of {TOPK_METHODS})")
    need(c.scoring_func in SCORING_FUNCS, "scoring_func", f"{c.scoring_func!r} is not supported (use one of {SCORING_FUNCS})")
    need(c.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
    if c.n_routed_experts > 0:
        need(0 < c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
             f"must be in 1..n_routed_experts ({c.n_routed_experts}), got {c.num_experts_per_tok}")
        need(c.n_routed_experts % c.n_group == 0, "n_group",
             f"must divide n_routed_experts ({c.n_routed_experts}), got {c.n_group}")
        need(1 <= c.topk_group <= c.n_group, "topk_group", f"must be in 1..n_group ({c.n_group}), got {c.topk_group}")
        need(c.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        if c.topk_method == "noaux_tc":
            need(c.n_routed_experts // c.n_group >= 2, "n_group",
                 "leaves fewer than 2 experts per group, which noaux_tc's group score needs")
        if c.topk_method != "greedy":
            need(c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts // c.n_group), "num_experts_per_tok",
                 "exceeds the experts in the kept groups (topk_group * n_routed_experts / n_group)")
