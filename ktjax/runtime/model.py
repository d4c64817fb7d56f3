"""The one loaded-model type and the protocol of the executors behind it.

A `LoadedModel` is data: config, placement plan, tokenizer, generation defaults, adapter, and an
`Executor` that runs the model's compiled segments where its parameters live:

    ResidentExecutor   every parameter on the device; one scanned program per step
                       (`ktjax.runtime.resident`)
    OffloadedExecutor  core parameters on the device, routed experts apart (on the device, in
                       host memory streamed over the link, or computed on the host CPU), one
                       segment per layer phase (`ktjax.runtime.offload`)

Executors keep no per-call state: each call returns its own `StepStats`. A generation holds the
model's lock from its prefill to its last step (its KV cache and each step's expert chunks are
what the plan budgets for one), so threads may share a model: their generations take turns.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Generator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.config import ModelConfig
from ktjax.models import KVCache
from ktjax.runtime.placement import PlacementPlan, fmt_bytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Traced sampling settings (changing them never recompiles): temperature 0 is greedy."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampling:
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


@dataclasses.dataclass
class StepStats:
    """What one prefill or decode step moved and where its time went (returned with each call)."""

    bytes_from_host: int = 0
    experts_fetched: int = 0  # streamed over the link
    experts_on_host_cpu: int = 0  # computed where they live
    experts_on_device: int = 0  # resident in device memory
    experts_early: int = 0  # of experts_fetched: fetched a MoE layer early, on a guess (the executor's lookahead)
    experts_early_used: int = 0  # of those, the ones their layer then chose
    seconds: float = 0.0
    segment_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # with profiling on
    # When each MoE layer's routing reached the host, in seconds from the step's start: the spacing
    # is the per-layer time.
    routed_at: list[float] = dataclasses.field(default_factory=list)
    # Per MoE layer: how many tokens chose each expert (what a hot-expert placement is chosen from).
    expert_counts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    # Per MoE layer: seconds the host CPU spent on its experts, and bytes its link path moved.
    host_cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    link_bytes: list[int] = dataclasses.field(default_factory=list)
    # What the step's threads spent their time on, in seconds from its start: (what, start, end) for each
    # segment's dispatch (the Python call; the device runs it later), each wait on the device, and each MoE
    # layer's host-side work (its split, the link's transfers started, the host CPU's share). Unprofiled: it
    # shows where a step's Python time goes without waiting on each segment.
    timeline: list[tuple[str, float, float]] = dataclasses.field(default_factory=list, repr=False)
    started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def span(self, what: str, since: float) -> None:
        """Add (what, since, now) to the timeline; since: a `time.perf_counter()` reading."""
        self.timeline.append((what, since - self.started, time.perf_counter() - self.started))

    def add(self, other: StepStats) -> None:
        """Count another part of the same step's transfers and segment times (a device's, over several)."""
        self.bytes_from_host += other.bytes_from_host
        self.experts_fetched += other.experts_fetched
        self.experts_on_device += other.experts_on_device
        self.experts_early += other.experts_early
        self.experts_early_used += other.experts_early_used
        for name, seconds in other.segment_seconds.items():
            self.segment_seconds[name] = self.segment_seconds.get(name, 0.0) + seconds

    def finish(self) -> StepStats:
        self.seconds = time.perf_counter() - self.started
        return self


class Executor(Protocol):
    """What generation, evaluation and training drive; both executors implement it."""

    config: ModelConfig

    def init_cache(self, batch: int, max_len: int) -> KVCache: ...

    def prefill(self, cache: KVCache, tokens_BT: np.ndarray, lengths_B: np.ndarray, key: jax.Array,
                sampling: Sampling) -> tuple[jax.Array, KVCache, StepStats]:
        """The (padded) prompts from position 0; the next token of each row, sampled from the
        logits at its last prompt position with `key`. Runs `prefill_steps` to its end."""

    def prefill_steps(self, cache: KVCache, tokens_BT: np.ndarray, lengths_B: np.ndarray, key: jax.Array,
                      sampling: Sampling) -> Generator[None, None, tuple[jax.Array, KVCache, StepStats]]:
        """`prefill` as a generator: it yields between the parts of the prompts' prefill it runs
        separately (resident: each chunk of at most the largest prompt bucket; offloaded: none, the
        whole prefill is one part) and returns prefill's (token_B, cache, stats). A caller may run
        other work on the model between parts (a serving batch's decode steps) with other caches;
        the parts' device work is dispatched in order, so the result is the same. `run_steps`
        drives one to its end."""

    def decode(self, cache: KVCache, token_B: jax.Array, pos_B: jax.Array, key: jax.Array,
               sampling: Sampling, *, active_B: np.ndarray | None = None) -> tuple[jax.Array, KVCache, StepStats]:
        """One token per row at position pos_B; the next token of each row. active_B (host bools):
        the rows that matter; an executor may skip work for the others (offloaded: their experts are
        not moved), whose tokens are then garbage."""

    def compile_decode(self, batch: int) -> int:
        """Run once every program a decode step of `batch` rows may meet beyond the ones its shape decides
        (offloaded: the fused MoE programs each routing split takes), so that a server's streams never wait
        for a compile mid-stream; returns how many ran (resident: 0, its step is one program)."""

    def logits(self, tokens_BT: np.ndarray) -> jax.Array:
        """float32 logits [B, T, V] of a full forward pass from position 0."""

    def chunk_logits(self, cache: KVCache, tokens_BT: np.ndarray, start_B: np.ndarray) -> tuple[jax.Array, KVCache]:
        """float32 logits [B, T, V] of a chunk at positions start[b] + t, and the updated cache."""

    def trainer(self, lora, sites, train_config) -> Any:
        """The LoRA training step for this executor (`ktjax.train`)."""

    def with_adapter(self, adapters, lora, *, merge: bool | None = None) -> Executor:
        """This executor computing with a LoRA adapter (merge=None: the executor's own way)."""

    @property
    def dtype(self): ...


def run_steps(steps: Generator[Any, None, Any]) -> Any:
    """What a generator (an executor's `prefill_steps`) returns, after running every part of it."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: `ktjax.load` returns one, everything in the public API takes one."""

    config: ModelConfig
    executor: Executor
    placement: PlacementPlan
    tokenizer: Any = None
    generation_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter: Any = None  # the applied LoRA adapter (adapters, LoRAConfig), if any
    path: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def dtype(self):
        return self.executor.dtype

    def __repr__(self) -> str:
        cfg, plan = self.config, self.placement
        where = (f"{len(plan.host_experts)} of {len(plan.host_experts) + len(plan.device_experts)} experts in host "
                 f"memory" if plan.offloaded else "all on the device")
        adapter = ", LoRA adapter" if self.adapter is not None else ""
        if plan.devices > 1:
            where += f", experts split over {plan.devices} devices"
        return (f"LoadedModel({self.path or 'in memory'}: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
                f"{cfg.n_routed_experts} experts/layer as {plan.expert_format.name}, {jnp.dtype(self.dtype).name}, "
                f"{where}, {fmt_bytes(plan.device_bytes)} on the device{adapter})")
