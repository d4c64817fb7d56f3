"""Where the host's threads spend their time in a jax.profiler perfetto trace (perfetto_trace.json.gz, as
bench_offload.py --trace writes it): per thread, the events with the most time; with --within NAME, inside each
event whose name contains NAME (e.g. a jitted program's call on the launching thread), the time by nested event.
With --timeline MS: instead, every event of MS ms before the trace's last GPU event, the GPU's and the host's, in
order of their start (where a layer's device work waits: the copies' stream, the kernels, the program calls).

    python3 scripts/trace_host.py benchmarks/decode_b1_trace_int4.json.gz --within "PjitFunction(moe_layer)"
    python3 scripts/trace_host.py benchmarks/offload_run54_trace_int4.json.gz --timeline 12 --longer 0.003
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def load(path: str) -> tuple[dict, dict]:
    """The trace's complete events by (pid, tid), sorted by start, and the threads' and processes' names."""
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names, threads = {}, collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["name"][0], e["pid"], e.get("tid"))] = e["args"]["name"]
        elif e.get("ph") == "X" and "dur" in e:
            threads[(e["pid"], e.get("tid"))].append((float(e["ts"]), float(e["dur"]), e["name"]))
    for evs in threads.values():
        evs.sort(key=lambda ev: (ev[0], -ev[1]))
    return threads, names


def nested(evs: list, start: float, dur: float) -> list:
    """The events of one thread inside [start, start + dur), outermost first."""
    return [ev for ev in evs if start <= ev[0] and ev[0] + ev[1] <= start + dur]


def timeline(threads: dict, names: dict, span_us: float, longer_us: float) -> None:
    """Every event longer than longer_us in the span_us before the last GPU event: start (ms from the span's), ms,
    process / thread, name."""
    where = {key: f"{names.get(('p', key[0], None), key[0])}/{names.get(('t', *key), key[1])}" for key in threads}
    gpu_end = max(ts + dur for key, evs in threads.items() if "gpu" in where[key].lower() for ts, dur, _ in evs)
    t0 = gpu_end - span_us
    events = sorted((ts, dur, name, where[key]) for key, evs in threads.items() for ts, dur, name in set(evs)
                    if ts >= t0 and dur > longer_us)
    for ts, dur, name, at in events:
        print(f"{(ts - t0) / 1e3:8.3f} {dur / 1e3:7.3f}  {at[-44:]:44s} {name[:70]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--within", default="", help="break down the events of this name")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--timeline", type=float, default=0.0, help="ms before the last GPU event to list instead")
    p.add_argument("--longer", type=float, default=0.003, help="--timeline: events longer than this (ms)")
    args = p.parse_args()
    threads, names = load(args.trace)
    if args.timeline:
        return timeline(threads, names, args.timeline * 1e3, args.longer * 1e3)
    for (pid, tid), evs in sorted(threads.items()):
        proc, thread = names.get(("p", pid, None), str(pid)), names.get(("t", pid, tid), str(tid))
        if "gpu" in proc.lower():
            continue
        totals, counts = collections.Counter(), collections.Counter()
        for _, dur, name in evs:
            totals[name[:80]] += dur
            counts[name[:80]] += 1
        print(f"{proc} / {thread}: {len(evs)} events over {(evs[-1][0] + evs[-1][1] - evs[0][0]) / 1e3:.2f} ms")
        for name, total in totals.most_common(args.top):
            print(f"   {total / 1e3:8.2f} ms  x{counts[name]:<5} {name}")
        outer = sorted({ev for ev in evs if ev[2] == args.within})  # (perfetto repeats some events)
        for k, (ts, dur, name) in enumerate(outer):
            inside = collections.Counter()
            for its, idur, iname in set(nested(evs, ts, dur)) - {(ts, dur, name)}:
                inside[iname[:70]] += idur
            parts = ", ".join(f"{n} {t / 1e3:.3f}" for n, t in inside.most_common(args.top))
            print(f"   [{k}] {name[:50]} at {(ts - evs[0][0]) / 1e3:.2f} ms takes {dur / 1e3:.3f} ms: {parts}")


if __name__ == "__main__":
    main()
