"""config.json's `quantization_config`: FP8 weight blocks (DeepSeek-V3's own checkpoints), or the
integer expert formats of a `ktjax quantize` checkpoint (docs/quantized_checkpoints.md)."""

from __future__ import annotations

from typing import Any

from ktjax.config_errors import ConfigError

# `ktjax quantize` checkpoints: routed experts in an integer format of `ktjax.experts.quant`
# (docs/quantized_checkpoints.md), everything else as the source stored it (float, or FP8 blocks).
KTJAX_QUANT_METHOD = "ktjax"
EXPERT_QUANT_FORMATS = ("int8", "int4")
EXPERT_QUANT_GROUP = 32  # values per scale along the input dimension (ktjax.experts.quant.GROUP)


def quantization_config(expert_quant: str, fp8_block: tuple[int, int] | None) -> dict[str, Any]:
    """config.json's quantization_config of a `ktjax quantize` checkpoint."""
    q = {"quant_method": KTJAX_QUANT_METHOD, "experts": expert_quant, "group_size": EXPERT_QUANT_GROUP}
    if fp8_block is not None:  # the other linear weights stay FP8, with their block scales
        q["fp8_weight_block_size"] = list(fp8_block)
    return q


def _block(quant: dict, key: str) -> tuple[int, int]:
    block = tuple(int(x) for x in quant.get(key, (128, 128)))
    if len(block) != 2:
        raise ConfigError(f"field 'quantization_config.{key}' must have 2 entries, got {block}")
    return block


def read_quantization(quant: Any) -> tuple[tuple[int, int] | None, str | None]:
    """(FP8 block size or None, expert integer format or None) from quantization_config."""
    if quant is None:
        return None, None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "fp8":
        return _block(quant, "weight_block_size"), None
    if method != KTJAX_QUANT_METHOD:
        raise ConfigError(f"field 'quantization_config.quant_method' {method!r} is not supported "
                          f"(use 'fp8' or {KTJAX_QUANT_METHOD!r})")
    experts = quant.get("experts")
    if experts not in EXPERT_QUANT_FORMATS:
        raise ConfigError(f"field 'quantization_config.experts' {experts!r} is not supported "
                          f"(use one of {', '.join(EXPERT_QUANT_FORMATS)})")
    if quant.get("group_size", EXPERT_QUANT_GROUP) != EXPERT_QUANT_GROUP:
        raise ConfigError(f"field 'quantization_config.group_size' {quant.get('group_size')!r} is not supported "
                          f"(only {EXPERT_QUANT_GROUP})")
    fp8 = _block(quant, "fp8_weight_block_size") if "fp8_weight_block_size" in quant else None
    return fp8, experts
