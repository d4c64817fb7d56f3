"""ktjax: DeepSeek-V3/R1-class MoE models larger than one GPU, in pure JAX."""

__version__ = "0.1.0"

from ktjax.api import load
from ktjax.checkpoint import CheckpointError
from ktjax.config import ConfigError, ModelConfig
from ktjax.engine import logits
from ktjax.finetune import FinetuneResult, finetune
from ktjax.generation import GenerationResult, GenerationStats, chat, generate, stream
from ktjax.loading import Model
from ktjax.lora import LoRAConfig, load_adapter, merge_adapter
from ktjax.placement import PlacementError

__all__ = ["CheckpointError", "ConfigError", "FinetuneResult", "GenerationResult", "GenerationStats", "LoRAConfig",
           "Model", "ModelConfig", "PlacementError", "__version__", "chat", "finetune", "generate", "load",
           "load_adapter", "logits", "merge_adapter", "stream"]
