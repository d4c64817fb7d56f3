"""DeepSeek-R1's reasoning block: where a message keeps its reasoning, and how a reply writes it.

R1 generates `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`; its chat template ends the generation
prompt with the opening `<think>\\n` and, for earlier assistant turns, keeps only what follows the
last `</think>`. When R1 skips reasoning it writes the empty block `<think>\\n\\n</think>\\n\\n`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REASONING_FIELDS", "THINK_CLOSE", "THINK_OPEN", "THINK_TAG", "reasoning_block", "split_reasoning"]

THINK_TAG = "<think>"
THINK_OPEN = THINK_TAG + "\n"  # how R1 opens its block, and how its generation prompt ends
THINK_CLOSE = "</think>"
# Names a message's reasoning may come under; transformers gives templates the first two from any of them.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def reasoning_block(reasoning: str) -> str:
    """R1's block for `reasoning`, as it precedes the answer ("" gives R1's block for skipped reasoning)."""
    return f"{THINK_OPEN}{reasoning}\n{THINK_CLOSE}\n\n"


def split_reasoning(message: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(the message's reasoning or None, the message with its answer only).

    The reasoning comes from a reasoning field (`reasoning_content`, ...), else from a leading
    `<think>...</think>` block in the content, the form R1's raw output takes. The answer is what
    follows the last `</think>`, as R1's template cuts it, without the newlines that end the block.
    """
    answer_only = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    content = message.get("content")
    if isinstance(content, str) and content.lstrip().startswith(THINK_TAG) and THINK_CLOSE in content:
        block, _, answer = content.rpartition(THINK_CLOSE)
        answer_only["content"] = answer.lstrip("\n")
        if reasoning is None:
            reasoning = block.lstrip().removeprefix(THINK_TAG).strip("\n")
    return reasoning, answer_only
