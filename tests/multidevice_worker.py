"""Runs in a subprocess of tests/test_multidevice.py with 4 forced host-platform CPU devices (XLA_FLAGS
must be set before jax starts, hence a process of its own): loads one checkpoint on 1, 2 and 4
devices and writes what each run computed, where its experts live, and the error lines, to an npz.

usage: multidevice_worker.py CHECKPOINT OUT.npz
"""

import dataclasses
import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh

import ktjax
from ktjax.runtime import resident

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
# Experts 0-4 in host memory, 5-7 on the device: on 4 devices, device 0 and 1 own host experts only,
# device 2 one of each, device 3 resident ones only.
SOME_HOST = {r"model\.layers\.\d+\.mlp\.experts\.[0-4]": "host"}
# How each run's model is loaded: one device (the ordinary path), the resident executor's shard_map
# over one, two and four devices, and the offloaded executor on two and four.
RUNS = {"single": {}, "mesh1": "mesh1", "devices2": dict(devices=2), "devices4": dict(devices=4),
        "offload2": dict(devices=2, placement=ALL_HOST), "offload4": dict(devices=4, placement=SOME_HOST)}


def load(path: str, run) -> ktjax.LoadedModel:
    kwargs = dict(mesh=Mesh(np.array(jax.devices()[:1]), ("expert",))) if run == "mesh1" else run
    model = ktjax.load(path, dtype="float32", max_batch=2, max_context=16, **kwargs)
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=None))


def decode_logits(model, tokens: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of each position after `prompt`, one token at a time through the KV cache."""
    ex = model.executor
    B, T = tokens.shape
    cache = ex.init_cache(B, 16)
    if ex.mesh is None:  # committed to the device as the steps' caches are: one compiled step, not two
        cache = jax.device_put(cache, jax.devices()[0])
    _, cache = ex.chunk_logits(cache, tokens[:, :prompt], np.zeros((B,), np.int32))
    out = []
    for t in range(prompt, T):
        logits, cache = ex.chunk_logits(cache, tokens[:, t:t + 1], np.full((B,), t, np.int32))
        out.append(np.asarray(logits[:, 0]))
    return np.stack(out, axis=1)


def served(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of one request in slot 1 of a serving batch of 2 (its steps run in a batch of one,
    the slot's cache rows taken out of the batch's and put back)."""
    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch
    batch = DecodeBatch(model, 2, cache_length(len(prompt), new_tokens))
    batch.warm_up()
    tokens = batch.prefill_into([1], [prompt], [SamplingOptions(new_tokens)])
    for _ in range(new_tokens - 1):
        tokens.append(int(batch.decode(np.array([False, True]))[1]))
    return tokens


def expert_shards(model) -> list[list[int]]:
    """Resident: per addressable shard of layer-stacked gate_proj [L, E, F, D]: device id, first
    expert, count. Offloaded: per store (one per device) and expert it holds: store, layer, expert,
    device id of its array, 1 if in pinned host memory."""
    ex = model.executor
    if not hasattr(ex, "stores"):
        leaf = ex.params["moe_layers"]["mlp"]["experts"]["gate_proj"][...]
        return [[s.device.id, s.index[1].start or 0, s.data.shape[1]] for s in leaf.addressable_shards]
    return [[d, i, e, w.w.sharding.device_set.pop().id, int(w.w.sharding.memory_kind == "pinned_host")]
            for d, store in enumerate(ex.stores) for i, slots in store.experts.items()
            for e, w in enumerate(slots) if w is not None]


def core_shards(model) -> list[list[int]]:
    """Per addressable shard of the embedding: device id and rows held (all of them when replicated)."""
    ex = model.executor
    leaf = ex.top["embed_tokens"] if hasattr(ex, "top") else ex.params["embed_tokens"][...]
    return [[s.device.id, s.data.shape[0]] for s in leaf.addressable_shards]


def collectives(model, tokens: np.ndarray) -> list[str]:
    """Which cross-device collectives the compiled prefill program holds."""
    ex = model.executor
    text = ex.programs.forward.lower(ex.param_arrays, ex.init_cache(*tokens.shape), tokens,
                                     np.zeros(tokens.shape[0], np.int32)).compile().as_text()
    return [op for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
            if f" {op}(" in text or f" {op}-start(" in text]


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def error_line(path: str, **kwargs) -> str:
    return error_of(lambda: ktjax.load(path, dtype="float32", **kwargs))


def errors(path: str) -> dict[str, str]:
    devs = np.array(jax.devices())
    return {
        "more_than_here": error_line(path, devices=8),
        "not_dividing": error_line(path, devices=3),
        "no_expert_axis": error_line(path, mesh=Mesh(devs[:2], ("data",))),
        "other_axis": error_line(path, mesh=Mesh(devs.reshape(2, 2), ("data", "expert"))),
        "both": error_line(path, devices=2, mesh=Mesh(devs[:2], ("expert",))),
        "host_cpu": error_line(path, devices=2, experts="int8", expert_compute="cpu"),
    }


def main(path: str, out: str) -> None:
    tokens = np.random.default_rng(1).integers(0, 97, (2, 7))
    prompt = tokens[0, :5].tolist()
    results = {"devices": len(jax.devices())}
    for name, run in RUNS.items():
        model = load(path, run)
        results[f"{name}/prefill"] = np.asarray(ktjax.logits(model, tokens))
        results[f"{name}/decode"] = decode_logits(model, tokens, 4)
        generated = ktjax.generate(model, prompt, max_new_tokens=8)
        results[f"{name}/greedy"] = np.asarray(generated.token_ids)
        results[f"{name}/served"] = np.asarray(served(model, prompt, 8))
        results[f"{name}/streamed_per_step"] = generated.stats.decode_experts_per_step["link"]
        results[f"{name}/expert_shards"] = np.asarray(expert_shards(model))
        results[f"{name}/core_shards"] = np.asarray(core_shards(model))
        results[f"{name}/plan_devices"] = model.placement.devices
        if name == "devices2":
            results["devices2/collectives"] = json.dumps(collectives(model, tokens))
        if name in ("devices2", "offload2"):
            results[f"{name}/trainer_error"] = error_of(lambda: model.executor.trainer(None, None, None))
    results["errors"] = json.dumps(errors(path))
    np.savez(out, tokens=tokens, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
