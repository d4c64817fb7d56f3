"""Fine-tuning data: JSONL records -> token ids with a loss mask -> padded, bucketed batches.

Record forms (one JSON object per line; blank lines are skipped):
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
      rendered with the model's chat template (tokenizer_config.json's `chat_template`); the loss
      counts the assistant turns only: the tokens after each turn's generation prompt up to and
      including its end-of-sentence token. (DeepSeek-R1's template drops an assistant message's
      reasoning up to "</think>", so R1 trains on the answers of its messages, as it renders them.)
  {"prompt": "...", "completion": "..."}
      BOS + prompt + completion + EOS, loss on the completion and EOS.
  {"text": "..."}
      plain language modelling: loss on every token.

Mask convention (as ktjax.training): mask[t] says token t is a target, predicted from tokens < t.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: token t is a target

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # int32 [M, B, T] (M micro-batches of B rows, padded to a bucket T)
    mask: np.ndarray  # bool [M, B, T]
    real_tokens: int  # tokens that are not padding
    targets: int  # tokens the loss counts


@dataclasses.dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    source: str
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples with no target token left (after truncation)

    def fingerprint(self) -> str:
        """A hash of the training examples, to notice a changed data file on resume."""
        h = hashlib.sha256()
        for ex in self.train:
            h.update(ex.ids.tobytes())
            h.update(ex.mask.tobytes())
        return h.hexdigest()[:16]


def _where(source: str, line: int) -> str:
    return f"{source}:{line}" if line else source


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; ValueError naming file and line on bad JSON."""
    path = os.fspath(path)
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read data file ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise ValueError(f"{path}: no records (expected one JSON object per line)")
    return out


def check_record(rec: Any, where: str) -> str:
    """The record's form ("messages", "prompt" or "text"); ValueError `where: problem` otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"{where}: message {k} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"{where}: message {k} has role {m['role']!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and "tool_calls" in m):
                raise ValueError(f"{where}: message {k} ({m['role']}) needs a string 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message, so nothing to learn")
        return "messages"
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: '{key}' must be a string")
        if not rec["completion"]:
            raise ValueError(f"{where}: 'completion' is empty, so nothing to learn")
        return "prompt"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise ValueError(f"{where}: expected 'messages', 'prompt'/'completion' or 'text' "
                     f"(got keys {', '.join(sorted(map(str, rec))) or 'none'})")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_chat(messages: Sequence[dict], tokenizer, where: str = "messages") -> Example:
    """Render a conversation turn by turn with the chat template; mask the assistant replies.

    Each turn's text is what the template adds to the rendering of the turns before it. For an
    assistant turn, the part its generation prompt already gives (e.g. "<｜Assistant｜>") is
    context; the rest (reply and end-of-sentence) is target.
    """
    ids: list[int] = []
    mask: list[bool] = []

    def add(text: str, target: bool) -> None:
        if text:
            t = tokenizer.encode(text, add_special_tokens=False)
            ids.extend(t)
            mask.extend([target] * len(t))

    prev = ""
    for i, msg in enumerate(messages):
        try:
            text = tokenizer.apply_chat_template(list(messages[: i + 1]), add_generation_prompt=False)
            gen = (tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True)
                   if msg["role"] == "assistant" and i > 0 else "")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        if not text.startswith(prev):
            raise ValueError(f"{where}: the chat template does not render turn {i} as an extension of the turns "
                             "before it; cannot tell the assistant tokens apart")
        if msg["role"] == "assistant":
            start = max(len(prev), _common_prefix(gen, text))
            add(text[len(prev):start], False)
            add(text[start:], True)
        else:
            add(text[len(prev):], False)
        prev = text
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def encode_record(rec: dict, tokenizer, where: str = "record") -> Example:
    form = check_record(rec, where)
    if form == "messages":
        return encode_chat(rec["messages"], tokenizer, where)
    if form == "prompt":
        p = tokenizer.encode(rec["prompt"], add_special_tokens=True) if rec["prompt"] else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        c = tokenizer.encode(rec["completion"], add_special_tokens=False)
        eos = list(tokenizer.eos_token_ids[:1])
        return Example(np.asarray(p + c + eos, np.int32), np.asarray([False] * len(p) + [True] * (len(c) + len(eos))))
    t = tokenizer.encode(rec["text"], add_special_tokens=True)
    return Example(np.asarray(t, np.int32), np.asarray([False] + [True] * (len(t) - 1)))


def load_dataset(data: str | os.PathLike | Sequence[dict], tokenizer, *, seq_len: int, eval_fraction: float = 0.0,
                 eval_data: str | os.PathLike | Sequence[dict] | None = None, seed: int = 0,
                 vocab_size: int | None = None) -> Dataset:
    """Read, check and tokenize every record (errors name the file and line), truncate to seq_len,
    and split off a held-out set: `eval_data` if given, else a seeded `eval_fraction` of the records."""
    if tokenizer is None:
        raise ValueError("fine-tuning needs the model's tokenizer (tokenizer.json in the checkpoint directory)")
    train, trunc, drop, source = _encode_all(data, tokenizer, seq_len, vocab_size)
    if eval_data is not None:
        ev, t2, d2, _ = _encode_all(eval_data, tokenizer, seq_len, vocab_size)
        trunc, drop = trunc + t2, drop + d2
    elif eval_fraction > 0 and len(train) >= 2:
        n_eval = min(len(train) - 1, max(1, round(eval_fraction * len(train))))
        held = set(np.random.default_rng(seed).permutation(len(train))[:n_eval].tolist())
        ev = [ex for k, ex in enumerate(train) if k in held]
        train = [ex for k, ex in enumerate(train) if k not in held]
    else:
        ev = []
    if not train:
        raise ValueError(f"{source}: no training examples with a target token within seq_len={seq_len}")
    return Dataset(train, ev, source, trunc, drop)


def _encode_all(data, tokenizer, seq_len: int, vocab_size: int | None):
    if isinstance(data, (str, os.PathLike)):
        source = os.fspath(data)
        records = [(_where(source, n), rec) for n, rec in read_jsonl(source)]
    else:
        source = "data"
        records = [(f"data[{k}]", rec) for k, rec in enumerate(data)]
        if not records:
            raise ValueError("data: no records")
    out, truncated, dropped = [], 0, 0
    for where, rec in records:
        ex = encode_record(rec, tokenizer, where)
        if vocab_size is not None and len(ex) and int(ex.ids.max()) >= vocab_size:
            raise ValueError(f"{where}: token id {int(ex.ids.max())} is outside the model's vocabulary "
                             f"({vocab_size}); is this the model's tokenizer?")
        if len(ex) > seq_len:
            ex = Example(ex.ids[:seq_len], ex.mask[:seq_len])
            truncated += 1
        ex.mask[:1] = False  # the first token is never predicted
        if not ex.mask.any():
            dropped += 1
            continue
        out.append(ex)
    return out, truncated, dropped, source


# ---- batches ---------------------------------------------------------------------------------------

def length_buckets(seq_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Padded lengths: powers of two from `smallest` below seq_len, then seq_len (few compiled shapes)."""
    out, b = [], smallest
    while b < seq_len:
        out.append(b)
        b *= 2
    return tuple(out) + (seq_len,)


def bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


def pad_rows(rows: Sequence[Example], rows_total: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((rows_total, length), pad_id, np.int32)
    mask = np.zeros((rows_total, length), bool)
    for r, ex in enumerate(rows):
        tokens[r, :len(ex)] = ex.ids
        mask[r, :len(ex)] = ex.mask
    return tokens, mask


class Loader:
    """Seeded, shuffled, endless stream of training batches; batch k is a pure function of
    (examples, seed, k), so a resumed run sees exactly the batches it would have seen.

    Each step takes grad_accum micro-batches of batch_size examples, in the order of a fresh
    permutation per epoch, padded (right) to the smallest length bucket that holds them all.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, grad_accum: int, seq_len: int, seed: int,
                 pad_id: int, buckets: Sequence[int] | None = None):
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        self.examples = list(examples)
        self.batch_size, self.grad_accum, self.seq_len, self.seed = batch_size, grad_accum, seq_len, seed
        self.pad_id = pad_id
        self.buckets = tuple(buckets or length_buckets(seq_len))
        self._perms: dict[int, np.ndarray] = {}

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.examples)
        out = []
        for p in range(step * self.per_step, (step + 1) * self.per_step):
            out.append(int(self._order(p // n)[p % n]))
        return out

    def position(self, step: int) -> dict[str, int]:
        """Where the stream stands before `step`: examples consumed, epoch, index within the epoch."""
        p = step * self.per_step
        return {"examples_seen": p, "epoch": p // len(self.examples), "index": p % len(self.examples)}

    def batch(self, step: int) -> Batch:
        rows = [self.examples[i] for i in self.indices(step)]
        T = bucket(max(len(ex) for ex in rows), self.buckets)
        tokens, mask = pad_rows(rows, len(rows), T, self.pad_id)
        M, B = self.grad_accum, self.batch_size
        return Batch(tokens.reshape(M, B, T), mask.reshape(M, B, T), sum(len(ex) for ex in rows),
                     int(mask[:, 1:].sum()))


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int,
                 buckets: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The held-out set in order, batch_size rows at a time (the last batch padded with empty rows)."""
    buckets = tuple(buckets or length_buckets(seq_len))
    T = bucket(max(len(ex) for ex in examples), buckets)  # one shape for the whole set: one compile
    for k in range(0, len(examples), batch_size):
        yield pad_rows(examples[k:k + batch_size], batch_size, T, pad_id)


def pad_id_of(tokenizer) -> int:
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if getattr(tokenizer, "eos_token_ids", None):
        return int(tokenizer.eos_token_ids[0])
    return 0


__all__ = ["Batch", "Dataset", "Example", "Loader", "bucket", "check_record", "encode_chat", "encode_record",
           "eval_batches", "length_buckets", "load_dataset", "pad_id_of", "read_jsonl"]
