"""What a fused layer's device program (`moe_device`) costs the thread that calls it. In a step that call took
0.46-0.69 ms on the H100 machine (offload.md, runs 40-41), whoever made it, against ~14 us for a program of the same
arguments on the dev box's CPU backend: the time is in the GPU's execution path, not in Python. This times the call
(the device idle before each, so no queue hides it) and the call with its wait, for the program as `fused_moe` calls
it and with one thing changed at a time:

- as a step calls it: 2 resident experts and 2 just fetched, padded to 4 slots; ids and rows as numpy arrays;
- the ids and rows already device arrays (each numpy argument is a transfer of its own), or in pinned buffers the
  program reads in place (the executor's `indices_in_place`);
- the 2 link experts still in pinned host memory, moved by the program (`fused_copies` "in_program");
- XLA's CUDA graphs off for this program (`xla_gpu_enable_command_buffer` empty);
- the same arguments to a program that only returns a slice of h (the call's cost without the experts' kernels).

    python3 scripts/probe_device_share_call.py [--tiny] [--reps 40]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_layer import decode_layer, probe_args  # noqa: E402


def main() -> None:
    args = probe_args(__doc__, 40)

    import jax
    import jax.numpy as jnp

    from ktjax.runtime.model import StepStats
    from ktjax.runtime.offload.moe_block import padded, padded_apart
    from ktjax.runtime.offload.streaming import capacity_for

    layer = decode_layer(args.tiny)
    cfg, ex, i, seg, state = layer.cfg, layer.ex, layer.i, layer.seg, layer.state
    store, K, E = ex.store, layer.cfg.num_experts_per_tok, layer.cfg.n_routed_experts
    resident = [e for e in range(E) if not store.is_hosted(i, e)][:2]
    link = [e for e in range(E) if store.is_hosted(i, e)][:2]
    stats = StepStats()
    resident_w = tuple(store.fetch(i, resident, stats))
    landed = tuple(store.fetch(i, link, stats, move="program"))
    pinned = tuple(store.fetch(i, link, stats, move="none"))
    ids_C, slots = padded(resident + link, resident_w + landed)
    ids_in, slots_in = padded_apart(resident, resident_w, link, pinned, store.device_pad)
    h_ND = jnp.asarray(np.random.default_rng(0).standard_normal((1, cfg.hidden_size)), jnp.bfloat16)
    w_NK = jnp.full((1, K), 1.0 / K, jnp.float32)
    idx_NK = jnp.asarray([(resident + link + list(range(E)))[:K]], jnp.int32)
    rows_A = np.zeros(1, np.int32)
    capacity = capacity_for(1, np.ones(len(ids_C)))
    no_graphs = jax.jit(seg.moe_device.__wrapped__, static_argnames="capacity",
                        compiler_options={"xla_gpu_enable_command_buffer": ""}) if jax.default_backend() == "gpu" \
        else seg.moe_device
    trivial = jax.jit(lambda state, h_ND, w_NK, idx_NK, rows_A, ids_C, experts, capacity: h_ND[:, :1],
                      static_argnames="capacity")
    on_device = (jnp.asarray(rows_A), jnp.asarray(ids_C))
    in_place = (ex.index_landing.put(rows_A), ex.index_landing.put(ids_C))  # written once: no step between calls
    forms = {
        "as a step calls it": lambda: seg.moe_device(state, h_ND, w_NK, idx_NK, rows_A, ids_C, slots,
                                                      capacity=capacity),
        "ids and rows on the device": lambda: seg.moe_device(state, h_ND, w_NK, idx_NK, *on_device, slots,
                                                              capacity=capacity),
        "ids and rows in pinned buffers": lambda: seg.moe_device(state, h_ND, w_NK, idx_NK, *in_place, slots,
                                                                  capacity=capacity),
        "2 experts moved by the program": lambda: seg.moe_device(state, h_ND, w_NK, idx_NK, rows_A, ids_in, slots_in,
                                                                  capacity=capacity),
        "CUDA graphs off": lambda: no_graphs(state, h_ND, w_NK, idx_NK, rows_A, ids_C, slots, capacity=capacity),
        "a trivial program, the same arguments": lambda: trivial(state, h_ND, w_NK, idx_NK, rows_A, ids_C, slots,
                                                                  capacity=capacity),
    }
    print(f"{jax.devices()[0].device_kind}, {'tiny' if args.tiny else 'full-size'} layer, {args.reps} calls each")
    for form in forms.values():
        jax.block_until_ready(form())  # compiled
    calls = {name: [] for name in forms}
    done = {name: [] for name in forms}
    for _ in range(args.reps):  # the forms in turn, the device idle before each call
        for name, form in forms.items():
            t = time.perf_counter()
            out = form()
            calls[name].append(time.perf_counter() - t)
            jax.block_until_ready(out)
            done[name].append(time.perf_counter() - t)
    for name in forms:
        print(f"  {name:40s} call median {np.median(calls[name]) * 1e6:6.0f} us, with its wait "
              f"{np.median(done[name]) * 1e6:6.0f} us", flush=True)
    want = np.asarray(forms["as a step calls it"]()[1])
    worst = max(float(np.abs(np.asarray(forms[n]()[1]) - want).max()) for n in list(forms)[1:5])
    print(f"  the forms' routed sums agree: max |difference| {worst:.3g} (scale {np.abs(want).max():.3g})")


if __name__ == "__main__":
    main()
