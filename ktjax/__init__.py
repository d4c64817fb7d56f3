"""ktjax: DeepSeek-V3/R1-class MoE models larger than one GPU, in pure JAX."""

__version__ = "0.1.0"

# First, before any jax backend can start: the limit of XLA's pinned host pool, where offloaded experts live
# (64 GiB unless set), raised to the machine's memory unless the user set it.
from ktjax.runtime import host_memory  # noqa: E402, F401  (isort: skip)
from ktjax.api import apply_adapter, finetune, load, load_adapter, logits, merge_adapter, plan_placement, quantize
from ktjax.config import ConfigError, ModelConfig
from ktjax.io.checkpoint import CheckpointError
from ktjax.lora.config import LoRAConfig
from ktjax.runtime.generation import GenerationResult, GenerationStats, chat, generate, stream
from ktjax.runtime.model import LoadedModel
from ktjax.runtime.placement import PlacementError
from ktjax.train.finetune import FinetuneResult

__all__ = ["CheckpointError", "ConfigError", "FinetuneResult", "GenerationResult", "GenerationStats", "LoRAConfig",
           "LoadedModel", "ModelConfig", "PlacementError", "__version__", "apply_adapter", "chat", "finetune", "generate",
           "load", "load_adapter", "logits", "merge_adapter", "plan_placement", "quantize", "stream"]
