"""Continuous batching: one thread owns the model and steps a decode batch of fixed slots.

Which thread: `ktjax serve` runs the loop (`Scheduler.run`) on the process's main thread, the one that loaded
the model, and the HTTP server in another. The host CPU's expert kernels are numba parallel loops; under
OpenMP (numba's threading layer where libgomp is present) every thread that starts parallel loops keeps a
pool of worker threads of its own, and while two pools live the loops run slower (likely libgomp's rule
that idle threads spin less once the process holds more of them than it has CPUs, so each loop waits for
sleeping threads to wake). So the kernels run on one thread only, the one that measured their rates at
load. Measured (scripts/probe_omp_pools.py, 2026-12-04): on the dev box's 2 cores a small parallel loop took
164-192 us from a second thread while the main thread's pool lived, 143-155 us from either alone; on the H200
the kernels took 5-15% longer per call from a second thread, and the server's steps (on a second thread then)
~30-40% longer per host expert than the engine's (scripts/bench_serve.py, benchmarks/serve.md run 14).
`Scheduler.start` runs the loop on a thread of its own instead (tests, embedding in another program).

The batch has the shape the model was loaded for (`max_batch` rows, a cache of the whole context).
Each decode step runs the slots in use in the smallest power-of-two batch that holds them
(`DecodeBatch.decode`: one request pays for one row, not for the free ones); every such size is
compiled when the server starts, so requests coming and going change no shape. At each step boundary the
waiting requests that fit the free slots are admitted together: their prompts are prefilled in one
padded batch (rows of their own lengths, each sampled with its own settings and seed, as
`ktjax.generate` would sample it alone), and that cache's rows are copied into their slots. Every
decode step then advances the slots in use at their own positions, with their own sampling settings
and keys; free rows filling the batch to its size compute a throw-away token, and an offloaded model
moves no expert for them. A request leaves its slot when it finishes or its client goes away.

An admission's prefill runs in the executor's parts (`Executor.prefill_steps`), one per loop
iteration, with a decode step of the decoding slots between two parts: a resident model prefills in
chunks of at most the largest prompt bucket (1024 tokens x the admission's rows), so a long prompt
stalls the others for one chunk at a time, never its whole prefill. The admitted requests' slots are
taken but do not decode (`active_B` masks them, as it masks free slots) until the last chunk has run
and their rows are copied in; then each gets its first token and decodes from the next step. One
admission at a time: requests arriving meanwhile wait for it to end.

While other slots decode, one admission is at most `max_prefill_tokens` padded tokens (batch bucket x
padded prompt length; a single longer prompt still goes alone, in chunks). An idle batch admits
everything that fits its slots in one prefill. The default bound depends on where the experts live:
an offloaded model's prefill streams every host expert once whatever its tokens (up to the workspace
the plan sized for max_batch x max_context), so fewer, larger admissions stall the decoding slots
less often: everything that fits is admitted; a resident model's prefill costs its tokens, so
admissions are capped at 2048 padded tokens. For the same reason an offloaded model's admission waits
up to OFFLOADED_ADMISSION_WINDOW_S after its first request arrives, so that requests arriving together
(a client's batch, a burst) share one prefill instead of each stalling the others with its own; the
wait ends as soon as the waiting requests fill the free slots.

An offloaded model's prefill is not chunked (each chunk would stream every host expert again): while
other slots decode, an admission instead runs in the same layer pass as their next decode step
(`DecodeBatch.admit_while_stepping`, over the executor's `extend`): the prompts go into their slots'
rows of the batch's cache from position 0, each decoding row's token into its own position, and one
expert stream serves both, so the decoding requests get their next token with that pass and wait for
no extra one. When a decoding row sits too near the end of the cache for the prompts' padded length,
the admission runs on its own as above.

Greedy results equal `ktjax.generate`'s for the same prompt alone up to floating-point ties: a row
of a batched prefill (or decode) computes the same values in a different batch shape, which on the
CPU in float32 differs by ~1e-5 in the logits.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

import numpy as np

from ktjax.runtime.generation import Row, check_limits, stop_token_ids
from ktjax.runtime.model import LoadedModel
from ktjax.runtime.shapes import batch_bucket, cache_length, padded_prompt_length
from ktjax.serve.batch import Admission, DecodeBatch
from ktjax.serve.requests import FINISH_REASONS, Event, QueueFull, Request, ShuttingDown

DEFAULT_MAX_PREFILL_TOKENS = 2048  # resident models: 32 prompts of up to 64 tokens, or 2 of 1024, per admission
# Offloaded models: how long an admission waits for more requests after the first arrives (see `_admission_wait`).
OFFLOADED_ADMISSION_WINDOW_S = 0.05

class Scheduler:
    """Owns the model from the thread that runs its loop (`run`, or `start` for a thread of its own).
    submit() and cancel() may be called from any thread."""

    def __init__(self, model: LoadedModel, *, max_queue: int = 64, max_prefill_tokens: int | None = None,
                 admission_window: float | None = None):
        self.model = model
        self.max_batch = model.placement.max_batch
        self.max_queue = max_queue
        if max_prefill_tokens is None:  # see the module's docstring
            max_prefill_tokens = (batch_bucket(self.max_batch) * padded_prompt_length(model.placement.max_context)
                                  if model.placement.offloaded else DEFAULT_MAX_PREFILL_TOKENS)
        self.max_prefill_tokens = max_prefill_tokens
        if admission_window is None:
            admission_window = OFFLOADED_ADMISSION_WINDOW_S if model.placement.offloaded else 0.0
        self.admission_window = admission_window
        # Counters (read from any thread; written by the scheduler's): prefill calls (admissions) and
        # the requests they admitted, the chunks their prefills ran in (an offloaded prefill is one),
        # decode steps and the slots they advanced, the decode steps run while an admission's prefill
        # was between two of its chunks, the admissions run in the same pass as a decode step, and the
        # seconds spent in decode steps (their model calls, an admission's shared pass included) and in
        # handing their tokens to the requests (detokenizing, emitting): a step's interval beyond these two
        # is the loop's own. Of the decode steps' model calls: the seconds the host CPU's expert kernels took
        # and the experts resident, streamed and computed by the host CPU (an offloaded model's), to compare
        # with the engine's own steps.
        self.stats = {"prefill_calls": 0, "prefilled_requests": 0, "prefill_chunks": 0, "decode_steps": 0,
                      "decoded_tokens": 0, "decode_steps_between_prefill_chunks": 0, "prefills_with_decode": 0,
                      "decode_seconds": 0.0, "emit_seconds": 0.0, "decode_host_cpu_seconds": 0.0,
                      "decode_experts_on_device": 0, "decode_experts_fetched": 0, "decode_experts_on_host_cpu": 0}
        # The longest prompt + completion a request may ask for.
        self.context = min(model.placement.max_context, model.config.max_position_embeddings)
        self._stop_ids = stop_token_ids(model)
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[Request | None] = [None] * self.max_batch
        self._admission: Admission | None = None  # the prefill in progress (its slots are taken, not decoding)
        self._admitting: list[Request] = []  # its requests
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    # --- any thread ---

    def start(self) -> Scheduler:
        """Run the loop on a thread of its own; returns once its decode step is compiled (the first request
        then waits only for its prompt's prefill)."""
        self._thread = threading.Thread(target=self.run, name="ktjax-serve-scheduler", daemon=True)
        self._thread.start()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Block until the loop (run elsewhere) has compiled its decode step."""
        self._ready.wait()

    def stop_soon(self) -> None:
        """Take no new requests, and end the open ones at the next step boundary (safe in a signal
        handler: the condition's lock is reentrant)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.stop_soon()
        if self._thread is not None and self._thread.is_alive():
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

    # --- the model's thread ---

    def run(self) -> None:
        """The loop, on the calling thread, until `stop_soon`: compiles the decode step at every batch size,
        then admits, prefills and steps; at the end, the requests still open get an error saying why."""
        batch = None
        try:
            with self.model.lock:
                batch = DecodeBatch(self.model, self.max_batch, cache_length(self.context, 0))
                # Compiles the step at each size (free rows' positions are reset when taken); Ctrl-C ends it.
                batch.warm_up(stop=lambda: self._stopping)
        except Exception:  # reported; requests will retry building the batch and fail with the reason
            traceback.print_exc(file=sys.stderr)
            batch = None
        self._ready.set()
        while True:
            admit: list[Request] = []
            with self._cond:
                while not self._stopping and not self._waiting and not any(self._slots):
                    self._cond.wait()
                while not self._stopping and not any(self._slots) and (wait := self._admission_wait()) > 0:
                    self._cond.wait(wait)  # an idle batch: gather the requests arriving together
                if self._stopping:
                    break
                self._drop_cancelled()
                if self._admission is None and self._admission_wait() <= 0:  # one admission at a time
                    free = [b for b, r in enumerate(self._slots) if r is None]
                    n_admit = self._n_admit(len(free), decoding=len(free) < self.max_batch)
                    admit = [self._waiting.popleft() for _ in range(n_admit)]
                    slots = free[:n_admit]
                    for request, slot in zip(admit, slots):
                        self._slots[slot] = request  # taken now: submit() must not count it as free
            try:
                with self.model.lock:
                    batch = batch or DecodeBatch(self.model, self.max_batch, cache_length(self.context, 0))
                    active_B = self._active_rows()
                    if admit:
                        active_B[slots] = False  # taken, not decoding yet
                    if admit and active_B.any() and batch.can_admit_while_stepping([r.prompt_ids for r in admit],
                                                                                   active_B):
                        self._admit_while_stepping(batch, admit, slots, active_B)
                        continue
                    if admit:
                        self._start_admission(batch, admit, slots)
                    if self._admission is not None:
                        self._advance_admission()
                    if any(self._active_rows()):
                        self._step(batch)
            except Exception as e:  # a failed step fails its requests, never the server
                traceback.print_exc(file=sys.stderr)
                failed = [r for r in self._slots if r is not None] + admit + self._admitting
                for r in dict.fromkeys(failed):
                    r.send(Event(error=f"generation failed: {type(e).__name__}: {e}"))
                self._slots = [None] * self.max_batch
                self._admission, self._admitting = None, []
                batch = None  # its donated cache may be gone
        with self._cond:
            left = [r for r in self._slots if r is not None] + list(self._waiting)
            self._waiting.clear()
        for r in left:
            r.send(Event(error="the server is shutting down"))

    def _pending_slots(self) -> set[int]:
        """The slots of the admission whose prefill is in progress: taken, but not decoding yet."""
        return set() if self._admission is None else set(self._admission.slots)

    def _active_rows(self) -> np.ndarray:
        """The decoding slots (host bools [max_batch]): taken, and their prefill done."""
        pending = self._pending_slots()
        return np.array([r is not None and b not in pending for b, r in enumerate(self._slots)])

    def _drop_cancelled(self) -> None:
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        if self._admission is not None and all(r.cancelled for r in self._admitting):
            for slot in self._admission.slots:  # nobody waits for this prefill: stop it
                self._slots[slot] = None
            self._admission, self._admitting = None, []
        # An admission's slots stay taken until its prefill ends (it writes their rows then).
        pending = self._pending_slots()
        self._slots = [None if r is not None and r.cancelled and b not in pending else r
                       for b, r in enumerate(self._slots)]

    def _admission_wait(self) -> float:
        """Seconds the next admission should still wait for more arrivals (0: admit now).

        An offloaded model's prefill streams every host expert whatever its tokens, and stalls the
        decoding slots meanwhile: requests that arrive together (clients sending a batch, a burst)
        should share one. So the first waiting request waits up to `admission_window` for others,
        unless the free slots are already filled by those waiting."""
        if not self._waiting or self.admission_window <= 0:
            return 0.0
        if len(self._waiting) >= sum(r is None for r in self._slots):
            return 0.0
        return self._waiting[0].arrived + self.admission_window - time.monotonic()

    def _n_admit(self, free: int, decoding: bool) -> int:
        """How many waiting requests (from the head of the queue, in order) the next prefill takes:
        as many as fit the free slots; while others decode, only as many as keep the padded batch
        within max_prefill_tokens (at least one)."""
        n = min(free, len(self._waiting))
        if not decoding:
            return n
        longest = 0
        for k in range(1, n + 1):
            longest = max(longest, len(self._waiting[k - 1].prompt_ids))
            if k > 1 and batch_bucket(k) * padded_prompt_length(longest) > self.max_prefill_tokens:
                return k - 1
        return n

    def _start_admission(self, batch: DecodeBatch, requests: list[Request], slots: list[int]) -> None:
        self._give_rows(requests)
        self._admitting = requests
        self._admission = batch.start_prefill(slots, [r.prompt_ids for r in requests], [r.opts for r in requests])
        self.stats["prefill_calls"] += 1
        self.stats["prefilled_requests"] += len(requests)

    def _admit_while_stepping(self, batch: DecodeBatch, requests: list[Request], slots: list[int],
                              active_B: np.ndarray) -> None:
        """An admission and a decode step in one layer pass (an offloaded model: see the module's docstring)."""
        self._give_rows(requests)
        t0 = time.perf_counter()
        firsts, sampled_B = batch.admit_while_stepping(slots, [r.prompt_ids for r in requests],
                                                       [r.opts for r in requests], active_B)
        t1 = time.perf_counter()
        for key, n in (("prefill_calls", 1), ("prefilled_requests", len(requests)), ("prefill_chunks", 1),
                       ("decode_steps", 1), ("decoded_tokens", int(active_B.sum())), ("prefills_with_decode", 1),
                       ("decode_seconds", t1 - t0)):
            self.stats[key] += n
        self._count_model_work(batch)
        for b in np.flatnonzero(active_B):
            self._push(int(b), int(sampled_B[b]))
        for slot, first in zip(slots, firsts):
            self._push(slot, first)
        self.stats["emit_seconds"] += time.perf_counter() - t1

    def _give_rows(self, requests: list[Request]) -> None:
        """Each admitted request's generation state (its tokens, text and stop conditions)."""
        for r in requests:
            r.row = Row(self.model, r.prompt_ids, r.opts, set() if r.ignore_eos else self._stop_ids)

    def _advance_admission(self) -> None:
        """The admission's next prefill part (a chunk); once its last has run, its requests' first
        tokens, and their slots decode from the next step on."""
        admission = self._admission
        done = admission.advance()
        self.stats["prefill_chunks"] += 1
        if done:
            self._admission, self._admitting = None, []
            for slot, first in zip(admission.slots, admission.firsts):
                self._push(slot, first)

    def _step(self, batch: DecodeBatch) -> None:
        active_B = self._active_rows()
        t0 = time.perf_counter()
        sampled_B = batch.decode(active_B)
        t1 = time.perf_counter()
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += int(active_B.sum())
        if self._admission is not None:
            self.stats["decode_steps_between_prefill_chunks"] += 1
        for b in np.flatnonzero(active_B):
            self._push(int(b), int(sampled_B[b]))
        self.stats["decode_seconds"] += t1 - t0
        self._count_model_work(batch)
        self.stats["emit_seconds"] += time.perf_counter() - t1

    def _count_model_work(self, batch: DecodeBatch) -> None:
        """A decode step's host-CPU seconds and experts by path (an offloaded model's; zeros otherwise)."""
        last = batch.last_stats
        self.stats["decode_host_cpu_seconds"] += float(sum(last.host_cpu_seconds))
        for key, n in (("on_device", last.experts_on_device), ("fetched", last.experts_fetched),
                       ("on_host_cpu", last.experts_on_host_cpu)):
            self.stats["decode_experts_" + key] += int(n)

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
