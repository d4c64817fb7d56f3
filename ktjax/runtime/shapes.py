"""The few static shapes generation compiles for: batch, prompt chunks and cache lengths come in
buckets, so generating never recompiles once a bucket has been seen."""

from __future__ import annotations

import math
from collections.abc import Sequence

PROMPT_BUCKETS = (16, 64, 256, 1024)  # the largest is also the prefill chunk for longer prompts
CACHE_ROUND = 256


def bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


def prefill_chunks(length: int) -> list[tuple[int, int]]:
    """(start, padded length) of each prefill segment: buckets, at most the largest at a time."""
    chunks, start = [], 0
    while start < length:
        T = bucket(length - start, PROMPT_BUCKETS)
        chunks.append((start, T))
        start += T
    return chunks


def padded_prompt_length(length: int) -> int:
    start, T = prefill_chunks(length)[-1]
    return start + T


def batch_bucket(n: int) -> int:
    """Rows padded to a power of two."""
    return 1 << (n - 1).bit_length()


def cache_length(prompt: int, new_tokens: int) -> int:
    """Cache positions a generation needs: the padded prompt and every new token, rounded up."""
    need = max(prompt + new_tokens, padded_prompt_length(prompt))
    return int(math.ceil(need / CACHE_ROUND) * CACHE_ROUND)
