"""A/B of the offloaded decode step's variants (how a fused layer's programs are arranged, experts fetched a
layer early), in one process on one model: the serving batch's step (32 slots, B of them active) and plain
batches, under each rule set.

    python3 scripts/bench_decode_variants.py --out $OUT     # the GPU machine (about 4 minutes)

The model is bench_serve.py's (DeepSeek-V3 full-size layers, 1 dense + 4 MoE, random weights, int4
experts under a 24 GiB budget, max batch 32). Rule sets:
  current:   as the executor is (capacities 1, 2, then powers of two >= 16; fused programs of 2/4/8 expert slots)
  apart:     a fused layer's resident experts in a program of their own, the streamed ones added by
             moe_landed once they land (OffloadedExecutor.with_resident_apart)
  lookahead: the current rules, each MoE layer fetching the next one's 2 likeliest host experts a layer
             early (OffloadedExecutor.with_lookahead)
Rules may repeat, to alternate them. (The capacity and slot rules this script compared before, `pow2-cap` and
`fine-slots`, were settled in benchmarks/serve.md's decode_variants_run1; the script at 3a04786 has them.)
Per rule set and batch: median step over --steps (after --warm), and one profiled step's segment times
(each segment waited for: where the step's time goes). Prints a table; writes decode_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="int4")
    p.add_argument("--gpu-memory", default="24GiB")
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--cases", nargs="+", default=["32:1", "32:4", "32:32", "1:1", "16:16"],
                   help="ROWS:ACTIVE decode batches (rows of the cache, rows active)")
    p.add_argument("--rules", nargs="+", default=["current", "apart", "lookahead"],
                   choices=["current", "apart", "lookahead"])
    p.add_argument("--host-threads", type=int, nargs="+", default=[0],
                   help="host-kernel thread counts, each run through every rule (0: the default)")
    p.add_argument("--small-layers", action="store_true", help="small shapes (a CPU check)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_serve
    from ktjax.runtime.model import Sampling
    from ktjax.runtime.shapes import cache_length

    build = argparse.Namespace(smoke=False, experts=args.experts, gpu_memory=args.gpu_memory,
                               moe_layers=args.moe_layers, max_batch=32, max_context=512,
                               small_layers=args.small_layers, host_threads=0, host_activations="int8")
    t0 = time.perf_counter()
    model = bench_serve.build_model(build)
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    base, cfg = model.executor, model.config

    max_len = cache_length(512, 0)
    sampling, key = Sampling.of(0.0, 0, 1.0), jax.random.key(0)
    rows_out = []
    for threads, rule in [(n, r) for n in args.host_threads for r in args.rules]:
        ex = (base.with_host_threads(threads or None).with_lookahead(2 if rule == "lookahead" else 0)
              .with_resident_apart(rule == "apart"))
        for case in args.cases:
            rows, active = map(int, case.split(":"))
            active_B = None if active == rows else np.arange(rows) < active
            cache = ex.init_cache(rows, max_len)
            tok = jnp.asarray((np.arange(rows) * 7919 + 13) % cfg.vocab_size, jnp.int32)
            times, stats = [], []
            for s in range(args.warm + args.steps + 1):
                pos = jnp.asarray(np.full((rows,), 32 + s, np.int32))
                profile = s == args.warm + args.steps
                t = time.perf_counter()
                tok, cache, st = ex.decode(cache, tok, pos, key, sampling, active_B=active_B, profile=profile)
                jax.block_until_ready(tok)
                if args.warm <= s < args.warm + args.steps:
                    times.append(time.perf_counter() - t)
                    stats.append(st)
            segs = {k: round(v * 1e3, 2) for k, v in sorted(st.segment_seconds.items(), key=lambda kv: -kv[1])}
            row = {"rule": rule, "host_threads": threads or "default", "rows": rows, "active": active,
                   "step_ms": float(np.median(times)) * 1e3,
                   "steps_ms": [round(t * 1e3, 1) for t in times],
                   "experts": {k: float(np.mean([getattr(x, f) for x in stats])) for k, f in
                               (("device", "experts_on_device"), ("link", "experts_fetched"),
                                ("host_cpu", "experts_on_host_cpu"), ("link_early", "experts_early"),
                                ("early_used", "experts_early_used"))},
                   "host_cpu_ms": float(np.mean([sum(x.host_cpu_seconds) for x in stats])) * 1e3,
                   "profiled_step_ms": st.seconds * 1e3, "profiled_segments_ms": segs}
            rows_out.append(row)
            print(f"{rule:10s} {threads or 'default'} threads {rows:3d} rows, {active:2d} active: "
                  f"{row['step_ms']:7.1f} ms/step "
                  f"(host CPU {row['host_cpu_ms']:.1f} ms), steps {row['steps_ms']}; profiled "
                  f"{row['profiled_step_ms']:.1f} ms: {dict(list(segs.items())[:5])}", flush=True)
            del cache, tok
    with open(os.path.join(args.out, "decode_variants.json"), "w") as f:
        json.dump(rows_out, f, indent=1)
    print("\n| rule | host threads | rows | active | step ms | host CPU ms | experts device/link/cpu "
          "| early / used |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows_out:
        e = r["experts"]
        print(f"| {r['rule']} | {r['host_threads']} | {r['rows']} | {r['active']} | {r['step_ms']:.1f} | "
              f"{r['host_cpu_ms']:.1f} | "
              f"{e['device']:.1f} / {e['link']:.1f} / {e['host_cpu']:.1f} | "
              f"{e['link_early']:.1f} / {e['early_used']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
