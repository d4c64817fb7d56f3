"""Run a benchmark's parts, each in its own process (the GPU budget is a process-wide allocator
setting), under a deadline; keep what a part printed even when it ran out of time. Also the
benchmarks' shared timer (`best_of`).

A part prints `CEILINGS {json}` and `ROW name {json}` lines as it goes and `RESULT {json}` at the end.
A part cut off by its timeout still contributes its ceilings and finished rows, marked partial.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import subprocess
import time


def best_of(f, *args, reps: int, rounds: int = 3) -> float:
    """Seconds per call of f(*args) (already compiled): reps back-to-back calls, best of rounds."""
    import jax
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def salvage(out: str, part: str) -> list[dict]:
    found = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if found:
        return found
    res: dict = {}
    for line in out.splitlines():
        if line.startswith("CEILINGS "):
            res.update(json.loads(line[9:]))
        elif line.startswith("ROW "):
            name, _, body = line[4:].partition(" ")
            res[name] = json.loads(body)
    if not any(isinstance(v, dict) for v in res.values()):
        return []
    res.setdefault("part", part)
    res["partial"] = True
    return [res]


def run_parts(parts: list[tuple[str, list[str], dict, int]], *, log_path: str, deadline_s: float = 0,
              ceiling_args=lambda first: []) -> list[dict]:
    """parts: (name, command, environment overrides, timeout in s). `ceiling_args(first_result)` gives
    the flags that pass the first part's measured ceilings to the later parts."""
    start = time.perf_counter()
    results: list[dict] = []
    with open(log_path, "w") as log:
        for name, cmd, env_extra, timeout in parts:
            if deadline_s:
                timeout = int(min(timeout, deadline_s - (time.perf_counter() - start)))
                if timeout < 10:
                    print(f"{name}: skipped (deadline)", flush=True)
                    continue
            if results:
                cmd = cmd + ceiling_args(results[0])
            env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
            t = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                out = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                out = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + \
                    f"\nTIMEOUT after {timeout} s"
            log.write(f"==== {name} ({time.perf_counter() - t:.0f} s): {' '.join(cmd)}\n{out}\n")
            log.flush()
            found = salvage(out, name)
            results += found
            state = "FAILED" if not found else "partial" if found[0].get("partial") else "ok"
            print(f"{name}: {state} in {time.perf_counter() - t:.0f} s", flush=True)
            if state != "ok":
                print("\n".join(out.strip().splitlines()[-8:]), flush=True)
    return results


def summarize_trace(trace_dir: str, out_dir: str) -> None:
    """Busy time per GPU stream and the idle gaps of the host->device copies, from a perfetto trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        print("trace: no perfetto_trace.json.gz written")
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
    print(f"trace: {len(events)} events; processes {procs}")
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
        print(f"trace {proc} / {thread}: {len(evs)} events, busy {busy / 1e3:.2f} ms of {span / 1e3:.2f} ms; top: {top}")
        print(f"   largest gaps (ms @ offset ms): " + ", ".join(f"{g / 1e3:.2f}@{(t - evs[0][0]) / 1e3:.1f}" for g, t in big))


class HostTwice:
    """A host path (`HostPath`) that computes each layer's host share twice: as the step asks, then, before it
    returns, the same number of other hosted experts for the same tokens, after `idle_s` of sleep. The step waits
    (the device holds for the answer, the link has landed this layer's copies), so the second call runs alone, its
    threads warm (idle_s 0) or woken again; other experts, so that it reads no weights the first left in the caches.
    `pairs`: (first, second) seconds a call. A benchmark's probe of why host calls run slower inside a step."""

    def __init__(self, host, store, idle_s: float):
        self.__dict__.update(_host=host, _store=store, idle_s=idle_s, pairs=[])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["_host"], name)

    def compute(self, layer, ids, idx_NK, weights_NK, h_ND):
        import numpy as np  # here: the parts' driver processes import this module without numpy's cost
        t = time.perf_counter()
        out = self._host.compute(layer, ids, idx_NK, weights_NK, h_ND)
        first = time.perf_counter() - t
        idx_NK = np.asarray(idx_NK)
        chosen = set(idx_NK.ravel().tolist())
        others = [int(e) for e in np.flatnonzero(self._store.hosted_mask(layer)) if e not in chosen][:len(ids)]
        if len(others) == len(ids) and ids:
            idx2 = idx_NK.copy()
            for a, b in zip(ids, others):
                idx2[idx_NK == a] = b
            if self.idle_s:
                time.sleep(self.idle_s)
            t = time.perf_counter()
            self._host.compute(layer, others, idx2, weights_NK, h_ND)
            self.pairs.append((first, time.perf_counter() - t))
        return out
