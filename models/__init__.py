"""DeepSeek-V3/R1 and V2/V2-Lite as Flax NNX modules."""

from ktjax.models.deepseek import DeepseekForCausalLM, KVCache, LayerCache, group_layers, layer_schedule

__all__ = ["DeepseekForCausalLM", "KVCache", "LayerCache", "group_layers", "layer_schedule"]
