"""How fast each path into host experts runs on this machine, both at once: the host CPU's kernels
(bytes per second per token, plus a fixed cost per call) and the link's copies. Measured where the model
runs (`measured_rates`, as `ktjax.load` does once per machine and format) and cached; the split between
the paths (`scheduler`) is made from them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from ktjax.runtime.offload.executor import OffloadedExecutor

ROUNDS = 3  # rounds of each kind of call in `measured_rates`


@dataclasses.dataclass(frozen=True)
class PathRates:
    """Bytes per second of each path into host experts, each measured while the other runs."""

    link_gbps: float  # pinned host -> device copies of whole experts
    cpu_gbps: float  # host kernels reading an expert's bytes, per token it serves
    cpu_call_s: float = 2e-4  # fixed cost of one host call (Python, quantities, result to the device)

    def cpu_finish_seconds(self, nbytes: int, tokens) -> list[float]:
        """[n + 1]: when the host CPU is done with its first k experts (k = 0 .. n; tokens[k]: the tokens of
        each, in the order it computes them), in one call: its fixed cost once there is an expert. Plain
        Python: a decode step runs this per MoE layer on a handful of experts, where numpy's calls cost more
        than the arithmetic."""
        per_token = self.cpu_token_seconds(nbytes)
        finish = list(itertools.accumulate((per_token * int(t) for t in tokens), initial=self.cpu_call_s))
        finish[0] = 0.0  # no expert, no call
        return finish

    def cpu_token_seconds(self, nbytes: int) -> float:
        """The host CPU's seconds for an expert of nbytes, per token it serves."""
        return nbytes / (self.cpu_gbps * 1e9)

    def link_seconds(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def max_cpu_tokens(self) -> int:
        """The most tokens per expert at which the host CPU beats the link for that expert."""
        return max(0, int(self.cpu_gbps / self.link_gbps))


def kernel_name(fmt: str, activations: str) -> str:
    """The host kernel's name, which keys its rates: the expert format, and the activations it multiplies."""
    return fmt + ("-int8-activations" if activations == "int8" else "")


# Measured on the H200 machine (16 Sapphire Rapids cores, PCIe gen5), both paths at once as `ktjax.load`
# measures them: the int8-activation kernels (AVX-512 VNNI for int4, F16C scales for int8) from DRAM on 14
# threads, with their fixed cost per call (benchmarks/offload.md, run 17); the float-activation ones from
# run 13, on experts its 300 MiB L3 may have held, so high. Used where no measurement is cached.
DEFAULT_RATES = {"int8": PathRates(link_gbps=45.5, cpu_gbps=46.8), "int4": PathRates(link_gbps=41.8, cpu_gbps=29.0),
                 "int8-int8-activations": PathRates(link_gbps=46.1, cpu_gbps=64.8, cpu_call_s=1.2e-4),
                 "int4-int8-activations": PathRates(link_gbps=41.4, cpu_gbps=53.9, cpu_call_s=1.3e-4)}


def _cache_file() -> str:
    root = os.environ.get("KTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ktjax")
    return os.path.join(root, "path_rates.json")


def _machine_key(fmt: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        cpu = "cpu"
    # The version of the method and of the host kernels: rates measured by an earlier one are measured
    # again (v1 read the same few experts again and again, from the CPU's caches; v2 measured the kernels
    # before int4 took AVX-512 VNNI and int8 rows converted their scales with F16C; v3 fitted one round of each kind
    # of call, by its mean call).
    return f"{cpu}|{os.cpu_count()}|{jax.devices()[0].device_kind}|{fmt}|v4"


def measure(cpu_call, link_call, nbytes_cpu: int, nbytes_link: int, seconds: float = 0.3) -> tuple[PathRates, float]:
    """Both paths at once for `seconds`: the link in a thread, the CPU here (each call moves or
    reads the given bytes). Returns the rates and the seconds one CPU call took (the median call: a call
    the link's thread or the OS held up does not count more than any other)."""
    stop, moved = threading.Event(), [0]

    def stream():
        while not stop.is_set():
            link_call()
            moved[0] += nbytes_link

    cpu_call()
    link_call()  # compile and warm up both
    th = threading.Thread(target=stream)
    th.start()
    t0, calls = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        cpu_call()
        calls.append(time.perf_counter() - t)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    per_call = float(np.median(calls))
    return PathRates(link_gbps=moved[0] / dt / 1e9, cpu_gbps=nbytes_cpu / per_call / 1e9), per_call


def median_round(rounds: list[tuple[PathRates, float]]) -> tuple[PathRates, float]:
    """Of several `measure` rounds of one kind of call, the one whose CPU call took the median time."""
    return sorted(rounds, key=lambda r: r[1])[len(rounds) // 2]


def fitted_rates(one: PathRates, one_call_s: float, many: PathRates, many_call_s: float, n: int,
                 nbytes: int) -> PathRates:
    """The CPU's rate and fixed cost per call from calls of 1 and of n experts (t = call + n * bytes / rate),
    the link's rate as the mean of both measurements. Where noise makes the larger call no slower, the
    larger call's rate with the default fixed cost."""
    link = (one.link_gbps + many.link_gbps) / 2
    per_expert_s = (many_call_s - one_call_s) / (n - 1)
    if per_expert_s <= 0:
        return PathRates(link_gbps=link, cpu_gbps=many.cpu_gbps)
    call_s = min(max(0.0, one_call_s - per_expert_s), one_call_s)
    return PathRates(link_gbps=link, cpu_gbps=nbytes / per_expert_s / 1e9, cpu_call_s=call_s)


def _cached() -> dict:
    try:
        with open(_cache_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def known_rates(fmt: str) -> PathRates | None:
    """The rates measured on this machine for this format by an earlier load, if any."""
    known = _cached().get(_machine_key(fmt))
    return None if known is None else PathRates(**known)


def cached_rates(fmt: str, measure_fn) -> PathRates:
    """The rates measured on this machine for this format, measuring (and caching) them once."""
    key, file = _machine_key(fmt), _cache_file()
    known = _cached()
    if key in known:
        return PathRates(**known[key])
    rates = measure_fn()
    known[key] = dataclasses.asdict(rates)
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "w") as f:
            json.dump(known, f, indent=1)
    except OSError:  # a read-only home: measure again next time
        pass
    return rates


def measured_rates(ex: OffloadedExecutor, experts_per_call: int = 3, seconds: float = 0.3) -> PathRates:
    """Both paths into host experts at once, as decode steps use them: the host kernels on one, then
    on a few experts per call (which separates the call's fixed cost from its rate), the link
    streaming other experts meanwhile. Each call takes experts the previous calls did not: reading
    the same few again would measure the CPU's caches (a full-size int4 expert is 27.5 MB, three of
    them fit a server's L3), where a step's experts come from DRAM."""
    by_layer: dict[int, list[int]] = {}
    for i, e in sorted(ex.plan.host_experts):
        by_layer.setdefault(i, []).append(e)
    layer, hosted = max(by_layer.items(), key=lambda kv: len(kv[1]))
    n = max(1, min(experts_per_call, len(hosted) // 2))
    half = max(n, len(hosted) // 2)
    cpu_pool, link_pool = hosted[:half], hosted[half:] or hosted[:half]
    h = np.zeros((1, ex.config.hidden_size), np.float32)
    nbytes = ex.plan.expert_bytes

    def rotating(pool: list[int], k: int):
        groups = [pool[j:j + k] for j in range(0, len(pool) - k + 1, k)]
        return itertools.cycle(groups)

    def run(k: int, seconds: float) -> tuple[PathRates, float]:
        cpu_groups, link_groups = rotating(cpu_pool, k), rotating(link_pool, n)
        weights = np.full((1, k), 1.0 / k, np.float32)

        def cpu_call():
            ids = next(cpu_groups)
            ex.host.compute(layer, ids, np.asarray([ids], np.int64), weights, h)

        def link_call():
            ids = next(link_groups)
            jax.block_until_ready(jax.device_put([ex.store.experts[layer][e] for e in ids], ex.store.on_device))

        return measure(cpu_call, link_call, k * nbytes, n * nbytes, seconds)

    # Rounds of each kind, alternating, and the median of each kind: one round of each scattered the fit on the
    # H100 machine (CPU 24.8-68.4 GB/s, 0-0.68 ms per call; benchmarks/offload.md, runs 23-24).
    rounds = {1: [], n: []}
    for _ in range(ROUNDS):
        for k in rounds if n > 1 else (n,):
            rounds[k].append(run(k, seconds / ROUNDS))
    many, many_call_s = median_round(rounds[n])
    if n == 1:
        return many
    one, one_call_s = median_round(rounds[1])
    return fitted_rates(one, one_call_s, many, many_call_s, n, nbytes)
