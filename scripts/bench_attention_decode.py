"""Where a batch-1 decode layer's attention and routing spend their time on the GPU: the offloaded executor's
segment (`LayerSegments.attention_route`, one full-size DeepSeek-V3 MoE layer, random bf16 weights) and each of
its pieces alone, against the HBM floor of the bytes each reads.

    python3 scripts/bench_attention_decode.py --out $OUT/attn          # GPU machine, about a minute
    python3 scripts/bench_attention_decode.py --tiny --out /tmp/attn   # small shapes: a CPU check of the script

offload.md (runs 13-16) found attention + routing at ~0.6 ms per layer where its weights alone are ~0.12 ms of
HBM reads. Each piece is timed two ways:
- "chained": R calls inside one jitted `fori_loop`, each call's input depending on the previous output (so XLA
  can neither hoist nor drop it), divided by R: the device time of the piece, launch gaps inside a program
  included, Python dispatch excluded;
- "call": back-to-back jitted calls from Python (the executor's form), median per call: dispatch included
  (the segment's cache is not donated here, so its call also copies the cache).
Floor = the piece's weight and cache bytes / the HBM read ceiling measured in the same run (a large reduction).
The table is printed last; JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_offload import median_time  # noqa: E402 (one warm-up call, then the median)
from fullsize import fullsize_config, random_state  # noqa: E402

from ktjax.config import ModelConfig  # noqa: E402
from ktjax.models import layer_structure  # noqa: E402
from ktjax.models.deepseek import positions  # noqa: E402
from ktjax.models.rope import apply_rope, cos_sin  # noqa: E402
from ktjax.runtime.offload.segments import LayerSegments, route  # noqa: E402

TINY = dict(model_type="deepseek_v3", vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
            num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=8, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def chained(piece, reps: int):
    """piece(x, carried) -> (out, carried) R times in one program, each input nudged by the previous output's
    first element; `carried` (the segment's cache) threads through, so its writes are neither dropped nor
    copied from a constant each time."""
    @jax.jit
    def run(x, carried):
        def body(_, c):
            acc, carried = c
            out, carried = piece(x + (acc * 1e-30).astype(x.dtype), carried)
            return acc + jnp.ravel(out)[0].astype(jnp.float32), carried
        return jax.lax.fori_loop(0, reps, body, (jnp.zeros((), jnp.float32), carried))[0]
    return run


def hbm_read_gbps(tiny: bool) -> float:
    n = (1 << 20) if tiny else (1 << 30)
    a = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    return 4 * n / median_time(lambda: f(a), 5 if tiny else 20) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[512, 4096], help="tokens already in the cache")
    p.add_argument("--cache", type=int, default=8448, help="the cache's length (the executor's plan: 8K + 256)")
    p.add_argument("--reps", type=int, default=50, help="calls per chained program (and timed calls)")
    p.add_argument("--stack", type=int, default=58,
                   help="layers in the cache stack of the segment's second row (DeepSeek-R1's 58 MoE layers share one "
                        "stack): if its time grows with the stack, the update copies the stack (default 58)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dt = jnp.bfloat16
    cfg = ModelConfig.from_dict(TINY) if args.tiny else fullsize_config(1, dense_layers=0)
    reps = 3 if args.tiny else args.reps
    S = 256 if args.tiny else args.cache
    contexts = [c for c in ([8, 64] if args.tiny else args.context) if c < S]
    graphdef, abstract = layer_structure(cfg, "moe", dt, with_experts=False)
    state = nnx.to_pure_dict(random_state(abstract, jax.random.key(0), dt))
    layer = nnx.merge(graphdef, state)
    attn, seg = layer.self_attn, LayerSegments(graphdef, cfg)
    D, H, L, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Dn, Dv = cfg.qk_nope_head_dim, cfg.v_head_dim
    hbm = hbm_read_gbps(args.tiny) * 1e9
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; HBM read "
          f"{hbm / 1e9:.0f} GB/s; D={D} H={H} cache {S}", flush=True)

    def nbytes(*arrays):
        return sum(int(a.size) * a.dtype.itemsize for a in arrays)

    w = lambda m: m.weight[...]  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (1, 1, D), jnp.float32).astype(dt)
    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        latent = jnp.asarray(rng.standard_normal((1, 1, S, L)) * 0.1, dt)  # a group of one layer [1, B, S, L]
        rp = jnp.asarray(rng.standard_normal((1, 1, S, R)) * 0.1, dt)
        start = jnp.full((1,), ctx, jnp.int32)
        rope = cos_sin(cfg, positions(start, 1))
        j = jnp.zeros((), jnp.int32)
        cache_bytes = nbytes(latent[0, :, :ctx + 1], rp[0, :, :ctx + 1])
        w_kv_b = w(attn.kv_b_proj).reshape(H, Dn + Dv, L)
        q_latent = jnp.asarray(rng.standard_normal((1, H, L)), dt)
        o_latent = jnp.asarray(rng.standard_normal((1, H, L)), dt)
        q_nope = jnp.asarray(rng.standard_normal((1, H, Dn)), dt)
        from ktjax import kernels
        segment_bytes = (nbytes(*jax.tree.leaves(state)) - nbytes(*[v for k, v in _flat(state) if "shared_experts" in k])
                         + cache_bytes)
        N = 2 if args.tiny else args.stack
        pieces = {
            # the whole segment: attention (cache written at slice j) and routing
            "attention_route (segment)": (
                functools.partial(_segment, seg, state, rope, start, j), x, segment_bytes, (latent, rp)),
            # the same with the layer's cache the last of a stack of N (the executor's cache groups): the same bytes
            # to read, so the same time unless the update copies the stack
            f"attention_route (segment), stack of {N}": (
                functools.partial(_segment, seg, state, rope, start, jnp.int32(N - 1)), x, segment_bytes,
                (jnp.zeros((N,) + latent.shape[1:], dt), jnp.zeros((N,) + rp.shape[1:], dt))),
            "input norm + q_a + norm + q_b": (
                lambda x: attn.queries(layer.input_layernorm(x)), x,
                nbytes(w(attn.q_a_proj), w(attn.q_b_proj))),
            "kv_a + norm + rope": (
                lambda x: _kv(attn, cfg, x, rope), x, nbytes(w(attn.kv_a_proj_with_mqa))),
            "absorb q into the latent (w_uk)": (
                lambda q: jnp.einsum("hbn,hnl->hbl", q.transpose(1, 0, 2), w_kv_b[:, :Dn],
                                     preferred_element_type=jnp.float32).astype(dt), q_nope,
                nbytes(w_kv_b[:, :Dn])),
            f"mla_decode ({kernels.decode_path(q_latent, q_latent[..., :R], latent[0])})": (
                lambda q: kernels.mla_decode(q, q[..., :R], latent[0], rp[0], start + 1, sm_scale=cfg.softmax_scale),
                q_latent, cache_bytes),
            "out of the latent (w_uv)": (
                lambda o: jnp.einsum("bhl,hvl->bhv", o, w_kv_b[:, Dn:], preferred_element_type=jnp.float32
                                     ).astype(dt), o_latent, nbytes(w_kv_b[:, Dn:])),
            "o_proj": (lambda v: attn.o_proj(v), jnp.asarray(rng.standard_normal((1, 1, H * Dv)), dt),
                       nbytes(w(attn.o_proj))),
            "post norm + router": (lambda x: route(layer, x)[1], x, nbytes(layer.mlp.gate.weight[...])),
        }
        for name, (piece, arg, moved, *carried) in pieces.items():
            row = {"context": ctx, "piece": name, "bytes": moved, "floor_us": moved / hbm * 1e6}
            carried = carried[0] if carried else ()
            if not carried:
                piece = functools.partial(_stateless, piece)
            try:
                run = chained(piece, reps)
                row["chained_us"] = median_time(lambda: run(arg, carried), 3 if args.tiny else 10) / reps * 1e6
                f = jax.jit(piece)
                row["call_us"] = median_time(lambda: f(arg, carried), reps) * 1e6
                row["of_floor"] = row["floor_us"] / row["chained_us"]
            except Exception as e:  # report and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print("ROW " + json.dumps(row), flush=True)
    with open(os.path.join(args.out, "bench_attention_decode.json"), "w") as f:
        json.dump({"hbm_read_gbps": hbm / 1e9, "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
    print(f"\nHBM read ceiling {hbm / 1e9:.0f} GB/s; one layer, batch 1, bf16 weights; 'chained': device time per call "
          "inside one program; 'call': a jitted call from Python\n")
    print("| context | piece | MB read | floor us | chained us | of floor | call us |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | {r['piece']} | {r['bytes'] / 1e6:.1f} | {r['floor_us']:.1f} | "
              f"{r.get('chained_us', float('nan')):.1f} | {r.get('of_floor', float('nan')):.0%} | "
              f"{r.get('call_us', float('nan')):.1f} |" + (f" {r['error']}" if "error" in r else ""))
    return 0


def _stateless(piece, x, carried):
    return piece(x), carried


def _segment(seg, state, rope, start, j, x, cache):
    """The executor's attention_route on x; every output kept (routing included), the cache carried."""
    x, routing, latent, rp = seg.attention_route.__wrapped__(state, x, rope, start, *cache, j)
    h, w, idx, for_host = routing
    out = (x.ravel()[0].astype(jnp.float32) + h.ravel()[0].astype(jnp.float32) + w.ravel()[0]
           + idx.ravel()[0].astype(jnp.float32) + for_host.ravel()[0])
    return out, (latent, rp)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}")
    else:
        yield prefix, tree


def _kv(attn, cfg, x, rope):
    ckv = attn.kv_a_proj_with_mqa(x)
    latent = attn.kv_a_layernorm(ckv[..., :cfg.kv_lora_rank])
    k_rope = apply_rope(ckv[..., None, cfg.kv_lora_rank:], *rope, interleaved=cfg.rope_interleave)[:, :, 0]
    return jnp.concatenate([latent, k_rope.astype(latent.dtype)], axis=-1)


if __name__ == "__main__":
    sys.exit(main())
