"""Run a benchmark's parts, each in its own process (the GPU budget is a process-wide allocator
setting), under a deadline; keep what a part printed even when it ran out of time. Also the
benchmarks' shared timer (`best_of`).

A part prints `CEILINGS {json}` and `ROW name {json}` lines as it goes and `RESULT {json}` at the end.
A part cut off by its timeout still contributes its ceilings and finished rows, marked partial.
"""

from __future__ import annotations

import json
import os
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
