"""Offload benchmark: DeepSeek-V3 full-size layers with random weights, routed experts in pinned host
memory, under a GPU budget the allocator enforces. In one run: the ceilings (host->device copies,
HBM, matmul, the host-CPU expert kernels, the CPU and the link at once), then ktjax with bf16, FP8,
int8 and int4 experts (int8/int4 on both paths: host CPU and link, chosen per step, or forced),
the same model all on the device, and optionally transformers + accelerate.

    python3 scripts/bench_offload.py --all --moe-layers 4 --gpu-memory 24GiB   # on the GPU machine
    python scripts/bench_offload.py --all --tiny                                # a laptop check

Each part runs in its own process (the budget is a process-wide allocator setting); the driver
prints a markdown table last and writes it, with the raw JSON, under $OUT (or --out).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchparts import HostTwice, run_parts, summarize_trace  # noqa: E402

T_START = time.perf_counter()
# On a laptop (--tiny) the budget holds every tiny expert: the odd ones go to host memory instead.
TINY_HOST_RULES = {r".*\.experts\.\d*[13579]": "host"}
FORMAT_OF_PART = {"bf16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int4", "resident": "bf16"}


def log(msg: str):
    print(f"[{time.perf_counter() - T_START:6.1f} s] {msg}", flush=True)


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
    """Pinned host->device (one 1 GiB copy, and 8 experts at a time), HBM, bf16 matmul, and the
    host-CPU expert kernels alone and with the link streaming at the same time. Each call of either path
    takes the next 8 of 24 distinct experts of its own (660 MB of int4, more than the H200 host's 300 MiB
    L3): the same 8 again would be read from cache (offload.md, run 14)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ktjax.experts.host import HostExperts, assignments
    from ktjax.runtime.offload.path_rates import kernel_name
    from ktjax.experts.packed import PackedLayout
    d = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(d, memory_kind="pinned_host")
    dev = jax.sharding.SingleDeviceSharding(d, memory_kind="device")
    n = (1 << 20) if tiny else (1 << 29)  # 1 GiB of bf16
    a = jax.device_put(jnp.ones((n,), jnp.bfloat16), host)
    out = {"h2d_gbps": a.nbytes / median_time(lambda: jax.device_put(a, dev)) / 1e9}
    x = jax.random.normal(jax.random.key(0), (2 * n,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 1.0001)
    out["hbm_gbps"] = 2 * x.nbytes / median_time(lambda: f(x), n=10) / 1e9
    m = 256 if tiny else 8192
    b = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    g = jax.jit(lambda b: b @ b)
    out["matmul_tflops"] = 2 * m**3 / median_time(lambda: g(b), n=10) / 1e12
    del a, x, b
    F, D = (64, 256) if tiny else (2048, 7168)
    rng = np.random.default_rng(0)
    for fmt, act in (("int8", "float32"), ("int8", "int8"), ("int4", "float32"), ("int4", "int8")):
        L = PackedLayout(fmt, F, D)
        proto = L.pack(*(rng.standard_normal(s).astype(np.float32) * 0.02 for s in ((F, D), (F, D), (D, F))))
        bufs = [jax.device_put(np.roll(proto, e), host) for e in range(48)]  # 0-23 the CPU's, 24-47 the link's
        jax.block_until_ready(bufs)
        views = [np.asarray(v) for v in bufs]
        kernels = HostExperts(L, act)
        fmt = kernel_name(fmt, act)  # the ceilings' keys name the kernel, as ktjax's cached rates do
        xs = rng.standard_normal((1, D)).astype(np.float32)

        calls = {"cpu": 0, "link": 0}

        def cpu():
            chosen = np.arange(8) + 8 * (calls["cpu"] % 3)
            calls["cpu"] += 1
            tok, w, nt = assignments(chosen[None, :], np.full((1, 8), 0.125, np.float32), chosen)
            kernels.compute(np.array([views[e].ctypes.data for e in chosen], np.int64), tok, nt, w, xs)

        def link():
            start = 24 + 8 * (calls["link"] % 3)
            calls["link"] += 1
            jax.block_until_ready(jax.device_put(bufs[start:start + 8], dev))

        out[f"{fmt}_cpu_gbps"] = 8 * L.nbytes / median_time(lambda: (cpu(), np.zeros(1))[1], n=7, warm=2) / 1e9
        out[f"{fmt}_link_gbps"] = 8 * L.nbytes / median_time(lambda: (link(), np.zeros(1))[1], n=7, warm=2) / 1e9
        stop, moved = threading.Event(), [0]

        def stream():
            while not stop.is_set():
                link()
                moved[0] += 8 * L.nbytes

        th = threading.Thread(target=stream)
        th.start()
        time.sleep(0.1)
        m0, t0, n_cpu = moved[0], time.perf_counter(), 0
        while time.perf_counter() - t0 < (0.3 if tiny else 1.5):
            cpu()
            n_cpu += 1
        dt = time.perf_counter() - t0
        stop.set()
        th.join()
        out[f"{fmt}_both_cpu_gbps"] = n_cpu * 8 * L.nbytes / dt / 1e9
        out[f"{fmt}_both_link_gbps"] = (moved[0] - m0) / dt / 1e9
        del bufs, views
    return out


def decode_steps(model, B: int, ctx: int, steps: int, sampling):
    """Warm, then time `steps` decode steps at batch B after a `ctx`-token context: per-step times and stats,
    and {"first_step_s": the first warm step's time (its programs compiled), "tokens": those the timed steps
    sampled}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    ex = model
    cfg = ex.config
    cache = ex.init_cache(B, ctx + steps + 16)
    tok = jnp.asarray((np.arange(B) * 7919 + 13) % cfg.vocab_size, jnp.int32)  # rows route differently
    pos = np.full((B,), ctx, np.int32)
    key = jax.random.key(0)
    warm = 8  # compile and warm up: the segments' variants (experts per path) appear over several steps
    t = time.perf_counter()
    for s in range(warm):
        tok, cache, _ = ex.decode(cache, tok, pos + s, key, sampling)
        if s == 0:
            jax.block_until_ready(tok)
            first_s = time.perf_counter() - t
    jax.block_until_ready(tok)
    times, stats, tokens = [], [], []
    for s in range(steps):
        t = time.perf_counter()
        tok, cache, st = ex.decode(cache, tok, pos + warm + s, key, sampling)
        jax.block_until_ready(tok)
        times.append(time.perf_counter() - t)
        stats.append(st)
        tokens.append(np.asarray(tok).tolist())
    return times, stats, {"first_step_s": first_s, "tokens": tokens}


def decode_row(cfg, plan, times, stats, ceil: dict, B: int, ctx: int, kernel: str | None = None,
               in_situ=None) -> dict:
    """One decode measurement against its floors: link only (host bytes moved over the measured
    link) and dual path (the host experts' bytes over the CPU and link rates measured at once: the ceilings, or
    the in-situ rates `in_situ` (`PathRates`) the split uses, also measured with both paths at once, whichever
    sum higher). row["floor_basis"] says which."""
    import numpy as np
    step = float(np.median(times))
    n_moe = len(cfg.moe_layers)
    link_bytes = float(np.mean([s.bytes_from_host for s in stats]))
    per_path = {k: float(np.mean([getattr(s, f) for s in stats])) for k, f in
                (("device", "experts_on_device"), ("link", "experts_fetched"), ("host_cpu", "experts_on_host_cpu"))}
    # The floor counts the host experts the step needed: not those fetched a layer early and then not chosen
    # (OffloadedExecutor.lookahead), which the link did carry.
    wasted = float(np.mean([s.experts_early - s.experts_early_used for s in stats]))
    host_experts = per_path["link"] + per_path["host_cpu"] - wasted
    core_read = sum(v for k, v in plan.core_bytes.items() if k != "embeddings")
    cache_bytes = cfg.num_hidden_layers * B * (ctx + 1) * cfg.cache_dim * 2
    device_s = (core_read + cache_bytes + per_path["device"] * plan.expert_bytes) / (ceil["hbm_gbps"] * 1e9)
    row = {"step_s": step, "tokens_per_s": B / step, "steps_ms": [round(t * 1e3, 2) for t in times],
           "experts_per_step": per_path, "host_bytes_per_step": link_bytes,
           "achieved_h2d_gbps": link_bytes / step / 1e9,
           "layer_spacing_ms": [round(float(v), 3) for v in np.median([np.diff(s.routed_at) * 1e3 for s in stats], 0)]
           if n_moe > 1 else []}
    fmt = plan.expert_format.name
    h2d = max(ceil["h2d_gbps"], ceil.get(f"{fmt}_link_gbps", 0))
    fmt = kernel or fmt  # the host kernel's own ceilings for the dual floor
    row.update(floor_host_bytes=host_experts * plan.expert_bytes, floor_device_s=device_s)
    row["link_floor_s"] = host_experts * plan.expert_bytes / (h2d * 1e9) + device_s
    # The dual floor at the faster of the two measurements of both paths at once: ceilings passed in from another
    # run (scripts/ab_offload.sh) can sit under what this host's in-situ rates reached (run 71: int4 106-111%).
    rates = ([(ceil[f"{fmt}_both_cpu_gbps"] + ceil[f"{fmt}_both_link_gbps"], "dual, ceilings")]
             if f"{fmt}_both_cpu_gbps" in ceil else [])
    rates += [(in_situ.cpu_gbps + in_situ.link_gbps, "dual, in-situ rates")] if in_situ is not None else []
    both, row["floor_basis"] = max(rates) if rates else (None, "link only")
    if both:
        row["dual_floor_s"] = host_experts * plan.expert_bytes / (both * 1e9) + device_s
    row["floor_s"] = row.get("dual_floor_s", row["link_floor_s"])
    row["floor_over_measured"] = row["floor_s"] / step
    cpu_s = [float(np.sum(s.host_cpu_seconds)) for s in stats]
    link_s = [float(np.sum(s.link_bytes)) / (h2d * 1e9) for s in stats]
    # Time outside the experts' own transfer/compute: the step minus, per layer, the slower path's work.
    expert_s = [sum(max(c, lb / (h2d * 1e9)) for c, lb in zip(s.host_cpu_seconds + [0.0] * n_moe, s.link_bytes))
                for s in stats]
    # A layer's parts on the step's clock, for the steps whose every MoE layer had a host share: routing on the
    # host -> host share starts (split, transfers and the device's programs dispatched), the host share, and its
    # end -> the next layer's routing on the host (what the device still had to do, then attention and routing).
    host = [[(a, b) for what, a, b in s.timeline if what == "host_share"] for s in stats]  # per step, per layer
    full = [(s, h) for s, h in zip(stats, host) if len(h) == n_moe == len(s.routed_at)]
    if full and n_moe > 1:
        parts = [[(a - r, b - a, r2 - b) for r, (a, b), r2 in zip(s.routed_at, h, s.routed_at[1:])] for s, h in full]
        row["layer_parts_ms"] = {k: round(float(np.median([p[j] for step in parts for p in step])) * 1e3, 3)
                                 for j, k in enumerate(("to_host_share", "host_share", "after_host_share"))}
    if n_moe > 1:
        row["timeline_ms"] = layer_timeline(stats, n_moe)
    row["host_cpu_s_per_step"] = float(np.median(cpu_s))
    row["link_s_per_step"] = float(np.median(link_s))
    row["outside_experts_share"] = float(np.median([(t - e) / t for t, e in zip(times, expert_s)]))
    # The same less the device's own reads at its HBM ceiling (attention, shared experts, dense layers, head, the
    # device's experts; `device_s`): what no kernel or transfer needed, the overhead item 6 of issue 12 aims at.
    # At batch 1 those reads are serial with the experts' paths (attention comes before the routing), but for the
    # shared expert, which the handoff form computes while the host reacts: this may understate it by its reads.
    row["outside_work_share"] = float(np.median([(t - e - device_s) / t for t, e in zip(times, expert_s)]))
    if row["layer_spacing_ms"]:
        # The same per MoE layer, as R1's step of 58 of them sees it (its embedding, dense layers and head weigh
        # ~5%, where they weigh a third of this 4-layer step).
        own = layer_own_bytes(plan.core_bytes, cache_bytes, cfg.num_hidden_layers, n_moe, per_path["device"],
                              plan.expert_bytes)
        row["outside_work_share_per_layer"] = outside_share_per_layer(
            float(np.median(row["layer_spacing_ms"])) / 1e3, float(np.median(expert_s)) / n_moe, own,
            ceil["hbm_gbps"])
    return row


def layer_own_bytes(core: dict, cache_bytes: float, n_layers: int, n_moe: int, device_experts: float,
                    expert_bytes: int) -> float:
    """A MoE layer's own device reads (core: the plan's bytes by group): attention, norms and cache a layer;
    router, shared expert and the step's device experts a MoE layer."""
    return ((core.get("attention", 0) + core.get("norms", 0) + cache_bytes) / n_layers
            + (core.get("router", 0) + core.get("shared_experts", 0) + device_experts * expert_bytes) / n_moe)


def outside_share_per_layer(spacing_s: float, paths_s: float, own_bytes: float, hbm_gbps: float) -> float:
    """Item 6's share per MoE layer: its spacing less its experts' slower path and its own reads at the HBM
    ceiling, over the spacing."""
    return 1 - (paths_s + own_bytes / (hbm_gbps * 1e9)) / spacing_s


def layer_timeline(stats, n_moe: int) -> dict:
    """Where a MoE layer's time goes on the host threads, from the steps' timelines (`StepStats.timeline`): for
    each kind of span (a segment's dispatch, a wait on the device, the split, the link's transfers started, the
    host share; with a watcher, the transfers landing and the device share computed), when it first starts after
    the layer's routing reached the host, when its last ends, and how long its spans in that layer take together,
    medians over the steps' MoE layers but the last (which the head follows, not a layer),
    and how many there are per layer. A span before a layer's routing (the next routing's wait) counts in the
    layer before."""
    import bisect

    import numpy as np
    seen: dict[str, list[tuple[float, float, float]]] = {}  # per kind: (at, ends, takes) of each layer
    counts: dict[str, int] = {}
    layers = 0
    for s in stats:
        if len(s.routed_at) != n_moe:
            continue
        layers += n_moe - 1
        per: dict[tuple[str, int], tuple[float, float, float]] = {}
        for what, a, b in list(s.timeline):
            j = bisect.bisect_right(s.routed_at, a) - 1
            if 0 <= j < n_moe - 1:
                at, end, took = per.get((what, j), (a - s.routed_at[j], 0.0, 0.0))
                per[(what, j)] = (at, max(end, b - s.routed_at[j]), took + b - a)
                counts[what] = counts.get(what, 0) + 1
        for (what, _), v in per.items():
            seen.setdefault(what, []).append(v)
    out = {what: {key: round(float(np.median([v[m] for v in vs])) * 1e3, 3) for m, key in enumerate(("at", "ends",
                                                                                                     "takes"))}
           | {"per_layer": round(counts[what] / layers, 2)} for what, vs in seen.items()}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["at"]))


def run_ktjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from fullsize import fullsize_config, plan_for, random_offloaded_model

    from ktjax.runtime.model import Sampling
    from ktjax.runtime.offload.path_rates import kernel_name
    from ktjax.runtime.placement import parse_size

    fmt = FORMAT_OF_PART[args.run]
    res = {"part": args.run, "experts": fmt}
    ceil = {k: getattr(args, k) for k in ("h2d_gbps", "hbm_gbps", "matmul_tflops") if getattr(args, k)}
    ceil.update(json.loads(args.path_rates) if args.path_rates else {})
    if not ceil:
        ceil = ceilings(args.tiny)
        res.update(ceil)
        print("CEILINGS " + json.dumps(res), flush=True)
    cfg = fullsize_config(args.moe_layers) if not args.tiny else tiny_config(args.moe_layers, *args.tiny_experts)
    dtype = jnp.bfloat16
    resident = args.run == "resident"
    max_ctx = (args.prefill_max if not args.tiny else 512) + 256
    rules = TINY_HOST_RULES if args.tiny and not resident else None
    # The budget holds the larger of the phases measured: one 8K prompt (decode batches of 1K-token rows
    # need less), as in the earlier runs this one is compared with.
    plan = plan_for(cfg, dtype, experts=fmt, gpu_memory=args.gpu_memory, all_on_device=resident, rules=rules,
                    max_batch=1, max_context=max_ctx, expert_chunk=args.expert_chunk)
    print(plan.table(), flush=True)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and not args.tiny and limit < parse_size(args.gpu_memory):  # offload.md run 25 met this
        log(f"warning: the allocator's limit ({limit / 2**30:.1f} GiB, XLA_PYTHON_CLIENT_MEM_FRACTION) is below "
            f"--gpu-memory {args.gpu_memory}: XLA will run short and retry allocations; --all sets it from the budget")
    t = time.perf_counter()
    # The split's rates: measured below where the model runs, as ktjax.load does (`rates_in_situ`).
    model = random_offloaded_model(cfg, plan, dtype, progress=log)
    res["build_s"] = time.perf_counter() - t
    res.update(host_experts=len(plan.host_experts), device_experts=len(plan.device_experts),
               expert_bytes=plan.expert_bytes)
    sampling = Sampling.of(0.0, 0, 1.0)
    ctx = 1024 if not args.tiny else 64
    modes = args.modes if fmt in ("int8", "int4") else ["gpu"]
    acts = args.host_activations if fmt in ("int8", "int4") else args.host_activations[:1]
    base = model
    for act in acts:
        model = base.with_host_activations(act)
        suffix = "_q8" if act == "int8" and len(acts) > 1 else ""
        if model.host is not None:
            # The split's rates as ktjax.load measures them (a few experts per call, both paths at once),
            # for each host-kernel thread count asked for; the best pair is used.
            from ktjax.runtime.offload.host_path import default_threads
            measured = {}
            again = {}
            for n in args.host_threads or [default_threads()]:
                for _ in range(args.rate_repeats):  # the first is used, as ktjax.load would; the rest show the spread
                    r = model.with_host_threads(n).measure_rates()
                    measured.setdefault(n, r)
                    again.setdefault(str(n), []).append(dataclasses.asdict(r))
                    log(f"in-situ rates, {act} activations, {n} host threads: CPU {r.cpu_gbps:.1f} GB/s + link "
                        f"{r.link_gbps:.1f} GB/s, {r.cpu_call_s * 1e3:.2f} ms per CPU call")
            if args.rate_repeats > 1:
                res["rates_in_situ_repeats" + suffix] = again
            best = max(measured, key=lambda n: measured[n].cpu_gbps + measured[n].link_gbps)
            model = model.with_host_threads(best).with_rates(measured[best])
            res["rates_in_situ" + suffix] = {str(n): {"cpu_gbps": r.cpu_gbps, "link_gbps": r.link_gbps,
                                                      "cpu_call_s": r.cpu_call_s} for n, r in measured.items()}
            res["host_threads" + suffix] = best
        for B, mode, form in [(B, mode, f) for B in args.batches for mode in (modes if B == 1 else modes[:1])
                              for f in (args.decode_forms if B == 1 or args.every_form else args.decode_forms[:1])]:
            if act == "int8" and mode == "gpu" and "float32" in acts:
                continue  # the host CPU computes nothing: the same as float32's row
            times, stats, seen = decode_steps(model.with_expert_compute(mode).with_decode_form(form), B, ctx,
                                              args.steps, sampling)
            row = decode_row(cfg, plan, times, stats, ceil, B, ctx, kernel=kernel_name(fmt, act),
                             in_situ=model.rates if model.host is not None else None) | seen
            name = (f"decode_b{B}" + (f"_{mode}" if fmt in ("int8", "int4") else "")
                    + (f"_{form}" if form != args.decode_forms[0] else "") + suffix)
            row["host_activations"] = act
            res[name] = row
            print(f"ROW {name} " + json.dumps(row), flush=True)
            log(f"{name}: {row['step_s'] * 1e3:.2f} ms/step ({' '.join(map(str, row['steps_ms']))}), experts/step "
                f"{row['experts_per_step']}, floor {row['floor_s'] * 1e3:.2f} ms "
                f"({100 * row['floor_over_measured']:.0f}%, {row['floor_basis']}), outside experts "
                f"{100 * row['outside_experts_share']:.0f}% (less the device's reads: "
                f"{100 * row['outside_work_share']:.0f}%)")
        if args.r1_gpu_memory and model.host is not None:
            first = model.with_expert_compute(modes[0]).with_decode_form(args.decode_forms[0])
            for name, row in r1_share_rows(args, cfg, plan, first, ceil, ctx, sampling, kernel_name(fmt, act)).items():
                res[name + suffix] = row
    model = model.with_expert_compute(modes[0]).with_decode_form(args.decode_forms[0])
    if args.profile and not resident:
        res["decode_b1_profile_ms"] = prof = profile_step(model, ctx, sampling)
        print("ROW decode_b1_profile_ms " + json.dumps(prof), flush=True)
        log("decode B=1, segments waited for one by one (ms per step): "
            + ", ".join(f"{k} {v:.2f}" for k, v in prof.items()))
    if args.trace and not resident:
        trace_dir = os.path.join("/tmp", f"trace_{args.run}")  # summarised, and copied to $OUT if small
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # Python's calls would slow the threads (and fill the trace's 1M events)
        options.host_tracer_level = 3  # XLA's and the runtime's host events too: where the launching thread waits
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
            decode_steps(model, 1, ctx, 2, sampling)
        summarize_trace(trace_dir, args.out)
    for T in ([] if resident or not args.prefill_max else [args.prefill_max // 8, args.prefill_max] if not args.tiny
              else [64, 256]):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        lengths = np.array([T], np.int32)
        for _ in range(2):  # compile and warm
            tok, _, st = model.prefill(model.init_cache(1, T), tokens, lengths, jax.random.key(0), sampling)
            jax.block_until_ready(tok)
        ts, moved = [], []
        for _ in range(args.prefill_reps):
            cache = model.init_cache(1, T)
            t = time.perf_counter()
            tok, _, st = model.prefill(cache, tokens, lengths, jax.random.key(0), sampling)
            jax.block_until_ready(tok)
            ts.append(time.perf_counter() - t)
            moved.append(st.bytes_from_host)
        step, host_bytes = float(np.median(ts)), float(np.mean(moved))
        flops = 2 * T * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size * len(cfg.moe_layers)
        h2d = max(ceil["h2d_gbps"], ceil.get(f"{fmt}_link_gbps", 0))
        floor = max(host_bytes / (h2d * 1e9), flops / (ceil["matmul_tflops"] * 1e12))
        row = {"seconds": step, "tokens_per_s": T / step, "host_bytes": host_bytes,
               "achieved_h2d_gbps": host_bytes / step / 1e9, "floor_s": floor, "floor_over_measured": floor / step,
               "floor_host_bytes": host_bytes, "floor_flops_s": flops / (ceil["matmul_tflops"] * 1e12)}
        res[f"prefill_{T}"] = row
        print(f"ROW prefill_{T} " + json.dumps(row), flush=True)
        log(f"prefill T={T}: {step:.3f} s, {T / step:.0f} tok/s, {host_bytes / 1e9:.2f} GB from host "
            f"({100 * floor / step:.0f}% of floor)")
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    res["device_bytes_limit"] = stats.get("bytes_limit")
    return res


def profile_step(model, ctx: int, sampling) -> dict:
    """Batch-1 decode steps with each segment waited for in turn (no overlap): where a step's time goes, in ms
    per segment kind, the host CPU's kernels, and the rest."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    cache = model.init_cache(1, ctx + 16)
    tok, key, parts = jnp.zeros((1,), jnp.int32), jax.random.key(0), []
    for s in range(5):
        t = time.perf_counter()
        tok, cache, st = model.decode(cache, tok, np.full((1,), ctx + s, np.int32), key, sampling, profile=True)
        jax.block_until_ready(tok)
        if s >= 2:  # the first steps compile
            parts.append({**{k: v * 1e3 for k, v in st.segment_seconds.items()},
                          "host_cpu": float(np.sum(st.host_cpu_seconds)) * 1e3,
                          "step": (time.perf_counter() - t) * 1e3})
    prof = {k: float(np.median([p.get(k, 0.0) for p in parts])) for k in parts[0]}
    prof["other (python, transfers, syncs)"] = prof["step"] - sum(v for k, v in prof.items() if k != "step")
    return prof


def r1_share_rows(args, cfg, plan, model, ceil: dict, ctx: int, sampling, kernel: str) -> dict[str, dict]:
    """Batch-1 decode with each MoE layer keeping on the device only the share of its experts that the whole
    DeepSeek-R1 keeps on a GPU of --r1-gpu-memory (`fullsize.r1_resident_per_layer`), and R1's step extrapolated
    from it: the median spacing of MoE layers x 58, plus the rest of this step (embedding, dense layer, head),
    plus R1's other dense layers at this run's profiled dense-layer time. A row per --r1-variants value, in the
    same process, and per --decode-forms value: decode_b1_r1_share (the first form, 'plain'),
    decode_b1_r1_share[_{form}][_{variant}]. No rows where this model's budget already keeps no more per layer
    than R1 would."""
    import jax
    import numpy as np
    from fullsize import capped_rules, plan_for, r1_resident_per_layer, reference_config
    fmt = plan.expert_format.name
    r1 = reference_config()
    share = r1_resident_per_layer(r1, fmt, args.r1_gpu_memory, plan.max_context) / r1.n_routed_experts
    per_layer = int(share * cfg.n_routed_experts)
    here = min(sum(1 for i, _ in plan.device_experts if i == layer) for layer in cfg.moe_layers)
    log(f"R1 on {args.r1_gpu_memory}: {100 * share:.1f}% of each layer's {fmt} experts on the device; this model "
        f"{100 * here / cfg.n_routed_experts:.1f}%")
    if per_layer >= here:
        return {}
    rules = TINY_HOST_RULES if args.tiny else {}  # as the part's own plan
    capped = plan_for(cfg, model.dtype, experts=fmt, gpu_memory=args.gpu_memory, max_batch=1,
                      rules={**rules, **capped_rules(cfg, per_layer)}, max_context=plan.max_context,
                      expert_chunk=args.expert_chunk)
    r1_model = model.with_placement(capped).with_host_threads(model.host.threads)
    r1_model = r1_model.with_host_activations(model.host_activations).with_decode_form(model.decode_form)
    prof = profile_step(r1_model, ctx, sampling)
    dense_s = prof["dense_layer"] / 1e3
    n_moe = len(cfg.moe_layers)
    rows = {}
    if "handoff" in args.decode_forms or any("handoff" in v.split("+") for v in args.r1_variants):
        r1_model.handoff_layers  # noqa: B018 (made here once: the rows' handoff forms share its compiled programs)
    for form, variant in [(f, v) for f in args.decode_forms for v in args.r1_variants]:
        model_v = with_variant(r1_model.with_decode_form(form), variant, ceil, kernel)
        times, stats, seen = decode_steps(model_v, 1, ctx, args.steps, sampling)
        row = decode_row(cfg, capped, times, stats, ceil, 1, ctx, kernel=kernel, in_situ=r1_model.rates) | seen
        # The same model in every row: the share of its sampled tokens equal to the first row's (1.0 where the
        # forms compute alike; a form that differs in float rounding may rarely pick another token and diverge).
        first = next(iter(rows.values()), row)["tokens"]
        row["tokens_as_first_row"] = float(np.mean([a == b for a, b in zip(first, row["tokens"])]))
        spacing = float(np.median(row["layer_spacing_ms"])) / 1e3 if row["layer_spacing_ms"] else row["step_s"] / n_moe
        n = model_v.lookahead
        # The process's peak so far: a row that raises it allocated more than every row before it.
        row["peak_device_bytes_so_far"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        row.update(r1_gpu_memory=args.r1_gpu_memory, r1_device_share=share,
                   device_share=per_layer / cfg.n_routed_experts, dense_layer_s=dense_s,
                   host_activations=model.host_activations, profile_ms=prof, lookahead=n, decode_form=form,
                   variant=variant, split_rates=dataclasses.asdict(model_v.rates),
                   r1_extrapolated_s=spacing * len(r1.moe_layers) + max(0.0, row["step_s"] - spacing * n_moe)
                   + (r1.layer_kinds.count("dense") - cfg.layer_kinds.count("dense")) * dense_s)
        if isinstance(model_v.host, HostTwice) and model_v.host.pairs:  # in the step, then alone (ms, medians)
            row["host_call_in_step_ms"], row["host_call_alone_ms"] = (
                round(float(np.median(v)) * 1e3, 3) for v in zip(*model_v.host.pairs))
        if n:
            row["early_experts_per_step"] = float(np.mean([s.experts_early for s in stats]))
            row["early_used_per_step"] = float(np.mean([s.experts_early_used for s in stats]))
        name = ("decode_b1_r1_share" + (f"_{form}" if form != args.decode_forms[0] else "")
                + ("" if variant == "plain" else "_" + variant.replace("+", "_").replace("-", "_")))
        if name in rows:  # a setting repeated: its second row is _again1, and so on
            name += f"_again{sum(k == name or k.startswith(name + '_again') for k in rows)}"
        print(f"ROW {name} " + json.dumps(row), flush=True)
        log(f"{name}: {row['step_s'] * 1e3:.2f} ms/step, experts/step {row['experts_per_step']}"
            + (f" ({row['early_experts_per_step']:.1f} fetched a layer early, {row['early_used_per_step']:.1f} used)"
               if n else "")
            + f", floor {100 * row['floor_over_measured']:.0f}% ({row['floor_basis']}); R1 extrapolated "
              f"{row['r1_extrapolated_s'] * 1e3:.1f} ms ({1 / row['r1_extrapolated_s']:.2f} tokens/s)")
        rows[name] = row
    return rows


def with_variant(model, variant: str, ceil: dict, kernel: str):
    """The executor with a --r1-variants setting applied (options joined by '+'; 'plain': as it is)."""
    from ktjax.runtime.offload.handoff_step import WITHOUT_GRAPHS
    from ktjax.runtime.offload.path_rates import PathRates
    for option in variant.split("+"):
        if option == "plain":
            continue
        if option == "apart":
            model = model.with_resident_apart(True)
        elif option == "watch":
            model = model.with_watcher(True)
        elif option == "put-copies":  # a fused layer's transfers by jax.device_put, as before dea2747
            model = model.with_fused_copies("put")
        elif option == "in-program":  # the link's experts moved by the device's program, dispatched by the worker
            model = model.with_fused_copies("in_program")
        elif option == "in-program-here":  # the same program called by the step's thread before the host kernels
            model = model.with_fused_copies("in_program_here")
        elif option == "indices-in-place":  # a fused layer's ids and rows in pinned buffers its program reads
            model = model.with_indices_in_place(True)
        elif option == "handoff":  # decode steps (up to 4 rows) launched whole, each layer waiting for the host
            model = model.with_decode_form("handoff")
        elif option == "xla-experts":  # the handoff programs' device experts by "auto"'s path (int8: XLA's)
            model = with_handoff_programs(model, expert_impl=None)
        elif option == "effects":  # the handoff programs' calls declared with side effects (as before 1570e11)
            model = with_handoff_programs(model, side_effect=True)
        elif option == "keep-cache":  # the handoff programs donate no cache buffers (does donation hold launches?)
            model = with_handoff_programs(model, donate_cache=False)
        elif option == "fill-apart":  # a layer's copies queued by a thread of their own beside the host CPU's share
            model = with_handoff_programs(model, fill_apart=True)
        elif option in ("host-again", "host-again-idle"):  # each host share computed again, alone (`HostTwice`)
            model = model._with()
            model.host = HostTwice(model.host, model.store, 0.5e-3 if option.endswith("idle") else 0.0)
        elif option == "one-part":  # a handoff layer's device experts all computed after its fill, as before a59228d
            model = with_handoff_programs(model, resident_first=False)
        elif option == "no-graphs":  # the handoff programs' kernels launched one by one (the default since run 71)
            model = with_handoff_programs(model, compiler_options=WITHOUT_GRAPHS)
        elif option == "graphs":  # the handoff programs' kernels in XLA's CUDA graphs (the default before run 71)
            model = with_handoff_programs(model, compiler_options=None)
        elif option == "copies-apart":  # by a program of their own before the device's (the default; named for
            model = model.with_fused_copies("program")  # runs 40-41, whose trees defaulted to the in_program forms)
        elif option == "routing-copies":  # the routing copied to the host after the call, as before 9be065c
            from ktjax.runtime.offload.segments import LayerSegments
            model = copy.copy(model)
            model.segments = {k: LayerSegments(s.graphdef, s.cfg, routing_to_host=False)
                              for k, s in model.segments.items()}
        elif option.startswith("lookahead") and option[len("lookahead"):].isdigit():
            model = model.with_lookahead(int(option[len("lookahead"):]))
        elif option.startswith("rates="):  # the split's rates set: rates=CPU/LINK in GB/s (a split sweep)
            cpu, link = (float(v) for v in option[len("rates="):].split("/"))
            model = model.with_rates(PathRates(link_gbps=link, cpu_gbps=cpu, cpu_call_s=model.rates.cpu_call_s))
        elif option.startswith("cpu-scale="):  # the split's CPU rate scaled: below 1 the link takes more experts
            r = model.rates
            model = model.with_rates(dataclasses.replace(r, cpu_gbps=r.cpu_gbps * float(option[len("cpu-scale="):])))
        elif option == "ceiling-rates":
            model = model.with_rates(PathRates(link_gbps=ceil[f"{kernel}_both_link_gbps"],
                                               cpu_gbps=ceil[f"{kernel}_both_cpu_gbps"],
                                               cpu_call_s=model.rates.cpu_call_s))
        else:
            sys.exit(f"--r1-variants: unknown option {option!r} in {variant!r}")
    return model


def with_handoff_programs(model, **settings):
    """The executor with handoff programs of its own, made with `HandoffLayers` settings changed; the same handoff
    (its rings and sequence numbers are the process's one protocol)."""
    layers = copy.copy(model.handoff_layers)
    for name, value in settings.items():
        setattr(layers, name, value)
    if set(settings) - {"fill_apart"}:  # the host's own settings leave the programs as they are
        layers.programs = {}
    return model._with(handoff_layers=layers)


def tiny_config(moe_layers: int, experts: int = 16, per_token: int = 4):
    from ktjax.config import ModelConfig
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3", vocab_size=512, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=1 + moe_layers, num_attention_heads=4, n_routed_experts=experts, n_shared_experts=1,
        num_experts_per_tok=per_token, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=4096))


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

    gen_time(2)  # warm: kernels, allocator, dispatch hooks
    t1, tn = gen_time(1), gen_time(1 + args.peer_steps)
    per_token = (tn - t1) / args.peer_steps
    return {"part": "transformers", "experts_per_layer": E, "decode_b1": {
        "step_s": per_token, "tokens_per_s": 1 / per_token, "host_bytes_per_step": expert_bytes,
        "achieved_h2d_gbps": expert_bytes / per_token / 1e9,
        "per_expert_byte_s": per_token / expert_bytes},
        "prefill_1k_s": t1, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def refloor(results: list[dict]) -> list[dict]:
    """Link floors against the best host->device rate measured anywhere in the run: the 1 GiB probe,
    8-expert copies, or what a streaming loop sustained (it can beat a single probe copy), so no row
    reads above 100% of its floor."""
    ceil = next((r for r in results if "h2d_gbps" in r), {})
    rates = [ceil.get("h2d_gbps", 0.0)] + [v for k, v in ceil.items() if k.endswith("_link_gbps")]
    rates += [v["achieved_h2d_gbps"] for r in results for v in r.values() if isinstance(v, dict) and "achieved_h2d_gbps" in v]
    best = max(rates) * 1e9
    for r in results:
        for v in r.values():
            if not isinstance(v, dict) or "floor_host_bytes" not in v:
                continue
            if "floor_device_s" in v:  # decode: experts over the link plus the device's own reads
                v["link_floor_s"] = v["floor_host_bytes"] / best + v["floor_device_s"]
                v["floor_s"] = min(v.get("dual_floor_s", v["link_floor_s"]), v["link_floor_s"])
            else:  # prefill: every host expert over the link, or the matmuls
                v["floor_s"] = max(v["floor_host_bytes"] / best, v["floor_flops_s"])
            v["floor_over_measured"] = v["floor_s"] / v.get("step_s", v.get("seconds"))
    return results


def table(results: list[dict]) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB" if b is not None else "-"  # noqa: E731
    ceil = next((r for r in results if "h2d_gbps" in r), {})
    lines = []
    if ceil:
        lines += [f"Ceilings measured in this run: pinned host->device {ceil['h2d_gbps']:.1f} GB/s (1 GiB copy), HBM "
                  f"{ceil['hbm_gbps']:.0f} GB/s (read+write), bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s."]
        for kernel in [k.removesuffix("_cpu_gbps") for k in ceil if k.endswith("_cpu_gbps") and "_both_" not in k]:
            lines.append(f"{kernel.replace('-int8-activations', ' x int8 activations')} experts, 8 at a time: host CPU "
                         f"{ceil[f'{kernel}_cpu_gbps']:.1f} GB/s, link {ceil[f'{kernel}_link_gbps']:.1f} GB/s; both at "
                         f"once {ceil[f'{kernel}_both_cpu_gbps']:.1f} + {ceil[f'{kernel}_both_link_gbps']:.1f} GB/s.")
        lines.append("")
    notes = []
    lines += ["| part | what | tokens/s | time | experts/step device / link / CPU | from host | floor | floor/measured "
              "| outside experts / less the device's reads |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        name = r["part"] + (f" ({r['experts_per_layer']} experts/layer)" if r.get("experts_per_layer") else "")
        for k, v in r.items():
            if not isinstance(v, dict) or "tokens_per_s" not in v:
                continue
            paths = v.get("experts_per_step")
            paths = f"{paths['device']:.1f} / {paths['link']:.1f} / {paths['host_cpu']:.1f}" if paths else "-"
            floor = f"{v['floor_s'] * 1e3:.1f} ms" if "floor_s" in v else "-"
            ratio = f"{100 * v['floor_over_measured']:.0f}%" if "floor_over_measured" in v else "-"
            outside = f"{100 * v['outside_experts_share']:.0f}%" if "outside_experts_share" in v else "-"
            if "outside_work_share" in v:
                outside += f" / {100 * v['outside_work_share']:.0f}%"
            t = v.get("step_s", v.get("seconds"))
            lines.append(f"| {name} | {k} | {v['tokens_per_s']:.2f} | {t * 1e3:.1f} ms | {paths} | "
                         f"{gb(v.get('host_bytes_per_step', v.get('host_bytes')))} | {floor} | {ratio} | {outside} |")
            if "layer_parts_ms" in v:
                p = v["layer_parts_ms"]
                notes.append(f"{name} {k}: per MoE layer, routing to its host share {p['to_host_share']:.2f} ms, the "
                             f"host share {p['host_share']:.2f} ms, its end to the next layer's routing "
                             f"{p['after_host_share']:.2f} ms")
            if v.get("timeline_ms"):
                spans = "; ".join(f"{what} {t['at']:.2f}-{t['ends']:.2f}"
                                  + (f" takes {t['takes']:.2f}" if t["takes"] < t["ends"] - t["at"] - 5e-3 else "")
                                  + (f" (x{t['per_layer']:g})" if t["per_layer"] != 1 else "")
                                  for what, t in v["timeline_ms"].items())
                notes.append(f"{name} {k}: a MoE layer's host-side spans from its routing (ms): {spans}")
            if v.get("lookahead"):
                notes.append(f"{name} {k}: lookahead {v['lookahead']}: {v['early_experts_per_step']:.1f} experts "
                             f"per step fetched a layer early, {v['early_used_per_step']:.1f} of them used")
            if "r1_extrapolated_s" in v:
                notes.append(f"{name} {k}: {100 * v['device_share']:.1f}% of each layer's experts on the device, as "
                             f"R1 would keep on {v['r1_gpu_memory']} ({100 * v['r1_device_share']:.1f}%); R1 "
                             f"extrapolated {v['r1_extrapolated_s'] * 1e3:.0f} ms per token, "
                             f"{1 / v['r1_extrapolated_s']:.2f} tokens/s")
        if r.get("decode_b1_profile_ms"):
            prof = ", ".join(f"{k} {v:.2f}" for k, v in r["decode_b1_profile_ms"].items())
            notes.append(f"{name}: batch-1 step with each segment waited for (ms): {prof}")
        if r.get("peak_device_bytes"):
            lines.append(f"| {name} | peak GPU memory | | | | {gb(r['peak_device_bytes'])} of "
                         f"{gb(r['device_bytes_limit'])} limit | | | |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run every part, each in its own process, and print the table")
    p.add_argument("--parts", nargs="+", default=["int8", "int4", "fp8", "bf16", "resident"],
                   help="which parts --all runs, in order (also: transformers)")
    p.add_argument("--run", choices=("bf16", "fp8", "int8", "int4", "resident", "transformers"), default="int8")
    p.add_argument("--moe-layers", type=int, default=4, help="MoE layers after the one dense layer (host RAM bound)")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU budget, enforced through the allocator")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["auto", "cpu", "gpu"],
                   help="expert_compute modes measured at B=1 for int8/int4 (the first also at larger batches)")
    p.add_argument("--steps", type=int, default=7, help="timed decode steps per batch size")
    p.add_argument("--prefill-max", type=int, default=8192)
    p.add_argument("--prefill-reps", type=int, default=2)
    p.add_argument("--expert-chunk", type=int, default=32)
    p.add_argument("--peer-experts", type=int, default=32, help="routed experts per layer in the transformers peer")
    p.add_argument("--peer-steps", type=int, default=2)
    p.add_argument("--h2d-gbps", type=float, default=0.0)
    p.add_argument("--hbm-gbps", type=float, default=0.0)
    p.add_argument("--matmul-tflops", type=float, default=0.0)
    p.add_argument("--path-rates", default="", help="JSON of the host-kernel ceilings (passed between parts)")
    p.add_argument("--timeout", type=int, default=240, help="seconds for each part")
    p.add_argument("--deadline", type=int, default=0, help="seconds for the whole --all run (0: none)")
    p.add_argument("--decode-forms", nargs="+", default=["fused"], choices=["auto", "fused", "streamed", "handoff"],
                   help="the offloaded executor's decode forms measured at B=1 (the first also at larger batches); "
                        "'auto' is 'handoff' on a GPU")
    p.add_argument("--every-form", action="store_true",
                   help="measure every --decode-forms value at larger batches too, in the same process (the "
                        "handoff form takes up to 4 rows)")
    p.add_argument("--host-activations", choices=("float32", "int8"), nargs="+", default=["int8"],
                   help="what the host CPU multiplies int8/int4 experts by (ktjax.load's host_activations, default "
                        "int8 as there); each form given is measured in turn on the same model (with more than one, "
                        "rows of int8 activations end in _q8)")
    p.add_argument("--host-threads", type=int, nargs="*", default=[],
                   help="host-kernel thread counts to measure the split's rates with (the best is used)")
    p.add_argument("--rate-repeats", type=int, default=1,
                   help="measure the split's in-situ rates this many times per thread count (the first is used)")
    p.add_argument("--trace", action="store_true", help="trace two B=1 decode steps of each part (jax.profiler: "
                   "on the H200 the traced steps died with CUDA_ERROR_LAUNCH_FAILED, offload.md run 11)")
    p.add_argument("--profile", action="store_true",
                   help="3 B=1 decode steps with each segment waited for: time per segment kind, host CPU, the rest")
    p.add_argument("--r1-variants", nargs="+", default=["plain"],
                   help="the R1-share row once per variant, in one process, in this order (a repeated one again): "
                        "'plain' (the executor as loaded) or options joined by '+': 'apart' (resident_apart), "
                        "'lookahead<N>' (N experts fetched a layer early), "
                        "'ceiling-rates' (the split's rates from this run's ceilings, both paths at once, not from "
                        "the load-time measurement), 'watch' (when transfers land and device shares are computed, "
                        "in the timeline), a fused layer's link experts moved 'put-copies' (by jax.device_put), "
                        "'copies-apart' (by a program of their own before the device's: the default), 'in-program' "
                        "(by the device's program, dispatched by the worker) or 'in-program-here' (the same, called "
                        "before the host kernels), 'indices-in-place' (a fused layer's expert ids and rows handed to "
                        "its program in pinned buffers), 'handoff' (decode steps of up to 4 rows launched whole, "
                        "each MoE layer's program waiting on its stream for the host's copies and share: decode_form "
                        "'handoff'), "
                        "'xla-experts' (after 'handoff': its device experts by auto's path, int8's XLA one), "
                        "'effects' (after 'handoff': its calls declared with side effects, jax's Python dispatch), "
                        "'keep-cache' (the handoff programs donate no cache buffers), 'no-graphs' (their kernels "
                        "launched one by one: the default), 'graphs' (their kernels in XLA's CUDA graphs), "
                        "'fill-apart' (the handoff form's copies queued by a thread of their own beside the host "
                        "CPU's share), 'host-again' / 'host-again-idle' (each layer's host share computed again "
                        "before the step goes on, on other hosted experts, alone: its threads warm / after 0.5 ms "
                        "idle; the row's host_call_in_step_ms against host_call_alone_ms), 'one-part' (a handoff "
                        "layer's device experts all computed after its whole fill, not the resident ones while the "
                        "link's land), 'rates=CPU/LINK' (the split's rates "
                        "in GB/s: a sweep of splits), 'cpu-scale=F' (the split's CPU rate times F, the in-situ "
                        "link rate kept: F < 1 leaves the link more experts), "
                        "'routing-copies' (the routing copied to the host after its program, not written there by it)")
    p.add_argument("--r1-gpu-memory", default="132GiB",
                   help="also measure int8/int4 batch-1 decode with each MoE layer keeping on the device only the "
                        "share of its experts that the whole R1 keeps on a GPU this size (default: 95%% of one "
                        "H200's 139 GiB), and extrapolate R1 from that row; '' to skip")
    p.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    p.add_argument("--tiny-experts", type=int, nargs=2, default=(16, 4), metavar=("E", "K"),
                   help="--tiny: routed experts per layer and per token (256 8: R1's, to time the host's "
                        "per-layer Python on a laptop)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.all:
        res = run_transformers(args) if args.run == "transformers" else run_ktjax(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    frac = None
    if not args.tiny:
        import jax
        total = jax.devices()[0].memory_stats()["bytes_limit"] / 0.75  # the default fraction is 0.75
        from ktjax.runtime.placement import parse_size
        frac = parse_size(args.gpu_memory) / total
    common = ["--moe-layers", str(args.moe_layers), "--gpu-memory", args.gpu_memory, "--steps", str(args.steps),
              "--prefill-max", str(args.prefill_max), "--prefill-reps", str(args.prefill_reps),
              "--expert-chunk", str(args.expert_chunk), "--batches", *map(str, args.batches), "--modes", *args.modes,
              "--out", args.out] + (["--tiny"] if args.tiny else []) + (["--trace"] if args.trace else []) + (["--profile"] if args.profile else []) + (
        ["--host-threads", *map(str, args.host_threads)] if args.host_threads else []) + [
        "--rate-repeats", str(args.rate_repeats),
        "--decode-forms", *args.decode_forms, *(["--every-form"] if args.every_form else []),
        "--host-activations", *args.host_activations,
        "--r1-gpu-memory", args.r1_gpu_memory, "--r1-variants", *args.r1_variants,
        "--tiny-experts", *map(str, args.tiny_experts)]
    env = {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "110"}
    budget = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{frac:.4f}",
              "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if frac else {}
    me = [sys.executable, os.path.abspath(__file__)] + common
    parts = []
    for name in args.parts:
        extra = ["--run", name] + (["--peer-experts", str(args.peer_experts), "--peer-steps", str(args.peer_steps)]
                                   if name == "transformers" else [])
        parts.append((name, me + extra, {**env, **(budget if name != "resident" else {})}, args.timeout))

    def ceiling_args(c):
        rates = {k: v for k, v in c.items() if k.startswith(("int8", "int4"))}
        return ["--h2d-gbps", str(c["h2d_gbps"]), "--hbm-gbps", str(c["hbm_gbps"]), "--matmul-tflops",
                str(c["matmul_tflops"]), "--path-rates", json.dumps(rates)] if "h2d_gbps" in c else []

    results = run_parts(parts, log_path=os.path.join(args.out, "bench_offload.log"), deadline_s=args.deadline,
                        ceiling_args=ceiling_args)
    results = refloor(results)
    with open(os.path.join(args.out, "bench_offload.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results)
    with open(os.path.join(args.out, "bench_offload.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
