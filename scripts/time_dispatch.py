"""Host-side cost of one decode step of the offload engine, on a tiny random model (CPU is fine):
the Python and dispatch overhead that per-layer segments add, against the scanned resident model.

    python scripts/time_dispatch.py
"""

import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

import ktjax
from ktjax.config import ModelConfig
from ktjax.engine import runner
from ktjax.models import DeepseekForCausalLM
from ktjax.saving import save

CONFIG = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)


def ms_per_step(model, steps: int = 30) -> float:
    run = runner(model)
    cache = run.init_cache(1, 64)
    tok, key = jnp.zeros((1,), jnp.int32), jax.random.key(0)
    args = (key, jnp.float32(0), jnp.int32(0), jnp.float32(1))
    for s in range(3):
        tok, cache = run.decode_and_sample(cache, tok, jnp.asarray([s]), *args)
    jax.block_until_ready(tok)
    t = time.perf_counter()
    for s in range(steps):
        tok, cache = run.decode_and_sample(cache, tok, jnp.asarray([3 + s]), *args)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    cfg = ModelConfig.from_dict(CONFIG)
    graphdef, params = nnx.split(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)))
    with tempfile.TemporaryDirectory() as path:
        save(ktjax.Model(cfg, graphdef, params), path)
        offloaded = ktjax.load(path, placement={r".*\.mlp\.experts\..*": "host"}, max_context=64)
        resident = ktjax.load(path)
        print(f"offloaded (per-layer segments): {ms_per_step(offloaded):.2f} ms/step")
        print(f"resident (one scanned program): {ms_per_step(resident):.2f} ms/step")


if __name__ == "__main__":
    main()
