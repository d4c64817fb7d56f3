"""Streaming detokenisation: token ids in, text pieces out, never a split character."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tokenizer module builds StreamDecoders, so only the type comes from it
    from ktjax.text.tokenizer import Tokenizer

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces for streaming.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, and some decoders change a
    token's text depending on what precedes it (e.g. leading-space stripping). So each step decodes
    a short window of ids starting at the last point that was emitted cleanly, and emits what the
    newest ids added; while the window's text ends in an incomplete character (U+FFFD) it waits.
    The pieces, with `flush()` at the end, join to exactly `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: a clean character boundary, already emitted up to _read
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if not final and (text.endswith("\ufffd") or len(text) <= len(prefix_text)):
            return ""  # an incomplete character (or nothing new) so far: wait for the next id
        piece = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several ids at once; return the text they complete."""
        self.ids.extend(int(i) for i in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (call at the end of generation; may contain U+FFFD if the
        model stopped inside a character, exactly as `decode` would show it)."""
        return self._advance(final=True) if self._read < len(self.ids) else ""

    def __call__(self, token_ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces of a stream of ids, the held-back tail included."""
        for token_id in token_ids:
            piece = self.push(token_id)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail
