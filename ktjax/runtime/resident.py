"""The resident executor: every parameter on the device, each step one compiled program (the
scanned model), pure functions of (params, cache, inputs) jitted with static shapes. Over several
devices (a mesh, `ktjax.runtime.mesh`) the same programs run with the routed experts split over
the devices and everything else replicated: the sharding is in the parameters and the graph."""

from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.io.load import abstract_params
from ktjax.lora.merge import merge_stacked, with_lora_params
from ktjax.models import DeepseekForCausalLM, KVCache
from ktjax.runtime.mesh import replicated
from ktjax.runtime.model import Sampling, StepStats, run_steps
from ktjax.runtime.sampling import sample_rows, sample_segment
from ktjax.runtime.shapes import prefill_chunks
from ktjax.train.resident import ResidentTrainer


class Programs(NamedTuple):
    """The resident executor's compiled programs for one module structure; params: plain nested dicts of
    arrays (`nnx.to_pure_dict`)."""

    forward: Callable  # (params, cache, tokens_BT, start_B) -> (logits [B, T, V], cache)
    prefill_chunk: Callable  # (params, cache, tokens_BT, start_B, last_B, kept_BV, ends_here_B) -> (kept_BV, cache)
    decode: Callable  # (params, cache, token_B, pos_B, key, sampling) -> (token_B, cache)


@functools.cache
def programs(graphdef: nnx.GraphDef) -> Programs:
    """The programs with the module's structure bound in, shared by executors of equal structure. Why not a
    static graphdef argument and the parameters as an `nnx.State`: each call would hash the one and flatten
    the other in Python, ~0.7 ms of a decode step on the dev box, more than the embedded model's step."""
    merge = functools.partial(nnx.merge, graphdef)

    def forward(params, cache: KVCache, tokens_BT, start_B):
        """Logits [B, T, V] of a chunk at positions start[b] + t, and the updated cache."""
        return merge(params)(tokens_BT, start_B, cache)

    def prefill_chunk(params, cache, tokens_BT, start_B, last_B, kept_BV, ends_here_B):
        """Write a (padded) chunk into the cache; the logits at row b's position last_B[b] replace
        kept_BV[b] where the row's prompt ends in this chunk."""
        module = merge(params)
        x_BTD, cache = module.hidden(tokens_BT, start_B, cache)
        x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
        logits_BV = module.head(x_B1D)[:, 0]
        return jnp.where(ends_here_B[:, None], logits_BV, kept_BV), cache

    def decode(params, cache, token_B, pos_B, key, sampling: Sampling):
        logits_B1V, cache = merge(params)(token_B[:, None], pos_B, cache)
        return sample_rows(logits_B1V[:, 0], key, sampling), cache

    return Programs(jax.jit(forward, donate_argnums=1), jax.jit(prefill_chunk, donate_argnums=(1, 5)),
                    jax.jit(decode, donate_argnums=1))


class ResidentExecutor:
    """All parameters in one nnx state on the device (graphdef: the module's structure, a LoRA graph
    when an adapter rides along unmerged; base_params: the model's own parameters then). mesh: the
    expert mesh the parameters are placed on and the graph splits the routed experts over (None:
    one device)."""

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, *,
                 base_params: nnx.State | None = None, attention: str = "auto",
                 mesh: jax.sharding.Mesh | None = None):
        self.config, self.graphdef, self.params = config, graphdef, params
        self.programs, self.param_arrays = programs(graphdef), nnx.to_pure_dict(params)
        self.base_params = params if base_params is None else base_params
        self.attention = attention
        self.mesh = mesh

    @property
    def module(self) -> DeepseekForCausalLM:
        return nnx.merge(self.graphdef, self.params)

    @property
    def dtype(self):
        return self.params["embed_tokens"][...].dtype

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cache = KVCache.zeros(self.config, batch, max_len, self.dtype)
        # On a mesh, every device attends over every token: the cache is replicated like attention.
        return cache if self.mesh is None else jax.device_put(cache, replicated(self.mesh))

    def prefill(self, cache, tokens_BT, lengths_B, key, sampling, *, profile: bool = False):
        """The padded prompts chunk by chunk (`prefill_steps` run to its end)."""
        return run_steps(self.prefill_steps(cache, tokens_BT, lengths_B, key, sampling, profile=profile))

    def prefill_steps(self, cache, tokens_BT, lengths_B, key, sampling, *, profile: bool = False):
        """The padded prompts chunk by chunk (`shapes.prefill_chunks`: at most the largest prompt
        bucket at a time), yielding between chunks; each row's logits from the chunk its prompt ends
        in, sampled once at the end (so a seed samples what any executor samples). Returns
        (token_B, cache, stats)."""
        stats = StepStats()
        B = tokens_BT.shape[0]
        kept = jnp.zeros((B, self.config.vocab_size), jnp.float32)
        for i, (start, T) in enumerate(prefill_chunks(tokens_BT.shape[1])):
            if i:
                yield  # between chunks: the caller may run other programs on the device
            last = np.clip(lengths_B - 1 - start, 0, T - 1).astype(np.int32)
            ends_here = (lengths_B - 1 >= start) & (lengths_B - 1 < start + T)
            kept, cache = self.programs.prefill_chunk(
                self.param_arrays, cache, jnp.asarray(tokens_BT[:, start:start + T]), jnp.full((B,), start, jnp.int32),
                jnp.asarray(last), kept, jnp.asarray(ends_here))
        token_B = sample_segment(kept, key, sampling)
        if profile:
            jax.block_until_ready(token_B)
            stats.segment_seconds["prefill"] = time.perf_counter() - stats.started
        return token_B, cache, stats.finish()

    def decode(self, cache, token_B, pos_B, key, sampling, *, profile: bool = False, active_B=None):
        """active_B: accepted for the protocol; every row is computed in the one program anyway."""
        stats = StepStats()
        token_B, cache = self.programs.decode(self.param_arrays, cache, token_B, pos_B, key, sampling)
        if profile:
            jax.block_until_ready(token_B)
            stats.segment_seconds["decode_step"] = time.perf_counter() - stats.started
        return token_B, cache, stats

    def compile_decode(self, batch: int) -> int:
        return 0  # one program per decode shape: the decode steps compile it

    def logits(self, tokens_BT) -> jax.Array:
        B, T = np.shape(tokens_BT)
        return self.chunk_logits(self.init_cache(B, T), tokens_BT, np.zeros((B,), np.int32))[0]

    def chunk_logits(self, cache, tokens_BT, start_B):
        return self.programs.forward(self.param_arrays, cache, jnp.asarray(tokens_BT, jnp.int32),
                                     jnp.asarray(start_B, jnp.int32))

    def trainer(self, lora, sites, train_config) -> ResidentTrainer:
        if self.mesh is not None:  # its adapters and optimizer state live on one device
            raise ValueError(f"fine-tuning a model whose experts are split over {self.mesh.size} devices is not built "
                             "yet (load it without devices= or mesh=)")
        return ResidentTrainer(self, lora, sites, train_config)

    def with_adapter(self, adapters, lcfg, *, merge: bool | None = None) -> ResidentExecutor:
        """This model with a LoRA adapter: beside the base weights (exactly PEFT's forward; the
        default), or merged into them."""
        if merge:
            graphdef = abstract_params(self.config, self.dtype, attention=self.attention, expert_mesh=self.mesh)[0]
            return ResidentExecutor(self.config, graphdef, merge_stacked(self.base_params, adapters, lcfg),
                                    attention=self.attention, mesh=self.mesh)
        if self.mesh is not None:
            raise ValueError("an adapter beside the base weights is not built for several devices yet: merge it "
                             "(ktjax.load_adapter(model, DIR, merge=True))")
        graphdef, params = with_lora_params(self.config, self.dtype, self.base_params, adapters, lcfg,
                                            attention=self.attention)
        return ResidentExecutor(self.config, graphdef, params, base_params=self.base_params, attention=self.attention)
