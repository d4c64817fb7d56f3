"""Fine-tuning data: JSONL records -> token ids with a loss mask -> padded, bucketed batches.

Record forms (one JSON object per line; blank lines are skipped):
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
      rendered with the model's chat template (tokenizer_config.json's `chat_template`) exactly as
      chat inference renders it: each assistant turn's context is the prompt `chat_prompt` builds
      for the messages before it (R1's ends with "<think>\n"), and the loss counts only the reply
      the model should generate after that prompt, end-of-sentence token included (see
      ktjax.text.chat_turns). An assistant message's reasoning (`reasoning_content`, or R1's inline
      "<think>...</think>" block) is trained only with keep_reasoning; R1's replies then read
      "{reasoning}\n</think>\n\n{answer}" after the prompt, and "\n</think>\n\n{answer}" without it.
      Turns whose prompts continue one token sequence (V3's) share an example; R1's history shows an
      earlier reply without the `<think>` block its turn was trained with, so each R1 turn is an
      example of its own.
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

from ktjax.text import assistant_turns

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
    path = os.path.expanduser(os.fspath(path))
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


def encode_chat(messages: Sequence[dict], tokenizer, where: str = "messages", *, keep_reasoning: bool = False,
                thinking: bool | None = None) -> list[Example]:
    """The assistant turns of a conversation as examples: context tokens are exactly the prompt chat
    inference feeds the model before each reply, target tokens exactly the reply.

    keep_reasoning: train the messages' reasoning too. thinking: what chat inference passes
    (`chat_prompt(..., thinking=)`), so that training sees the same generation prompt.
    """
    try:
        turns = assistant_turns(tokenizer, messages, keep_reasoning=keep_reasoning, thinking=thinking)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if not turns:
        raise ValueError(f"{where}: no assistant message after another message, so nothing to learn")
    return pack_turns([(tokenizer.encode(t.prompt, add_special_tokens=False),
                        tokenizer.encode(t.reply, add_special_tokens=False)) for t in turns])


def pack_turns(turns: Sequence[tuple[list[int], list[int]]]) -> list[Example]:
    """Examples from (context, target) ids in conversation order: a turn whose context starts with the
    whole example so far extends it; any other starts a new example. Every target's context stays
    exactly its own context."""
    examples: list[Example] = []
    ids: list[int] = []
    mask: list[bool] = []
    for context, target in turns:
        if context[:len(ids)] != ids:
            examples.append(Example(np.asarray(ids, np.int32), np.asarray(mask, bool)))
            ids, mask = [], []
        mask += [False] * (len(context) - len(ids)) + [True] * len(target)
        ids = context + target
    examples.append(Example(np.asarray(ids, np.int32), np.asarray(mask, bool)))
    return examples


def encode_record(rec: dict, tokenizer, where: str = "record", *, keep_reasoning: bool = False,
                  thinking: bool | None = None) -> list[Example]:
    """The examples of one record (several only for a conversation whose turns cannot share one)."""
    form = check_record(rec, where)
    if form == "messages":
        return encode_chat(rec["messages"], tokenizer, where, keep_reasoning=keep_reasoning, thinking=thinking)
    if form == "prompt":
        p = tokenizer.encode(rec["prompt"], add_special_tokens=True) if rec["prompt"] else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        c = tokenizer.encode(rec["completion"], add_special_tokens=False)
        eos = list(tokenizer.eos_token_ids[:1])
        return [Example(np.asarray(p + c + eos, np.int32),
                        np.asarray([False] * len(p) + [True] * (len(c) + len(eos))))]
    t = tokenizer.encode(rec["text"], add_special_tokens=True)
    return [Example(np.asarray(t, np.int32), np.asarray([False] + [True] * (len(t) - 1)))]


def load_dataset(data: str | os.PathLike | Sequence[dict], tokenizer, *, seq_len: int, eval_fraction: float = 0.0,
                 eval_data: str | os.PathLike | Sequence[dict] | None = None, seed: int = 0,
                 vocab_size: int | None = None, keep_reasoning: bool = False,
                 thinking: bool | None = None) -> Dataset:
    """Read, check and tokenize every record (errors name the file and line), truncate to seq_len,
    and split off a held-out set: `eval_data` if given, else a seeded `eval_fraction` of the records
    (whole records: the turns of one conversation share their context, so they stay on one side).

    keep_reasoning, thinking: as for `encode_chat`; pass the `thinking` chat inference will use."""
    if tokenizer is None:
        raise ValueError("fine-tuning needs the model's tokenizer (tokenizer.json in the checkpoint directory)")
    options = dict(seq_len=seq_len, vocab_size=vocab_size, keep_reasoning=keep_reasoning, thinking=thinking)
    records, trunc, drop, source = _encode_all(data, tokenizer, **options)
    if eval_data is not None:
        held_out, t2, d2, _ = _encode_all(eval_data, tokenizer, **options)
        trunc, drop = trunc + t2, drop + d2
    elif eval_fraction > 0 and len(records) >= 2:
        n_eval = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
        held = set(np.random.default_rng(seed).permutation(len(records))[:n_eval].tolist())
        held_out = [r for k, r in enumerate(records) if k in held]
        records = [r for k, r in enumerate(records) if k not in held]
    else:
        held_out = []
    train = [ex for record in records for ex in record]
    if not train:
        raise ValueError(f"{source}: no training examples with a target token within seq_len={seq_len}")
    return Dataset(train, [ex for record in held_out for ex in record], source, trunc, drop)


def _encode_all(data, tokenizer, *, seq_len: int, vocab_size: int | None, keep_reasoning: bool,
                thinking: bool | None) -> tuple[list[list[Example]], int, int, str]:
    """(each record's examples that keep a target within seq_len, examples truncated, examples
    dropped, source name); records left without examples are left out."""
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
        kept = []
        for ex in encode_record(rec, tokenizer, where, keep_reasoning=keep_reasoning, thinking=thinking):
            if vocab_size is not None and len(ex) and int(ex.ids.max()) >= vocab_size:
                raise ValueError(f"{where}: token id {int(ex.ids.max())} is outside the model's vocabulary "
                                 f"({vocab_size}); is this the model's tokenizer?")
            if len(ex) > seq_len:
                ex = Example(ex.ids[:seq_len], ex.mask[:seq_len])
                truncated += 1
            ex.mask[:1] = False  # the first token is never predicted
            if ex.mask.any():
                kept.append(ex)
            else:
                dropped += 1
        if kept:
            out.append(kept)
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
           "eval_batches", "length_buckets", "load_dataset", "pack_turns", "pad_id_of", "read_jsonl"]
