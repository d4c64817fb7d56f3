"""Continuous batching: one thread owns the model and steps a decode batch of fixed slots.

The batch has the shape the model was loaded for (`max_batch` rows, a cache of the whole context),
so the compiled decode step never changes as requests come and go. At each step boundary a waiting
request takes a free slot: its prompt is prefilled alone, exactly as `ktjax.generate` prefills it
(a batch of one, the same padded shapes and seed), and that small cache is copied into its slot's
rows. Every decode step then advances all slots at their own positions, with their own sampling
settings and keys (inactive rows compute a throw-away token at position 0). A request leaves its
slot when it finishes or its client goes away.

One admission per step boundary while other slots decode: a new prompt's prefill delays them by one
prefill, never by a queue of them (an idle batch admits as many as it has slots).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
import threading
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.models import KVCache
from ktjax.runtime.generation import Row, SamplingOptions, check_limits, stop_token_ids
from ktjax.runtime.model import LoadedModel, Sampling
from ktjax.runtime.shapes import cache_length, padded_prompt_length

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
    scheduler's thread)."""

    def __init__(self, prompt_ids: list[int], opts: SamplingOptions, emit: Callable[[Event], None]):
        self.prompt_ids, self.opts, self.emit = prompt_ids, opts, emit
        self.cancelled = False
        self.row: Row | None = None

    def send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the consumer is gone (closed event loop): nothing to tell
            self.cancelled = True


@functools.partial(jax.jit, donate_argnums=0)
def insert_slot(cache_B: KVCache, cache_1: KVCache, slot: jax.Array) -> KVCache:
    """cache_B with row `slot`'s first positions replaced by a one-row cache (layers, 1, S, dim)."""
    return jax.tree.map(lambda big, small: jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (0, slot, 0, 0)),
                        cache_B, cache_1)


@jax.jit
def split_rows(keys_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's key split as generation splits its one key per step: (next keys, this step's)."""
    pairs_B2 = jax.vmap(jax.random.split)(keys_B)
    return pairs_B2[:, 0], pairs_B2[:, 1]


class Scheduler:
    """Owns the model from its own thread. submit() and cancel() may be called from any thread."""

    def __init__(self, model: LoadedModel, *, max_queue: int = 64):
        self.model = model
        self.max_batch = model.placement.max_batch
        self.max_queue = max_queue
        # The longest prompt + completion a request may ask for.
        self.context = min(model.placement.max_context, model.config.max_position_embeddings)
        self._stop_ids = stop_token_ids(model)
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[Request | None] = [None] * self.max_batch
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ktjax-serve-scheduler", daemon=True)

    # --- any thread ---

    def start(self) -> Scheduler:
        """Start the model's thread; returns once its decode step is compiled (the first request
        then waits only for its prompt's prefill)."""
        self._thread.start()
        self._ready.wait()
        return self

    def stop_soon(self) -> None:
        """Take no new requests, and end the open ones at the next step boundary (safe in a signal
        handler: the condition's lock is reentrant)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.stop_soon()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """ValueError (one line) for a request the loaded context cannot hold."""
        check_limits(self.model, [prompt_tokens], max_new_tokens)

    def submit(self, request: Request) -> None:
        self.check(len(request.prompt_ids), request.opts.max_new_tokens)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            # The bound counts requests that will wait behind full slots, not ones about to take a free slot.
            free = sum(r is None for r in self._slots)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._waiting) - free} requests are "
                                f"waiting (the bound, --max-queue); retry later")
            self._waiting.append(request)
            self._cond.notify_all()

    def cancel(self, request: Request) -> None:
        """Free the request's slot (or queue place) at the next step boundary."""
        request.cancelled = True
        with self._cond:
            self._cond.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the scheduler's thread ---

    def _run(self) -> None:
        batch = None
        try:
            with self.model.lock:
                batch = DecodeBatch(self.model, self.max_batch, cache_length(self.context, 0))
                batch.decode()  # compiles the step; free rows' positions are reset as requests take them
        except Exception:  # reported; requests will retry building the batch and fail with the reason
            traceback.print_exc(file=sys.stderr)
            batch = None
        self._ready.set()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._cond.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                free = [b for b, r in enumerate(self._slots) if r is None]
                # One prefill per step while others decode; with nobody decoding, nobody waits on them.
                n_admit = min(len(free), len(self._waiting), 1 if len(free) < self.max_batch else len(free))
                admit = [self._waiting.popleft() for _ in range(n_admit)]
                for request, slot in zip(admit, free):
                    self._slots[slot] = request  # taken now: submit() must not count it as free
            try:
                with self.model.lock:
                    batch = batch or DecodeBatch(self.model, self.max_batch, cache_length(self.context, 0))
                    for request, slot in zip(admit, free):
                        self._admit(batch, request, slot)
                    if any(self._slots):
                        self._step(batch)
            except Exception as e:  # a failed step fails its requests, never the server
                traceback.print_exc(file=sys.stderr)
                failed = [r for r in self._slots if r is not None] + admit
                for r in dict.fromkeys(failed):
                    r.send(Event(error=f"generation failed: {type(e).__name__}: {e}"))
                self._slots = [None] * self.max_batch
                batch = None  # its donated cache may be gone
        with self._cond:
            left = [r for r in self._slots if r is not None] + list(self._waiting)
            self._waiting.clear()
        for r in left:
            r.send(Event(error="the server is shutting down"))

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        self._slots = [None if r is not None and r.cancelled else r for r in self._slots]

    def _admit(self, batch: DecodeBatch, request: Request, slot: int) -> None:
        request.row = Row(self.model, request.prompt_ids, request.opts, self._stop_ids)
        self._push(slot, batch.prefill_into(slot, request.prompt_ids, request.opts))

    def _step(self, batch: DecodeBatch) -> None:
        sampled_B = batch.decode()
        for b, request in enumerate(self._slots):
            if request is not None:
                self._push(b, int(sampled_B[b]))

    def _push(self, slot: int, token: int) -> None:
        request = self._slots[slot]
        row = request.row
        row.push(token)
        text = row.ready_text()
        if row.done:
            request.send(Event(text, len(row.ids), FINISH_REASONS[row.stats.finish_reason]))
            self._slots[slot] = None
        elif text:
            request.send(Event(text, len(row.ids)))


class DecodeBatch:
    """The device side of the slots: the batch's KV cache, each row's last token, position, key and
    sampling settings."""

    def __init__(self, model: LoadedModel, max_batch: int, max_len: int):
        self.executor = model.executor
        self.cache_B = self.executor.init_cache(max_batch, max_len)
        self.token_B = np.zeros(max_batch, np.int32)
        self.pos_B = np.zeros(max_batch, np.int32)
        self.keys_B = jax.random.split(jax.random.key(0), max_batch)
        self.temperature_B = np.zeros(max_batch, np.float32)
        self.top_k_B = np.zeros(max_batch, np.int32)
        self.top_p_B = np.ones(max_batch, np.float32)

    def prefill_into(self, slot: int, prompt_ids: list[int], opts: SamplingOptions) -> int:
        """Prefill a prompt as `ktjax.generate` would alone, copy its cache into `slot`; its first token."""
        P = len(prompt_ids)
        tokens_1T = np.zeros((1, padded_prompt_length(P)), np.int32)
        tokens_1T[0, :P] = prompt_ids
        key, sub = jax.random.split(jax.random.key(opts.seed))
        sampling = Sampling.of(opts.temperature, opts.top_k, opts.top_p)
        cache_1 = self.executor.init_cache(1, cache_length(P, opts.max_new_tokens))
        first_1, cache_1, _ = self.executor.prefill(cache_1, tokens_1T, np.array([P], np.int32), sub, sampling)
        self.cache_B = insert_slot(self.cache_B, cache_1, jnp.int32(slot))
        self.keys_B = self.keys_B.at[slot].set(key)
        first = int(np.asarray(first_1)[0])
        self.token_B[slot], self.pos_B[slot] = first, P
        self.temperature_B[slot], self.top_k_B[slot], self.top_p_B[slot] = opts.temperature, opts.top_k, opts.top_p
        return first

    def decode(self) -> np.ndarray:
        """One step of every row; the sampled tokens [B]. Rows then sit one position further on
        (a free row's position is reset when a request takes it)."""
        self.keys_B, subs_B = split_rows(self.keys_B)
        sampling = Sampling(jnp.asarray(self.temperature_B), jnp.asarray(self.top_k_B), jnp.asarray(self.top_p_B))
        sampled_B, self.cache_B, _ = self.executor.decode(self.cache_B, jnp.asarray(self.token_B),
                                                          jnp.asarray(self.pos_B), subs_B, sampling)
        sampled_B = np.asarray(sampled_B)
        self.token_B = sampled_B.astype(np.int32)
        self.pos_B = np.minimum(self.pos_B + 1, self.cache_B.max_len - 1)
        return sampled_B
