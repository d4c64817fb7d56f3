"""Which path computes each chosen host expert: the host CPU, where it lives, or the GPU after the
link carries it over. Both paths run at once and share host memory, so the cost model uses rates
measured while the other path runs, and splits each layer's host experts so that both finish
together.

The host kernels' time grows with the tokens an expert serves (they are compute-bound per token,
`benchmarks/host_experts.md`), the link's does not: experts with few tokens go to the CPU first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time

import jax
import numpy as np

MODES = ("auto", "gpu", "cpu")


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
        per_token = nbytes / (self.cpu_gbps * 1e9)
        finish = list(itertools.accumulate((per_token * int(t) for t in tokens), initial=self.cpu_call_s))
        finish[0] = 0.0  # no expert, no call
        return finish

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


def split(hosted: list[int], tokens: np.ndarray, nbytes: int, rates: PathRates, mode: str) -> tuple[list[int], list[int]]:
    """(experts for the host CPU, experts for the link) among a layer's chosen host experts.

    tokens[k]: how many tokens expert hosted[k] serves this step. mode: "cpu" or "gpu" send every
    expert one way; "auto" gives the CPU the k experts with the fewest tokens, k minimising the
    later of the two paths' finishing times."""
    if mode == "cpu" or not hosted:
        return list(hosted), []
    if mode == "gpu":
        return [], list(hosted)
    n, per_link = len(hosted), rates.link_seconds(nbytes)
    order = sorted(range(n), key=lambda j: int(tokens[j]))  # stable: ties keep the routing's order
    cpu_time = rates.cpu_finish_seconds(nbytes, [tokens[j] for j in order])
    k = min(range(n + 1), key=lambda k: max(cpu_time[k], (n - k) * per_link))  # the first best, as argmin
    chosen = [hosted[j] for j in order[:k]]
    on_cpu = set(chosen)
    return chosen, [e for e in hosted if e not in on_cpu]


# The link's idle time in a batch-1 layer beside its own transfers, which experts fetched early may fill: at R1's
# device share on the H200 an int4 layer took 3.4 ms between routings and its transfers ~1.85 (benchmarks/offload.md,
# runs 19-20): attention, routing, the round trip and the device's last programs.
LOOKAHEAD_WINDOW_S = 1.5e-3


def early_fetches(rates: PathRates | None, nbytes: int, cpu_tokens: np.ndarray, n_link: int, most: int) -> int:
    """How many of the next MoE layer's experts this layer may fetch early (`moe_block.Lookahead`), at most `most`:
    as many as the link carries in the time it would otherwise idle before the next layer's own transfers, the host
    CPU's lead over the link's share (cpu_tokens: the tokens of each expert the CPU computes; n_link: the experts
    the link carries) plus LOOKAHEAD_WINDOW_S. More would delay the next layer: its programs wait for them. Without
    rates (float experts, no host path), `most`."""
    if rates is None:
        return most
    t_cpu = rates.cpu_finish_seconds(nbytes, cpu_tokens)[-1]
    per_expert = rates.link_seconds(nbytes)
    room = max(0.0, t_cpu - n_link * per_expert) + LOOKAHEAD_WINDOW_S
    return min(most, int(room / per_expert + 1e-9))  # a whole number of experts, whatever the rounding


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
