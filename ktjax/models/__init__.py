"""DeepSeek-V3/R1 and V2/V2-Lite as Flax NNX modules."""

from ktjax.models.decoder import DecoderLayer, final_logits, layer_structure
from ktjax.models.deepseek import DeepseekForCausalLM, KVCache, LayerCache

__all__ = ["DecoderLayer", "DeepseekForCausalLM", "KVCache", "LayerCache", "final_logits", "layer_structure"]
