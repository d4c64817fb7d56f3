"""Where the host's threads spend their time in a jax.profiler perfetto trace (perfetto_trace.json.gz, as
bench_offload.py --trace writes it): per thread, the events with the most time; with --within NAME, inside each
event whose name contains NAME (e.g. a jitted program's call on the launching thread), the time by nested event.

    python3 scripts/trace_host.py benchmarks/decode_b1_trace_int4.json.gz --within "PjitFunction(moe_layer)"
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--within", default="", help="break down the events of this name")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    threads, names = load(args.trace)
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
