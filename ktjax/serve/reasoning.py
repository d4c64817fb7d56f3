"""R1's reasoning apart from its answer, as text streams in (`reasoning_content` beside `content`,
the convention of SGLang and vLLM).

A reply to a prompt that ends with R1's `<think>\\n` is reasoning up to `</think>`, then the answer;
the newlines around `</think>` belong to neither (as `ktjax.text.reasoning.split_reasoning` cuts a
finished message). Text that might still become `</think>` is held back until it is known not to.
"""

from __future__ import annotations

from ktjax.text.reasoning import THINK_CLOSE


def _held_back(text: str) -> int:
    """How many trailing characters of `text` could still be the start of "\\n...</think>"."""
    for k in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if THINK_CLOSE.startswith(text[-k:]):
            return k + len(text[:-k]) - len(text[:-k].rstrip("\n"))
    return len(text) - len(text.rstrip("\n"))


class ReasoningSplitter:
    """feed() pieces of a reply; get (reasoning, content) pieces to send."""

    def __init__(self):
        self.thinking = True
        self._pending = ""  # reasoning text held back
        self._reasoning_started = self._answer_started = False

    def feed(self, piece: str) -> tuple[str, str]:
        if not self.thinking:
            return "", self._answer(piece)
        self._pending += piece
        if not self._reasoning_started:
            self._pending = self._pending.lstrip("\n")
            self._reasoning_started = bool(self._pending)
        end = self._pending.find(THINK_CLOSE)
        if end >= 0:
            reasoning, rest = self._pending[:end].rstrip("\n"), self._pending[end + len(THINK_CLOSE):]
            self.thinking, self._pending = False, ""
            return reasoning, self._answer(rest)
        cut = len(self._pending) - _held_back(self._pending)
        reasoning, self._pending = self._pending[:cut], self._pending[cut:]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        """The text still held back, when the reply ends (an unfinished reasoning block is reasoning, cut
        as if it closed there)."""
        reasoning, self._pending = self._pending.rstrip("\n"), ""
        return reasoning, ""

    def _answer(self, piece: str) -> str:
        if not self._answer_started:
            piece = piece.lstrip("\n")
            self._answer_started = bool(piece)
        return piece
