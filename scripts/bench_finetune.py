"""LoRA fine-tuning benchmark: DeepSeek-V3 full-size layers with random weights (the offload
benchmark's model), routed experts in pinned host memory under a GPU budget, against the floor;
and the same model with every expert on the device.

    python3 scripts/bench_finetune.py --all --moe-layers 4 --gpu-memory 24GiB     # on the GPU machine
    python3 scripts/bench_finetune.py --all --tiny                                 # check the script on a CPU

Parts (each in its own process: the budget is a process-wide allocator setting):
  offload       OffloadedTrainer, experts on the host: each step streams every expert of every
                MoE layer twice (forward, and again for the backward pass).
  device        the same trainer and segments, every expert on the device (no transfers).
  resident-jit  the resident path: one jitted step (lax.scan over layers, jax.checkpoint per layer);
                needs the whole model on the device, so use few MoE layers.

Per sequence length (batch 1 per micro-batch, --grad-accum micro-batches per step, LoRA r=8 on the
attention projections, bf16 compute, f32 adapters):
tokens/s per optimizer step, bytes from host per step, and the floor: max(bytes moved / measured
pinned H2D bandwidth, 3 x weight bytes / measured HBM bandwidth, training FLOPs / measured bf16
matmul rate): each of the three passes reads every weight once; training FLOPs are taken as 3x
the forward's (forward, rematerialised forward, input-gradient backward; frozen weights need no
weight gradients) over the matmuls of the active parameters plus attention. The ceilings are
measured in the same run (bench_offload's probes). A markdown table is printed last and written,
with the raw JSON, under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchparts import run_parts  # noqa: E402


def tiny_config(moe_layers: int):
    from ktjax.config import ModelConfig
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=1 + moe_layers, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=4096,
        num_nextn_predict_layers=0))


def step_flops(cfg, T: int) -> float:
    """Matmul FLOPs of one training step on T tokens: 3x the forward (see the module docstring)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    q = D * H * qk if cfg.q_lora_rank is None else D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    attn_params = q + D * cfg.cache_dim + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + v) + H * v * D
    attn_scores = 2 * T * H * (qk + v) / 2  # causal: half of the T x T scores, per query token
    fwd = 0.0
    for kind in cfg.layer_kinds:
        if kind == "dense":
            mlp = 3 * D * cfg.intermediate_size
        else:
            mlp = 3 * D * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + (cfg.n_shared_experts or 0))
            mlp += D * cfg.n_routed_experts  # router
        fwd += 2 * T * (attn_params + mlp) + 2 * T * attn_scores
    fwd += 2 * T * D * cfg.vocab_size  # LM head
    return 3 * fwd


def weight_bytes(cfg, dtype) -> int:
    """Bytes of the model's weights: what each pass of a step reads from HBM at least once (every
    expert is routed to at these lengths)."""
    from flax import nnx
    from ktjax.io.load import abstract_params
    return sum(v.size * v.dtype.itemsize for _, v in nnx.to_flat_state(abstract_params(cfg, dtype)[1]))


def build(args, cfg, dtype, all_on_device: bool):
    from fullsize import plan_for, random_offloaded_model
    rules = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"} if args.tiny and not all_on_device else None
    plan = plan_for(cfg, dtype, gpu_memory=args.gpu_memory, all_on_device=all_on_device, rules=rules, max_batch=1,
                    max_context=max(args.seq_lens) + 256 * args.tiny, expert_chunk=args.expert_chunk,
                    training=args.grad_accum)
    print(plan.table(), flush=True)
    return plan, random_offloaded_model(cfg, plan, dtype, progress=lambda s: print(s, flush=True))


def resident_params(cfg, dtype):
    from flax import nnx
    from ktjax.models import DeepseekForCausalLM
    return nnx.split(DeepseekForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), attention="reference"))[1]  # random


def run_part(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_offload import ceilings
    from ktjax.lora.config import LoRAConfig, resolve_sites
    from ktjax.lora.modules import init_adapters, lora_graph
    from ktjax.runtime.placement import fmt_bytes
    from ktjax.train.config import TrainConfig
    from ktjax.train.resident import make_train_step

    res = {"part": args.run}
    if not (args.h2d_gbps and args.hbm_gbps and args.matmul_tflops):  # the first part measures them
        res.update(ceilings(args.tiny))
        print("CEILINGS " + json.dumps(res), flush=True)
    if args.tiny:
        cfg = tiny_config(args.moe_layers)
    else:
        from fullsize import fullsize_config
        cfg = fullsize_config(args.moe_layers)
    dtype = jnp.bfloat16
    lcfg = LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))
    sites = resolve_sites(cfg, lcfg.targets)
    tc = TrainConfig(steps=1000, batch_size=1, seq_len=max(args.seq_lens), lr=1e-4, warmup=10)
    adapters = jax.tree.map(jnp.asarray, init_adapters(cfg, lcfg, 0, sites))
    tx = tc.optimizer()
    t = time.perf_counter()
    if args.run == "resident-jit":
        graphdef, _ = lora_graph(cfg, dtype, lcfg, sites, attention="reference")
        step_fn = functools.partial(make_train_step(graphdef, tx, remat=True, loss_chunk=tc.loss_chunk),
                                    base=resident_params(cfg, dtype))
    else:
        plan, model = build(args, cfg, dtype, all_on_device=args.run == "device")
        res["host_experts"] = len(plan.host_experts)
        step_fn = model.trainer(lcfg, sites, tc).step
    res["build_s"] = time.perf_counter() - t
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    adapters, opt_state = jax.device_put((adapters, jax.jit(tx.init)(adapters)), device)  # as the steps leave them
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    weights = weight_bytes(cfg, dtype)
    for T in args.seq_lens:
        M = args.grad_accum
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (M, 1, T)), jnp.int32)
        mask = jnp.ones((M, 1, T), bool)
        t = time.perf_counter()
        adapters, opt_state, m = step_fn(adapters, opt_state, tokens_MBT=tokens, mask_MBT=mask, key=key)  # compile
        float(m["loss"])
        first = time.perf_counter() - t
        ts, moved = [], []
        for s in range(args.steps):
            t = time.perf_counter()
            adapters, opt_state, m = step_fn(adapters, opt_state, tokens_MBT=tokens, mask_MBT=mask,
                                             key=jax.random.fold_in(key, s))
            float(m["loss"])
            ts.append(time.perf_counter() - t)
            moved.append(int(m.get("host_bytes", 0)))
        step = float(np.median(ts))
        row = {"seq_len": T, "micro_batches": M, "step_s": step, "tokens_per_s": M * T / step, "first_step_s": first,
               "host_bytes_per_step": float(np.mean(moved)), "achieved_h2d_gbps": float(np.mean(moved)) / step / 1e9,
               "flops": M * step_flops(cfg, T)}
        h2d = res.get("h2d_gbps", args.h2d_gbps)
        hbm = res.get("hbm_gbps", args.hbm_gbps)
        tflops = res.get("matmul_tflops", args.matmul_tflops)
        if h2d and hbm and tflops:
            floors = {"floor_io_s": row["host_bytes_per_step"] / (h2d * 1e9),
                      "floor_hbm_s": 3 * weights / (hbm * 1e9), "floor_flops_s": row["flops"] / (tflops * 1e12)}
            row.update(floors, floor_s=max(floors.values()), floor_over_measured=max(floors.values()) / step)
        res[f"T{T}"] = row
        print(f"ROW T{T} " + json.dumps(row), flush=True)
        print(f"T={T} x {M}: {step * 1e3:.1f} ms/step, {M * T / step:.0f} tok/s, "
              f"{fmt_bytes(row['host_bytes_per_step'])} from host ({row['achieved_h2d_gbps']:.1f} GB/s)", flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    res["device_bytes_limit"] = stats.get("bytes_limit")
    res["moe_layers"] = cfg.layer_kinds.count("moe")
    return res


def table(results: list[dict]) -> str:
    from ktjax.runtime.placement import fmt_bytes
    gb = lambda b: fmt_bytes(int(b)) if b is not None else "-"  # noqa: E731
    ceil = next((r for r in results if "h2d_gbps" in r), {})
    lines = []
    if ceil:
        lines += [f"Ceilings measured in this run: pinned host->device {ceil['h2d_gbps']:.1f} GB/s, HBM "
                  f"{ceil['hbm_gbps']:.0f} GB/s, bf16 matmul "
                  f"{ceil['matmul_tflops']:.0f} TFLOP/s.", ""]
    lines += ["| run | micro-batches x seq len | tokens/s | step | from host per step | achieved H2D | "
              "floor (H2D / HBM / FLOPs) | floor/measured |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for k, v in r.items():
            if not (isinstance(v, dict) and k.startswith("T")):
                continue
            floor = (f"{v['floor_io_s'] * 1e3:.0f} / {v['floor_hbm_s'] * 1e3:.0f} / {v['floor_flops_s'] * 1e3:.0f} ms"
                     if "floor_s" in v else "-")
            ratio = f"{100 * v['floor_over_measured']:.0f}%" if "floor_over_measured" in v else "-"
            lines.append(f"| {r['part']} | {v.get('micro_batches', 1)} x {v['seq_len']} | {v['tokens_per_s']:.0f} | "
                         f"{v['step_s'] * 1e3:.0f} ms | {gb(v['host_bytes_per_step'])} | "
                         f"{v['achieved_h2d_gbps']:.1f} GB/s | {floor} | {ratio} |")
        if r.get("peak_device_bytes"):
            lines.append(f"| {r['part']} | peak GPU memory | | | {gb(r['peak_device_bytes'])} of "
                         f"{gb(r['device_bytes_limit'])} | | | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run the parts, each in its own process, and print the table")
    p.add_argument("--parts", nargs="+", default=["offload", "device"], help="which parts --all runs")
    p.add_argument("--run", choices=("offload", "device", "resident-jit"), default="offload")
    p.add_argument("--moe-layers", type=int, default=4, help="MoE layers after the one dense layer")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU budget of the offload part (allocator-enforced)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--steps", type=int, default=3, help="timed steps per sequence length")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of one sequence per step (they share each expert transfer)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attention")
    p.add_argument("--expert-chunk", type=int, default=32)
    p.add_argument("--h2d-gbps", type=float, default=0.0)
    p.add_argument("--hbm-gbps", type=float, default=0.0)
    p.add_argument("--matmul-tflops", type=float, default=0.0)
    p.add_argument("--timeout", type=int, default=540, help="seconds for each part")
    p.add_argument("--deadline", type=int, default=0, help="seconds for the whole --all run (0: none)")
    p.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if args.tiny and args.seq_lens == [512, 1024, 2048]:
        args.seq_lens = [32, 64]
    if not args.all:
        print("RESULT " + json.dumps(run_part(args)), flush=True)
        return
    frac = None
    if not args.tiny:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process only reads the GPU's size
        import jax
        from ktjax.runtime.placement import parse_size
        total = jax.devices()[0].memory_stats()["bytes_limit"] / 0.75  # the default fraction is 0.75
        del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]  # the parts allocate as users' processes do
        frac = parse_size(args.gpu_memory) / total
    common = ["--moe-layers", str(args.moe_layers), "--gpu-memory", args.gpu_memory, "--steps", str(args.steps),
              "--grad-accum", str(args.grad_accum),
              "--rank", str(args.rank), "--targets", args.targets, "--expert-chunk", str(args.expert_chunk),
              "--seq-lens", *map(str, args.seq_lens)] + (["--tiny"] if args.tiny else [])
    env = {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "110"}
    me = [sys.executable, os.path.abspath(__file__)] + common
    # The offload part gets the budget; the others most of the GPU (every expert on the device).
    fraction = {"offload": f"{frac:.4f}" if frac else None, "device": "0.92" if frac else None}
    ceiling_flags = (["--h2d-gbps", str(args.h2d_gbps), "--hbm-gbps", str(args.hbm_gbps), "--matmul-tflops",
                      str(args.matmul_tflops)] if args.h2d_gbps and args.hbm_gbps and args.matmul_tflops else [])
    results = run_parts(
        [(name, me + ceiling_flags + ["--run", name],
          {**env, **({"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction[name]} if fraction.get(name) else {})}, args.timeout)
         for name in args.parts],
        log_path=os.path.join(args.out, "bench_finetune.log"), deadline_s=args.deadline,
        ceiling_args=lambda c: ["--h2d-gbps", str(c["h2d_gbps"]), "--hbm-gbps", str(c["hbm_gbps"]),
                                "--matmul-tflops", str(c["matmul_tflops"])]
        if "h2d_gbps" in c else [])
    with open(os.path.join(args.out, "bench_finetune.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results)
    with open(os.path.join(args.out, "bench_finetune.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
