"""ktjax: DeepSeek-V3/R1-class MoE models larger than one GPU, in pure JAX."""

import os as _os

__version__ = "0.1.0"

# models/ and kernels/ live beside ktjax/ in a source checkout and are mapped into the package when
# it is installed: from a checkout (the repository root on sys.path shadows an installed copy, or
# nothing is installed), look for them beside this folder too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "models")) and _os.path.isfile(
        _os.path.join(_checkout, "models", "decoder.py")):
    __path__.append(_checkout)

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
