"""Which path computes each chosen host expert: the host CPU, where it lives, or the GPU after the
link carries it over. Both paths run at once and share host memory, so the cost model uses rates
measured while the other path runs (`path_rates`), and splits each layer's host experts so that both
finish together.

The host kernels' time grows with the tokens an expert serves (they are compute-bound per token,
`benchmarks/host_experts.md`), the link's does not: experts with few tokens go to the CPU first.
"""

from __future__ import annotations

import numpy as np

from ktjax.runtime.offload.path_rates import PathRates

MODES = ("auto", "gpu", "cpu")


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
# The same in the handoff form (`handoff_step`), whose layer leaves the link less: in run 44 (H100, R1's share) 0.50 ms
# from the host's answer to the next layer's routing, then 0.29 ms of split and fill before its copies are queued.
HANDOFF_LOOKAHEAD_WINDOW_S = 0.8e-3


def early_fetches(rates: PathRates | None, nbytes: int, cpu_tokens: np.ndarray, n_link: int, most: int,
                  window_s: float = LOOKAHEAD_WINDOW_S) -> int:
    """How many of the next MoE layer's experts this layer may fetch early (`moe_block.Lookahead`), at most `most`:
    as many as the link carries in the time it would otherwise idle before the next layer's own transfers, the host
    CPU's lead over the link's share (cpu_tokens: the tokens of each expert the CPU computes; n_link: the experts
    the link carries) plus window_s, the decode form's own idle time. More would delay the next layer: its programs
    wait for them. Without rates (float experts, no host path), `most`."""
    if rates is None:
        return most
    t_cpu = rates.cpu_finish_seconds(nbytes, cpu_tokens)[-1]
    per_expert = rates.link_seconds(nbytes)
    room = max(0.0, t_cpu - n_link * per_expert) + window_s
    return min(most, int(room / per_expert + 1e-9))  # a whole number of experts, whatever the rounding
