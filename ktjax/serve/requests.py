"""A request as the scheduler holds it, and what its consumer hears: text as it becomes safe to show,
then one final event (OpenAI's finish reason, or an error). Also the two refusals `Scheduler.submit` raises."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ktjax.runtime.generation import Row, SamplingOptions

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # generation's -> OpenAI's


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's consumer receives: text safe to show, then one event with `finish_reason`
    (OpenAI's "stop" or "length") or `error`."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Request:
    """One generation: its prompt, options, and where its events go (`emit` is called from the
    model's thread)."""

    def __init__(self, prompt_ids: list[int], opts: SamplingOptions, emit: Callable[[Event], None], *,
                 ignore_eos: bool = False):
        self.prompt_ids, self.opts, self.emit = prompt_ids, opts, emit
        self.ignore_eos = ignore_eos  # generate through end-of-sequence tokens (benchmarks)
        self.cancelled = False
        self.row: Row | None = None
        self.arrived = time.monotonic()

    def send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the consumer is gone (closed event loop): nothing to tell
            self.cancelled = True
