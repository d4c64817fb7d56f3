"""Which path computes each chosen host expert: the host CPU, where it lives, or the GPU after the
link carries it over. Both paths run at once and share host memory, so the cost model uses rates
measured while the other path runs (`path_rates`), and splits each layer's host experts so that both
finish together.

The host kernels' time grows with the tokens an expert serves (they are compute-bound per token,
`benchmarks/host_experts.md`), the link's does not: experts with few tokens go to the CPU first.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ktjax.runtime.offload.path_rates import PathRates

MODES = ("auto", "gpu", "cpu")


def split(counts_E: np.ndarray, hosted_E: np.ndarray, nbytes: int, rates: PathRates | None,
          mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """A layer's chosen experts (counts_E: the tokens each serves this step) by path: (the host CPU's, in the order
    it computes them; the device's: those already there (not hosted_E), then the link's, both in id order; how many
    are already there). mode: "cpu" or "gpu" send every hosted expert one way; "auto" gives the CPU the k hosted
    experts with the fewest tokens, k minimising the later of the two paths' finishing times (rates: both paths',
    read only by "auto")."""
    per = (0.0,) * 3
    if mode == "auto":
        per = (rates.link_seconds(nbytes), rates.cpu_token_seconds(nbytes), float(rates.cpu_call_s))
    return _split(np.asarray(counts_E), np.asarray(hosted_E, np.bool_), MODES.index(mode), *per)


@njit(nogil=True, cache=True)
def _split(counts_E, hosted_E, mode, per_link_s, per_token_s, call_s):
    """`split` compiled: a decode step runs it per MoE layer (offload.md run 64: the handoff form's split took 0.03-0.04
    ms a layer on the H100 machine, against 0.06-0.09 in Python)."""
    E = counts_E.shape[0]
    resident, hosted = np.empty(E, np.int64), np.empty(E, np.int64)
    n_resident = n_hosted = 0
    for e in range(E):
        if counts_E[e] > 0:
            if hosted_E[e]:
                hosted[n_hosted] = e
                n_hosted += 1
            else:
                resident[n_resident] = e
                n_resident += 1
    order = np.arange(n_hosted)
    if mode == 2:  # "cpu": every hosted expert, in id order
        k = n_hosted
    elif mode == 1:  # "gpu"
        k = 0
    else:
        for a in range(1, n_hosted):  # insertion sort by tokens, stable (ties keep the ids' order): a handful
            j, moving = a, order[a]
            while j > 0 and counts_E[hosted[order[j - 1]]] > counts_E[hosted[moving]]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = moving
        k, best, cpu_s = 0, n_hosted * per_link_s, call_s  # the CPU's fixed cost once it has an expert
        for m in range(1, n_hosted + 1):
            cpu_s += per_token_s * counts_E[hosted[order[m - 1]]]
            finish = max(cpu_s, (n_hosted - m) * per_link_s)
            if finish < best:  # the first best
                k, best = m, finish
    on_cpu = np.zeros(n_hosted, np.bool_)
    cpu_ids = np.empty(k, np.int64)
    for m in range(k):
        on_cpu[order[m]] = True
        cpu_ids[m] = hosted[order[m]]
    on_device = np.empty(n_resident + n_hosted - k, np.int64)
    on_device[:n_resident] = resident[:n_resident]
    n = n_resident
    for m in range(n_hosted):
        if not on_cpu[m]:
            on_device[n] = hosted[m]
            n += 1
    return cpu_ids, on_device, n_resident


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
