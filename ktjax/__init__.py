"""ktjax: DeepSeek-V3/R1-class MoE models larger than one GPU, in pure JAX."""

__version__ = "0.1.0"

from ktjax.checkpoint import CheckpointError
from ktjax.config import ConfigError, ModelConfig
from ktjax.engine import logits
from ktjax.api import load
from ktjax.loading import Model

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelConfig", "load", "logits", "__version__"]

from ktjax.generation import GenerationResult, GenerationStats, chat, generate, stream  # noqa: E402

__all__ += ["GenerationResult", "GenerationStats", "chat", "generate", "stream"]
