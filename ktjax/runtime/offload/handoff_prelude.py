"""A handoff layer's host work between its routing and its copies in fewer, compiled steps (`HandoffLayers.prelude`
"compiled"): the split of its chosen experts by path in one numba call, by the rule of `scheduler.split`, and the
fill's table of copies indexed from an array of every expert's sources, made once a layer
(`HandoffLayers.source_table`). The slots' ids (`slot_ids`) serve both preludes.

In the steps' GPU timelines (benchmarks/offload.md, runs 56-63) ~0.2 ms of a ~1.9 ms int4 layer at R1's share
passes between the routing's copy to the host and the layer's first copy: the protocol's waits take ~10 us of it and
the copies' driver calls ~25 us, the rest is Python (`moe_block.paths`, the ids staged, the table built from lists),
~20 us in a loop of its own on the dev box and several times that in a step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ktjax.runtime.offload.path_rates import PathRates

MODES = {"auto": 0, "cpu": 1, "gpu": 2}  # expert_compute, as `plan` takes it


@njit(nogil=True, cache=True)
def plan(counts_E, hosted_E, mode, per_link_s, per_token_s, call_s):
    """A layer's chosen experts (counts_E: the tokens each serves) by path, as `moe_block.paths` and `scheduler.split`
    give them: (the host CPU's, in the order it computes them; the device's slots: the experts on the device already,
    then the link's, both in id order; how many are on the device already). mode: `MODES`."""
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
    if mode == 1:  # every hosted expert, in id order
        k = n_hosted
    elif mode == 2:
        k = 0
    else:
        # The host CPU takes the k hosted experts with the fewest tokens (a stable order: ties keep the ids' order), k
        # the first that minimises the later of the two paths' finishing times.
        for a in range(1, n_hosted):  # insertion sort: stable, and a handful of experts
            j, moving = a, order[a]
            while j > 0 and counts_E[hosted[order[j - 1]]] > counts_E[hosted[moving]]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = moving
        k, best, cpu_s = 0, n_hosted * per_link_s, call_s
        for m in range(1, n_hosted + 1):
            cpu_s += per_token_s * counts_E[hosted[order[m - 1]]]
            finish = max(cpu_s, (n_hosted - m) * per_link_s)
            if finish < best:
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


def slot_ids(on_device, first: int, ids_2C: np.ndarray) -> None:
    """Write a handoff layer's slots' ids (on_device: the device's experts in slot order) into ids_2C: the fill's
    first `first` in its first row, the rest in its second, -1 elsewhere (`HandoffLayers.moe_layer`). Plain numpy:
    the default prelude pays no compile for it."""
    ids_2C[:] = -1
    ids_2C[0, :first] = on_device[:first]
    ids_2C[1, first:len(on_device)] = on_device[first:]


def rates_args(rates: PathRates, nbytes: int) -> tuple[float, float, float]:
    """(the link's seconds an expert, the host CPU's seconds an expert per token, its fixed cost a call) for `plan`,
    as `scheduler.split` takes them from `PathRates`."""
    return rates.link_seconds(nbytes), rates.cpu_token_seconds(nbytes), rates.cpu_call_s
