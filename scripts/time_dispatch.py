"""Host-side cost of one decode step: the offloaded executor's per-layer segments against the
resident executor's one scanned program, on a tiny random model (CPU is fine: what is measured is
Python and dispatch, not the device), and the compiled programs each step runs (counted where the
offloaded executor runs its segments: on a GPU at batch 1 the step waits on each one's dispatch), and
what a server's batch adds to a step of one request.

    python scripts/time_dispatch.py [--steps 30] [--repeats 1]   # with repeats: the median, and each
"""

import collections
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

import ktjax
from ktjax.config import ModelConfig
from ktjax.io.save import save_params
from ktjax.models import DeepseekForCausalLM
from ktjax.runtime.model import Sampling
from ktjax.runtime.offload.segments import Segments

from bench_serve import TimedExecutor  # this folder's serving benchmark: its executor with timed decode calls

CONFIG = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)


def ms_per_step(model, steps: int = 30) -> float:
    ex = model.executor
    cache = ex.init_cache(1, steps + 8)
    tok, key, sampling = jnp.zeros((1,), jnp.int32), jax.random.key(0), Sampling.of()
    for s in range(3):
        tok, cache, _ = ex.decode(cache, tok, jnp.asarray([s]), key, sampling)
    jax.block_until_ready(tok)
    t = time.perf_counter()
    for s in range(steps):
        tok, cache, _ = ex.decode(cache, tok, jnp.asarray([3 + s]), key, sampling)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t) / steps * 1e3


def programs_per_step(model, steps: int = 4) -> str:
    """The offloaded executor's segments per decode step, by name (each a dispatch)."""
    counts: collections.Counter = collections.Counter()
    call = Segments.__call__

    def counted(self, name, fn, *args, **kwargs):
        counts[name] += 1
        return call(self, name, fn, *args, **kwargs)

    Segments.__call__ = counted
    try:
        ms_per_step(model, steps)
    finally:
        Segments.__call__ = call
    # ms_per_step runs 3 untimed steps before its timed ones.
    per_step = {k: v / (steps + 3) for k, v in counts.items()}
    return f"{sum(per_step.values()):g} programs/step (" + ", ".join(f"{k} {v:g}" for k, v in per_step.items()) + ")"


def us_per_host_call(model, calls: int = 2000) -> float:
    """The host CPU's share of one MoE layer at batch 1 (2 of its 3 chosen experts), tiny experts: what a
    call costs beyond the experts' bytes (on the H200 machine: ~0.1 ms, offload.md run 14)."""
    import numpy as np
    host, layer = model.executor.host, model.config.moe_layers[0]
    idx_NK = np.array([[0, 3, 5]])
    w_NK = np.full((1, 3), 1 / 3, np.float32)
    h_ND = np.random.default_rng(0).standard_normal((1, model.config.hidden_size)).astype(np.float32)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls // 5):
            host.compute(layer, [0, 3], idx_NK, w_NK, h_ND)
        runs.append((time.perf_counter() - t) / (calls // 5) * 1e6)
    return float(np.median(runs))


def serving_step_overhead(model, slots: int = 32, steps: int = 300) -> str:
    """A server's step for one request in `slots` slots (`DecodeBatch.decode`): its own host time beyond
    the executor's decode (median), and its own programs per step."""
    import numpy as np

    from ktjax.runtime.generation import SamplingOptions
    from ktjax.serve import batch as serve_batch
    batch = serve_batch.DecodeBatch(model, slots, 256)
    batch.prefill_into([0], [[5, 9, 13]], [SamplingOptions(max_new_tokens=1)])
    active = np.arange(slots) < 1
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(serve_batch, name) for name in ("take_rows", "put_rows", "split_rows", "advance_rows")
                 if hasattr(serve_batch, name)}

    def counted(name, fn):
        def run(*args):
            counts[name] += 1
            return fn(*args)
        return run

    for name, fn in originals.items():
        setattr(serve_batch, name, counted(name, fn))
    batch.executor = timed = TimedExecutor(batch.executor)
    try:
        for _ in range(5):
            batch.decode(active)
        counts.clear()
        own = []
        for _ in range(steps):  # positions past the cache's end stay at its last
            t = time.perf_counter()
            batch.decode(active)
            own.append(time.perf_counter() - t - timed.seconds[-1])
    finally:
        for name, fn in originals.items():
            setattr(serve_batch, name, fn)
    return (f"{np.median(own) * 1e6:.0f} us per step beyond the executor's decode; its own programs per step: "
            + (", ".join(f"{k} {v / steps:g}" for k, v in counts.items()) or "none"))


def main() -> None:
    import argparse

    import numpy as np
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="decode steps per measurement")
    p.add_argument("--repeats", type=int, default=1, help="measurements per model (the median is printed)")
    args = p.parse_args()

    def timed(model) -> str:
        runs = [ms_per_step(model, args.steps) for _ in range(args.repeats)]
        return f"{np.median(runs):.2f} ms/step" + (f" (runs {' '.join(f'{r:.2f}' for r in runs)})" if len(runs) > 1 else "")

    cfg = ModelConfig.from_dict(CONFIG)
    _, params = nnx.split(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)))
    with tempfile.TemporaryDirectory() as path:
        save_params(cfg, params, path)
        offloaded = ktjax.load(path, placement={r".*\.mlp\.experts\..*": "host"}, max_context=1024)
        host_cpu = ktjax.load(path, placement={r".*\.mlp\.experts\..*": "host"}, max_context=1024, experts="int8",
                              expert_compute="cpu")
        host_int4 = ktjax.load(path, placement={r".*\.mlp\.experts\..*": "host"}, max_context=1024, experts="int4",
                               expert_compute="cpu", max_batch=32)
        resident = ktjax.load(path)
        for name, model in (("offloaded (per-layer segments)", offloaded),
                            ("offloaded, int8 experts on the host CPU (streamed form)", host_cpu),
                            ("offloaded, int4 experts on the host CPU (fused form)", host_int4)):
            print(f"{name}: {timed(model)}; {programs_per_step(model)}")
        for name, model in (("int8", host_cpu), ("int4", host_int4)):
            print(f"host CPU's share of a layer, {name} (2 tiny experts, int8 activations): "
                  f"{us_per_host_call(model):.0f} us per call")
        print(f"serving batch, one request in 32 slots, int4 host CPU: {serving_step_overhead(host_int4)}")
        print(f"resident (one scanned program): {timed(resident)}")


if __name__ == "__main__":
    main()
