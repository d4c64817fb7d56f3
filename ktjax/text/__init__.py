"""Text: a checkpoint's tokenizer and chat template, streaming decode, and the assistant turns
fine-tuning trains (each with exactly the prompt chat inference builds)."""

from ktjax.text.chat_turns import AssistantTurn, assistant_turns
from ktjax.text.reasoning import reasoning_block, split_reasoning
from ktjax.text.stream import StreamDecoder
from ktjax.text.tokenizer import Tokenizer, TokenizerError, TokenizerMissingError, load_tokenizer, require_tokenizer

__all__ = [
    "AssistantTurn",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "TokenizerMissingError",
    "assistant_turns",
    "load_tokenizer",
    "reasoning_block",
    "require_tokenizer",
    "split_reasoning",
]
