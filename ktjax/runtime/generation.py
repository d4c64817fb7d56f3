"""Text generation: padded static-shape prefill, a compiled decode step per token, sampling, stop
strings, and the limits the model was loaded for. Works with any executor (`ktjax.runtime.model`).

A generation holds the model's lock from prefill to its last step: the KV cache and each step's
expert chunks are what the placement plan budgets for one generation at a time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ktjax.runtime.model import LoadedModel, Sampling, StepStats
from ktjax.runtime.shapes import batch_bucket, cache_length, padded_prompt_length
from ktjax.text import require_tokenizer


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = "length"  # "eos", "stop" or "length"
    # Offloaded models: transfers from host memory, where experts ran, and where the time went.
    prefill_host_bytes: int = 0
    decode_host_bytes_per_step: float = 0.0
    decode_host_gb_per_s: float = 0.0
    decode_experts_per_step: dict[str, float] = dataclasses.field(default_factory=dict)  # by path
    segment_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # with profiling on
    device_memory_bytes: int | None = None  # in use at the end (GPUs report it)
    peak_device_memory_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GenerationResult:
    text: str | None
    token_ids: list[int]  # new tokens only
    stats: GenerationStats


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def tokenizer_of(model: LoadedModel, needed: bool):
    return require_tokenizer(model.tokenizer, model.path) if needed else model.tokenizer


def encode(model: LoadedModel, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer_of(model, True).encode(prompt))
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    return ids


def stop_token_ids(model: LoadedModel) -> set[int]:
    """The token ids that end a generation: the tokenizer's end-of-sequence ids, else the config's."""
    tok = model.tokenizer
    if tok is not None and tok.eos_token_ids:
        return set(tok.eos_token_ids)
    eos = model.config.eos_token_id
    return set(eos) if isinstance(eos, tuple) else ({eos} if eos is not None else set())


def _is_batch(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))


def check_limits(model: LoadedModel, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """One clear error for a generation the model was not loaded for (batch, context, positions)."""
    plan, cfg = model.placement, model.config
    if len(prompt_lengths) > plan.max_batch:
        raise ValueError(f"{len(prompt_lengths)} prompts exceed the batch the model was loaded for ({plan.max_batch}); "
                         f"load it with max_batch={len(prompt_lengths)} (--max-batch)")
    longest = max(prompt_lengths) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({max(prompt_lengths)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's {cfg.max_position_embeddings} positions (max_position_embeddings)")
    if longest > plan.max_context:
        raise ValueError(f"prompt ({max(prompt_lengths)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context the model was loaded for ({plan.max_context}); load it with "
                         f"max_context={longest} (--max-context) or ask for fewer tokens")


class Row:
    """Per-prompt state: new tokens, incremental text, stop detection."""

    def __init__(self, model, prompt_ids: list[int], opts: SamplingOptions, stop_ids: set[int]):
        self.prompt_ids, self.opts, self.stop_ids = prompt_ids, opts, stop_ids
        tok = tokenizer_of(model, bool(opts.stop))
        self.decoder = tok.stream_decoder(skip_special_tokens=True) if tok is not None else None
        self.ids: list[int] = []
        self.text = "" if tok is not None else None
        self.emitted = 0  # characters of self.text already streamed
        self.done = False
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def push(self, token: int) -> None:
        self.ids.append(token)
        if token in self.stop_ids:
            self.done, self.stats.finish_reason = True, "eos"
        elif self.decoder is not None:
            piece = self.decoder.push(token)
            self._add_text(piece)
        if not self.done and len(self.ids) >= self.opts.max_new_tokens:
            self.done = True
        if self.done and self.decoder is not None and self.stats.finish_reason != "stop":
            self._add_text(self.decoder.flush())

    def _add_text(self, piece: str) -> None:
        if not piece:
            return
        look_from = max(0, len(self.text) - max((len(s) for s in self.opts.stop), default=0))
        self.text += piece
        cut = min((i for i in (self.text.find(s, look_from) for s in self.opts.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.done, self.stats.finish_reason = True, "stop"

    def ready_text(self) -> str:
        """New text safe to show: nothing that might still grow into a stop string."""
        if self.text is None:
            return ""
        end = len(self.text)
        if not self.done:
            for s in self.opts.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _steps(model: LoadedModel, prompts: list[list[int]], opts: SamplingOptions, profile: bool = False
           ) -> Iterator[list[Row]]:
    """Runs generation under the model's lock, yielding the rows after the prefill and after every
    decode step."""
    check_limits(model, [len(p) for p in prompts], opts.max_new_tokens)
    with model.lock:
        yield from _generate(model, prompts, opts, profile)


@jax.jit
def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key kept, this step's): `jax.random.split`'s two halves, in one program."""
    pair = jax.random.split(key)
    return pair[0], pair[1]


def _generate(model: LoadedModel, prompts: list[list[int]], opts: SamplingOptions, profile: bool) -> Iterator[list[Row]]:
    t0 = time.perf_counter()
    ex = model.executor
    stop_ids = stop_token_ids(model)
    rows = [Row(model, p, opts, stop_ids) for p in prompts]
    B = batch_bucket(len(rows))
    lengths = np.array([len(p) for p in prompts] + [1] * (B - len(rows)), np.int32)
    padded = padded_prompt_length(int(lengths.max()))
    max_len = cache_length(int(lengths.max()), opts.max_new_tokens)
    cache = ex.init_cache(B, max_len)
    key = jax.random.key(opts.seed)
    sampling = Sampling.of(opts.temperature, opts.top_k, opts.top_p)

    tokens = np.zeros((B, padded), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    key, sub = split_key(key)
    first_B, cache, prefill = ex.prefill(cache, tokens, lengths, sub, sampling, profile=profile)
    next_B = np.asarray(first_B)
    t_first = time.perf_counter()
    for b, row in enumerate(rows):
        row.push(int(next_B[b]))
        row.stats.time_to_first_token_s = t_first - t0
    yield rows

    # One step ahead: each step is dispatched from the previous step's tokens on the device before this loop
    # reads them, so the device does not wait for the loop's Python between steps (a resident model's step is
    # one program). A row that ends on a token read here leaves one step computed and never read.
    steps: list[StepStats] = []
    pos = lengths.copy()
    todo = opts.max_new_tokens - 1  # decode steps the longest row may need
    tokens_B, ahead = first_B, None  # ahead: the step dispatched and not yet read, (sampled, stats)
    while True:
        launched = None
        if todo > 0 and not all(r.done for r in rows):
            key, sub = split_key(key)
            tokens_B, cache, stats = ex.decode(cache, tokens_B, pos, sub, sampling, profile=profile)
            launched, todo, pos = (tokens_B, stats), todo - 1, np.minimum(pos + 1, max_len - 1)
        if ahead is not None and not all(r.done for r in rows):
            steps.append(ahead[1])
            next_B = np.asarray(ahead[0])
            for b, row in enumerate(rows):
                if not row.done:
                    row.push(int(next_B[b]))
            yield rows
        elif launched is None:
            break
        ahead = launched

    t_end = time.perf_counter()
    summary = _step_summary(prefill, steps)
    for row in rows:
        row.stats.new_tokens = len(row.ids)
        row.stats.total_s = t_end - t0
        decode_tokens = len(row.ids) - 1
        row.stats.decode_tokens_per_s = decode_tokens / (t_end - t_first) if decode_tokens and t_end > t_first else 0.0
        for k, v in summary.items():
            setattr(row.stats, k, v)


def _step_summary(prefill: StepStats, decode: list[StepStats]) -> dict[str, Any]:
    """Host->device traffic and expert paths of a generation's steps, and device memory in use."""
    out: dict[str, Any] = {"prefill_host_bytes": prefill.bytes_from_host}
    try:
        mem = jax.devices()[0].memory_stats() or {}
        out.update(device_memory_bytes=mem.get("bytes_in_use"), peak_device_memory_bytes=mem.get("peak_bytes_in_use"))
    except Exception:  # backends without memory statistics
        pass
    segments: dict[str, float] = {}
    for s in [prefill, *decode]:
        for k, v in s.segment_seconds.items():
            segments[k] = segments.get(k, 0.0) + v
    out["segment_seconds"] = segments
    if decode:
        seconds = sum(s.seconds for s in decode)
        moved = sum(s.bytes_from_host for s in decode)
        out.update(decode_host_bytes_per_step=moved / len(decode),
                   decode_host_gb_per_s=moved / seconds / 1e9 if seconds else 0.0,
                   decode_experts_per_step={
                       "device": sum(s.experts_on_device for s in decode) / len(decode),
                       "link": sum(s.experts_fetched for s in decode) / len(decode),
                       "host_cpu": sum(s.experts_on_host_cpu for s in decode) / len(decode)})
        early = sum(s.experts_early for s in decode)
        if early:  # the executor's lookahead: of the link's experts, those fetched a layer early, and used
            out["decode_experts_per_step"].update(link_early=early / len(decode),
                                                  early_used=sum(s.experts_early_used for s in decode) / len(decode))
    return out


def _options(max_new_tokens, temperature, top_p, top_k, seed, stop) -> SamplingOptions:
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingOptions(max_new_tokens, temperature, top_p, top_k, seed, stop)


def generate(model: LoadedModel, prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, stop: str | Sequence[str] | None = None, profile: bool = False):
    """Generate from a string, a list of token ids, or a list of either (a batch -> list of results).
    profile: time every segment (waits after each, so it runs slower; offloaded models)."""
    opts = _options(max_new_tokens, temperature, top_p, top_k, seed, stop)
    batch = _is_batch(prompt)
    prompts = [encode(model, p) for p in (prompt if batch else [prompt])]
    rows = None
    for rows in _steps(model, prompts, opts, profile):
        pass
    results = [GenerationResult(r.text, r.ids, r.stats) for r in rows]
    return results if batch else results[0]


def stream(model: LoadedModel, prompt: str | Sequence[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: str | Sequence[str] | None = None,
           stats: GenerationStats | None = None, profile: bool = False) -> Iterator[str]:
    """Yield text pieces of one prompt as they are generated (needs the model's tokenizer)."""
    tokenizer_of(model, True)
    opts = _options(max_new_tokens, temperature, top_p, top_k, seed, stop)
    rows = None
    for rows in _steps(model, [encode(model, prompt)], opts, profile):
        piece = rows[0].ready_text()
        if piece:
            yield piece
    if stats is not None:
        for f in dataclasses.fields(GenerationStats):
            setattr(stats, f.name, getattr(rows[0].stats, f.name))


def chat_prompt(model: LoadedModel, messages: Sequence[dict[str, str]], *, thinking: bool | None = None) -> list[int]:
    tok = tokenizer_of(model, True)
    text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, thinking=thinking)
    return list(tok.encode(text, add_special_tokens=False))


def chat(model: LoadedModel, messages: Sequence[dict[str, str]], *, thinking: bool | None = None, **kwargs
         ) -> GenerationResult:
    """Generate the assistant's reply to a conversation, rendered with the model's chat template."""
    return generate(model, chat_prompt(model, messages, thinking=thinking), **kwargs)
