"""Offload benchmark: DeepSeek-V3 full-size layers with random weights, experts in pinned host
memory, under a GPU budget the allocator enforces. Measures the ceilings and the floor in the
same run, then ktjax (bf16 and FP8 experts), the same model all on the device, and transformers +
accelerate with the experts offloaded to the CPU.

    python3 scripts/bench_offload.py --all --moe-layers 4 --gpu-memory 24GiB   # on the GPU machine

Each part runs in its own process (the budget is a process-wide allocator setting); the driver
prints a markdown table last and writes it, with the raw JSON, under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchparts import run_parts  # noqa: E402


T_START = time.perf_counter()


def log(msg: str):
    print(f"[{time.perf_counter() - T_START:6.1f} s] {msg}", flush=True)


def summarize_trace(trace_dir: str, out_dir: str) -> None:
    """Busy time per GPU stream and the idle gaps of the host->device copies, from a perfetto trace."""
    import glob
    import gzip
    import shutil
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        log("trace: no perfetto_trace.json.gz written")
        return
    if os.path.getsize(files[0]) < 15 << 20:
        shutil.copy(files[0], os.path.join(out_dir, f"decode_b1_trace_{os.path.basename(trace_dir)[6:]}.json.gz"))
    with gzip.open(files[0]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["name"][0], e["pid"], e.get("tid"))] = e["args"]["name"]
    threads: dict = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            threads.setdefault((e["pid"], e.get("tid")), []).append((float(e["ts"]), float(e["dur"]), e["name"]))
    procs = sorted({names.get(("p", pid, None), str(pid)) for pid, _ in threads})
    log(f"trace: {len(events)} events; processes {procs}")
    for (pid, tid), evs in sorted(threads.items()):
        proc, thread = names.get(("p", pid, None), str(pid)), names.get(("t", pid, tid), str(tid))
        if "GPU" not in proc and "gpu" not in proc.lower():
            continue
        evs.sort()
        busy, end, gaps = 0.0, None, []
        for ts, dur, _ in evs:
            if end is None or ts > end:
                if end is not None:
                    gaps.append((ts - end, ts))
                busy += dur
                end = ts + dur
            elif ts + dur > end:
                busy += ts + dur - end
                end = ts + dur
        span = end - evs[0][0]
        totals: dict = {}
        for _, dur, name in evs:
            totals[name[:60]] = totals.get(name[:60], 0.0) + dur
        top = ", ".join(f"{n} {t / 1e3:.2f} ms" for n, t in sorted(totals.items(), key=lambda kv: -kv[1])[:6])
        big = sorted(gaps, reverse=True)[:12]
        log(f"trace {proc} / {thread}: {len(evs)} events, busy {busy / 1e3:.2f} ms of {span / 1e3:.2f} ms; top: {top}")
        log(f"   largest gaps (ms @ offset ms): " + ", ".join(f"{g / 1e3:.2f}@{(t - evs[0][0]) / 1e3:.1f}" for g, t in big))


def median_time(f, n=5, warm=1):
    import jax
    import numpy as np
    for _ in range(warm):
        jax.block_until_ready(f())
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def ceilings(tiny: bool) -> dict:
    """Pinned host->device and HBM bandwidth, and the two ways of fetching 8 experts."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    d = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(d, memory_kind="pinned_host")
    dev = jax.sharding.SingleDeviceSharding(d, memory_kind="device")
    n = (1 << 20) if tiny else (1 << 29)  # 1 GiB of bf16
    a = jax.device_put(jnp.ones((n,), jnp.bfloat16), host)
    t = median_time(lambda: jax.device_put(a, dev))
    out = {"h2d_gbps": a.nbytes / t / 1e9}
    x = jax.random.normal(jax.random.key(0), (2 * n,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 1.0001)
    out["hbm_gbps"] = 2 * x.nbytes / median_time(lambda: f(x), n=10) / 1e9
    m = 256 if tiny else 8192
    b = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    g = jax.jit(lambda b: b @ b)
    out["matmul_tflops"] = 2 * m**3 / median_time(lambda: g(b), n=10) / 1e12
    E, F, D = (16, 64, 128) if tiny else (32, 2048, 7168)
    stack = jax.device_put(jnp.ones((E, 3, F, D), jnp.bfloat16), host)
    singles = [jax.device_put(jnp.ones((3, F, D), jnp.bfloat16), host) for _ in range(E)]
    idx = jnp.array([3, 17 % E, 9, 30 % E, 5, 11, 22 % E, 1], jnp.int32)

    @jax.jit
    def in_program(stack, idx):
        return [jax.device_put(lax.dynamic_index_in_dim(stack, idx[k], keepdims=False), dev) for k in range(8)]

    ex_bytes = 8 * 3 * F * D * 2
    out["fetch8_in_program_gbps"] = ex_bytes / median_time(lambda: in_program(stack, idx)) / 1e9
    ids = [int(i) for i in idx]
    out["fetch8_device_put_gbps"] = ex_bytes / median_time(lambda: jax.device_put([singles[i] for i in ids], dev)) / 1e9
    del a, x, stack, singles
    return out


def run_ktjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fullsize import fullsize_config, plan_for, random_offloaded_model
    from ktjax.offload import expected_unique_experts, experts_segment
    from ktjax.placement import fmt_bytes

    res = {"part": args.run, "experts": args.experts}
    if args.run == "ktjax":
        res.update(ceilings(args.tiny))
        print("CEILINGS " + json.dumps(res), flush=True)
    cfg = fullsize_config(args.moe_layers) if not args.tiny else tiny_config(args.moe_layers)
    fp8 = args.experts == "fp8"
    dtype = jnp.bfloat16
    resident = args.run == "resident"
    max_ctx = (args.prefill_max if not args.tiny else 512) + 256
    # The budget holds the larger of the two phases measured: one 8K prompt, or 32 rows at 1K context.
    plan = plan_for(cfg, dtype, gpu_memory=args.gpu_memory, fp8=fp8, all_on_device=resident, max_batch=1,
                    max_context=max_ctx, expert_chunk=args.expert_chunk)
    print(plan.table(), flush=True)
    t = time.perf_counter()
    model = random_offloaded_model(cfg, plan, dtype, fp8=fp8, progress=log)
    res["build_s"] = time.perf_counter() - t
    res["host_experts"] = len(plan.host_experts)
    res["expert_bytes"] = plan.expert_bytes
    n_moe = cfg.layer_kinds.count("moe")
    core_read = sum(v for k, v in plan.core_bytes.items() if k != "embeddings")  # bytes a decode step reads
    key = jax.random.key(0)
    zero, one = jnp.float32(0.0), jnp.int32(0)

    ctx = 1024 if not args.tiny else 64
    for B in args.batches:
        cache = model.init_cache(B, ctx + 64)
        tok = jnp.asarray((np.arange(B) * 7919 + 13) % cfg.vocab_size, jnp.int32)  # rows route differently
        pos = np.full((B,), ctx, np.int32)
        for _ in range(3):  # compile and warm up
            tok, cache = model.decode_and_sample(cache, tok, pos, key, zero, one, jnp.float32(1.0))
        jax.block_until_ready(tok)
        log(f"decode B={B}: compiled and warm")
        compiled = experts_segment._cache_size()
        steps, moved, layer_ms = [], [], []
        for s in range(args.steps):
            t = time.perf_counter()
            tok, cache = model.decode_and_sample(cache, tok, pos + 1 + s, key, zero, one, jnp.float32(1.0))
            jax.block_until_ready(tok)
            steps.append(time.perf_counter() - t)
            moved.append(model.last_step.bytes_from_host)
            if hasattr(model.last_step, "routed_at"):
                layer_ms.append(np.diff(model.last_step.routed_at) * 1e3)
        if B == 1 and args.trace and not resident:
            trace_dir = os.path.join("/tmp", f"trace_{args.run}")  # copied to $OUT as decode_b1_trace_<part>
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for s in range(2):
                    tok, cache = model.decode_and_sample(cache, tok, pos + 1 + s, key, zero, one, jnp.float32(1.0))
                jax.block_until_ready(tok)
            try:
                summarize_trace(trace_dir, args.out)
            except Exception as e:  # the trace is a diagnostic: never lose the numbers over it
                log(f"trace summary failed: {e!r}")
        if experts_segment._cache_size() != compiled:
            log(f"decode B={B}: {experts_segment._cache_size() - compiled} expert segments compiled while timed")
        step = float(np.median(steps))
        log(f"decode B={B}: steps {' '.join(f'{1e3 * t:.1f}' for t in steps)} ms; routing-to-routing per MoE layer "
            f"(median over steps) {' '.join(f'{v:.1f}' for v in np.median(layer_ms, axis=0))} ms" if layer_ms else "")
        host_bytes = float(np.mean(moved))
        cache_bytes = cfg.num_hidden_layers * B * (ctx + 1) * cfg.cache_dim * 2
        row = {"step_s": step, "tokens_per_s": B / step, "host_bytes_per_step": host_bytes,
               "achieved_h2d_gbps": host_bytes / step / 1e9,
               "expected_unique_experts_per_layer": expected_unique_experts(cfg, B)}
        if "h2d_gbps" in res or args.h2d_gbps:
            h2d, hbm = res.get("h2d_gbps", args.h2d_gbps), res.get("hbm_gbps", args.hbm_gbps)
            floor = host_bytes / (h2d * 1e9) + (core_read + cache_bytes) / (hbm * 1e9)
            row.update(floor_s=floor, floor_over_measured=floor / step)
        # Per-token time for 61 layers: MoE layers scale with their count, the rest is fixed.
        row["extrapolated_61_layers_s"] = step * (61 - 3 + 0.0) / n_moe if n_moe else None
        res[f"decode_b{B}"] = row
        print(f"ROW decode_b{B} " + json.dumps(row), flush=True)
        print(f"decode B={B}: {step * 1e3:.1f} ms/step, {B / step:.2f} tok/s, {fmt_bytes(host_bytes)} from host "
              f"({host_bytes / step / 1e9:.1f} GB/s)", flush=True)
        del cache

    if not resident and args.decode_variants:
        # The two ways of moving experts (issue 4 asks to keep the faster) and the compute grouping, at B=1.
        cache = model.init_cache(1, ctx + 64)
        tok, pos = jnp.asarray([13], jnp.int32), np.full((1,), ctx, np.int32)
        defaults = model.decode_group, model.fetch_in_program
        for variant in args.decode_variants:
            group, how = variant.split(":")
            model.decode_group, model.fetch_in_program = int(group), how == "program"
            for _ in range(2):
                tok, cache = model.decode_and_sample(cache, tok, pos, key, zero, one, jnp.float32(1.0))
            ts = []
            for s in range(args.steps):
                t = time.perf_counter()
                tok, cache = model.decode_and_sample(cache, tok, pos + 1 + s, key, zero, one, jnp.float32(1.0))
                jax.block_until_ready(tok)
                ts.append(time.perf_counter() - t)
            step, moved = float(np.median(ts)), model.last_step.bytes_from_host
            row = {"step_s": step, "tokens_per_s": 1 / step, "host_bytes_per_step": moved,
                   "achieved_h2d_gbps": moved / step / 1e9}
            res[f"decode_b1_{group}_{how}"] = row
            log(f"decode B=1 group {group} fetch {how}: steps {' '.join(f'{1e3 * t:.1f}' for t in ts)} ms")
        model.decode_group, model.fetch_in_program = defaults
        del cache

    for T in ([args.prefill_max // 8, args.prefill_max] if not args.tiny else [64, 256]):
        cache = model.init_cache(1, T)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        x, cache = model.forward(cache, tokens, np.zeros(1, np.int32))  # compile + warm
        jax.block_until_ready(x)
        log(f"prefill T={T}: compiled and warm")
        del x
        ts, moved = [], []
        for _ in range(args.prefill_reps):
            cache = model.init_cache(1, T)
            t = time.perf_counter()
            x, cache = model.forward(cache, tokens, np.zeros(1, np.int32))
            jax.block_until_ready(x)
            ts.append(time.perf_counter() - t)
            moved.append(model.last_step.bytes_from_host)
            del x
        step = float(np.median(ts))
        host_bytes = float(np.mean(moved))
        row = {"seconds": step, "tokens_per_s": T / step, "host_bytes": host_bytes,
               "achieved_h2d_gbps": host_bytes / step / 1e9}
        if "h2d_gbps" in res or args.h2d_gbps:
            h2d = res.get("h2d_gbps", args.h2d_gbps)
            flops = 2 * T * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size * n_moe
            floor = max(host_bytes / (h2d * 1e9), flops / (res.get("matmul_tflops", args.matmul_tflops) * 1e12))
            row.update(floor_s=floor, floor_over_measured=floor / step)
        res[f"prefill_{T}"] = row
        print(f"prefill T={T}: {step:.2f} s, {T / step:.0f} tok/s, {fmt_bytes(host_bytes)} from host "
              f"({host_bytes / step / 1e9:.1f} GB/s)", flush=True)
        del cache
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    res["device_bytes_limit"] = stats.get("bytes_limit")
    return res


def tiny_config(moe_layers: int):
    from ktjax.config import ModelConfig
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=1 + moe_layers, num_attention_heads=4, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=4096))


def run_transformers(args) -> dict:
    """transformers + accelerate, routed experts offloaded to the CPU (what a user would pick)."""
    import accelerate
    import torch
    import transformers
    from fullsize import REFERENCE

    with open(REFERENCE) as f:
        d = json.load(f)
    E = args.peer_experts
    d.update(num_hidden_layers=1 + args.moe_layers, first_k_dense_replace=1, n_routed_experts=E, n_group=4,
             topk_group=2, num_key_value_heads=128, num_nextn_predict_layers=0)
    d.pop("quantization_config")
    if args.tiny:
        d.update(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, vocab_size=512)
    cfg = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    cuda = torch.cuda.is_available()
    gpu = torch.device("cuda" if cuda else "cpu")
    if cuda and os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):  # the same budget for the peer
        torch.cuda.set_per_process_memory_fraction(float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]))
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    expert_modules = [f"model.layers.{i}.mlp.experts" for i in range(1, 1 + args.moe_layers)]
    model.to_empty(device=gpu)
    gen = torch.Generator(device=gpu).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=gpu, dtype=torch.float32).to(p.dtype) / p.shape[-1] ** 0.5)
            else:
                p.fill_(1.0)
        for name, b in model.named_buffers():
            b.zero_()
        for m in expert_modules:
            model.get_submodule(m).to("cpu")
    expert_bytes = sum(p.numel() * p.element_size() for m in expert_modules for p in model.get_submodule(m).parameters())
    device_map = {"": 0 if cuda else "cpu"}
    device_map.update({m: "cpu" for m in expert_modules})
    model = accelerate.dispatch_model(model, device_map=device_map)
    ctx = 1024 if not args.tiny else 64
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=gpu)

    def gen_time(n):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    gen_time(1)
    t1, tn = gen_time(1), gen_time(1 + args.peer_steps)
    per_token = (tn - t1) / args.peer_steps
    return {"part": "transformers", "experts_per_layer": E, "decode_b1": {
        "step_s": per_token, "tokens_per_s": 1 / per_token, "host_bytes_per_step": expert_bytes,
        "achieved_h2d_gbps": expert_bytes / per_token / 1e9},
        "prefill_1k_s": t1, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def table(results: list[dict]) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB" if b is not None else "-"  # noqa: E731
    ceil = next((r for r in results if "h2d_gbps" in r), {})
    lines = []
    if ceil:
        lines += [f"Ceilings measured in this run: pinned host->device {ceil['h2d_gbps']:.1f} GB/s, HBM "
                  f"{ceil['hbm_gbps']:.0f} GB/s (read+write), bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s; "
                  f"fetching 8 experts: per-expert device_put {ceil['fetch8_device_put_gbps']:.1f} GB/s, in-program "
                  f"dynamic slice {ceil['fetch8_in_program_gbps']:.1f} GB/s.", ""]
    lines += ["| run | what | tokens/s | time | from host per step | achieved H2D | floor | floor/measured |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        name = r["part"] + (f" ({r['experts']} experts)" if r.get("experts") else
                            f" ({r['experts_per_layer']} experts/layer)" if r.get("experts_per_layer") else "")
        for k, v in r.items():
            if not isinstance(v, dict):
                continue
            floor = f"{v['floor_s'] * 1e3:.1f} ms" if "floor_s" in v else "-"
            ratio = f"{100 * v['floor_over_measured']:.0f}%" if "floor_over_measured" in v else "-"
            t = v.get("step_s", v.get("seconds"))
            lines.append(f"| {name} | {k} | {v['tokens_per_s']:.2f} | {t * 1e3:.1f} ms | "
                         f"{gb(v.get('host_bytes_per_step', v.get('host_bytes')))} | {v['achieved_h2d_gbps']:.1f} GB/s | "
                         f"{floor} | {ratio} |")
        if r.get("peak_device_bytes"):
            lines.append(f"| {name} | peak GPU memory | | | {gb(r['peak_device_bytes'])} of {gb(r['device_bytes_limit'])} "
                         f"limit | | | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run every part, each in its own process, and print the table")
    p.add_argument("--parts", nargs="+", default=["ktjax", "ktjax-fp8", "resident", "transformers"],
                   help="which parts --all runs")
    p.add_argument("--run", choices=("ktjax", "ktjax-fp8", "resident", "transformers"), default="ktjax")
    p.add_argument("--experts", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--moe-layers", type=int, default=4, help="MoE layers after the one dense layer (host RAM bound)")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU budget, enforced through the allocator")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per batch size")
    p.add_argument("--prefill-max", type=int, default=8192)
    p.add_argument("--prefill-reps", type=int, default=2)
    p.add_argument("--expert-chunk", type=int, default=32)
    p.add_argument("--peer-experts", type=int, default=32, help="routed experts per layer in the transformers peer")
    p.add_argument("--peer-steps", type=int, default=2)
    p.add_argument("--h2d-gbps", type=float, default=0.0)
    p.add_argument("--hbm-gbps", type=float, default=0.0)
    p.add_argument("--matmul-tflops", type=float, default=0.0)
    p.add_argument("--timeout", type=int, default=240, help="seconds for each ktjax part (2/3 of it for the others)")
    p.add_argument("--deadline", type=int, default=0, help="seconds for the whole --all run (0: none)")
    p.add_argument("--decode-variants", nargs="*", default=["8:put", "2:put", "1:put", "2:program"],
                   help="B=1 decode with experts computed in groups of N, moved by device_put or a compiled program")
    p.add_argument("--trace", action="store_true", help="trace two B=1 decode steps; summarise the GPU streams")
    p.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if not args.all:
        res = run_transformers(args) if args.run == "transformers" else run_ktjax(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    frac = None
    if not args.tiny:
        import jax
        total = jax.devices()[0].memory_stats()["bytes_limit"] / 0.75  # the default fraction is 0.75
        from ktjax.placement import parse_size
        frac = parse_size(args.gpu_memory) / total
    common = ["--moe-layers", str(args.moe_layers), "--gpu-memory", args.gpu_memory, "--steps", str(args.steps),
              "--prefill-max", str(args.prefill_max), "--prefill-reps", str(args.prefill_reps),
              "--expert-chunk", str(args.expert_chunk), "--batches", *map(str, args.batches),
              "--out", args.out, "--decode-variants", *args.decode_variants] + (["--tiny"] if args.tiny else []) + (
              ["--trace"] if args.trace else [])
    parts = [("ktjax", ["--run", "ktjax", "--experts", "bf16"], True, args.timeout),
             ("ktjax-fp8", ["--run", "ktjax-fp8", "--experts", "fp8"], True, args.timeout),
             ("resident", ["--run", "resident", "--experts", "bf16"], False, args.timeout * 2 // 3),
             ("transformers", ["--run", "transformers", "--peer-experts", str(args.peer_experts),
                               "--peer-steps", str(args.peer_steps)], True, args.timeout * 2 // 3)]
    env = {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "110"}
    budget = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.4f}",
              "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if frac else {}
    me = [sys.executable, os.path.abspath(__file__)] + common
    results = run_parts(
        [(name, me + extra, {**env, **(budget if budgeted else {})}, timeout)
         for name, extra, budgeted, timeout in parts if name in args.parts],
        log_path=os.path.join(args.out, "bench_offload.log"), deadline_s=args.deadline,
        ceiling_args=lambda c: ["--h2d-gbps", str(c["h2d_gbps"]), "--hbm-gbps", str(c["hbm_gbps"]),
                                "--matmul-tflops", str(c["matmul_tflops"])] if "h2d_gbps" in c else [])
    with open(os.path.join(args.out, "bench_offload.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results)
    with open(os.path.join(args.out, "bench_offload.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
