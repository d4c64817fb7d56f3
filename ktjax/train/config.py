"""The settings of a LoRA fine-tuning run's optimisation: batch shapes, schedule, AdamW."""

from __future__ import annotations

import dataclasses

import functools
from collections.abc import Callable

import jax
import optax

# optax >= 0.2.4 spells it optax.tree.norm; older releases optax.global_norm.
tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    seq_len: int = 1024
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    remat: bool = True
    loss_chunk: int = 1024  # tokens per chunk of the LM head + cross-entropy

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "loss_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup, self.steps) if self.warmup is not None else min(100, self.steps // 10)

    def schedule(self) -> optax.Schedule:
        w = self.warmup_steps
        return optax.warmup_cosine_decay_schedule(0.0 if w else self.lr, self.lr, w, max(self.steps, w + 1),
                                                  end_value=self.lr * self.min_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        if self.max_grad_norm:
            return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)
        return adamw


@functools.lru_cache(maxsize=8)
def optimizer_init(tc: TrainConfig) -> Callable:
    """The optimizer's init, jitted (one compile, not one per leaf) and cached per config."""
    return jax.jit(tc.optimizer().init)
