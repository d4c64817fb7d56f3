"""One MoE layer ready for a batch-1 decode step, shared by the decode probes (`probe_dispatch.py`,
`probe_share_callback.py`, `probe_kernel_census.py`, `probe_layer_program.py`): DeepSeek-V3's sizes with random
weights (`fullsize.random_offloaded_model`), int4 routed experts, an 8 GiB plan (most experts in host memory), a cache
of 1040 positions and one token embedded at position 1024; small shapes with --tiny, to check a probe on a CPU."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np


@dataclasses.dataclass
class DecodeLayer:
    cfg: object
    ex: object  # the OffloadedExecutor
    i: int  # the MoE layer
    seg: object  # its LayerSegments
    state: dict
    j: object  # its index in its cache stack
    latent_rp: list  # the cache stacks, replaced by each call that donates them
    x_BTD: object
    rope: tuple
    start_B: object
    shared_ND: object  # zeros: the shared expert's term [1, D]
    routed_ND: object  # zeros: the routed experts' f32 sum [1, D]

    def terms(self, host_ND=None):
        """The previous MoE layer's terms as the layer's attention program takes them (`segments.Unsummed`): x, zero
        shared and routed sums (made once), and host_ND as the host share (default: the zeros a layer without one
        passes). Nothing is dispatched: a timed call may build them."""
        from ktjax.runtime.offload.segments import Unsummed
        host_ND = self.ex.host.landing.zeros(self.shared_ND.shape) if host_ND is None else host_ND
        return Unsummed(self.x_BTD, self.shared_ND, self.routed_ND, host_ND)

    def fused_steps(self, x, layers: int, link_ids, device_share, host_share, worker, stats):
        """`layers` layers as `moe_block.fused_moe` drives one, from x: the attention program's call, the routing
        waited for, the link experts' copies as a program, device_share(h, landing) on the worker, host_share(h) here
        into a pinned buffer; returns the last layer's terms."""
        from ktjax.runtime.offload.segments import Unsummed
        ex, seg, i = self.ex, self.seg, self.i
        for _ in range(layers):
            x_BTD, routing = self.call(seg.attention_route, x)[:2]
            routing.start_copies(host_inputs=True)
            routing.ids_on_host()
            landing = ex.store.fetch(i, link_ids, stats, move="program") if link_ids else ()
            job = worker.submit(device_share, routing.h_ND, landing)
            _, h_host = routing.inputs_on_host()
            share = ex.host.landing.put(host_share(h_host))
            x = Unsummed(x_BTD, *job.result(), share)
        return x

    def call(self, program, x, state=None):
        """program(state, x, rope, start, latent, rp, j) as a step calls the layer's attention programs: the cache
        stacks donated, the new ones kept for the next call."""
        out = program(self.state if state is None else state, x, self.rope, self.start_B, *self.latent_rp, self.j)
        self.latent_rp[:] = out[-2:]
        return out


def probe_args(doc: str, reps: int, **more) -> argparse.Namespace:
    """--tiny and --reps (and `more`: name -> add_argument keywords) for a probe whose docstring is doc."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    p.add_argument("--reps", type=int, default=reps)
    for name, kw in more.items():
        p.add_argument(name, **kw)
    return p.parse_args()


def decode_layer(tiny: bool) -> DecodeLayer:
    import jax.numpy as jnp
    from bench_offload import TINY_HOST_RULES, tiny_config
    from fullsize import fullsize_config, plan_for, random_offloaded_model

    from ktjax.runtime.offload.segments import embed_segment

    cfg = tiny_config(1) if tiny else fullsize_config(1)
    plan = plan_for(cfg, jnp.bfloat16, experts="int4", gpu_memory="8GiB", max_batch=1, max_context=1280,
                    rules=TINY_HOST_RULES if tiny else None)
    ex = random_offloaded_model(cfg, plan, jnp.bfloat16, progress=lambda *_: None)
    i = cfg.moe_layers[0]
    kind = cfg.layer_kinds[i]
    x_BTD, rope, start_B = embed_segment(cfg, ex.top["embed_tokens"], np.array([[7]], np.int32),
                                         np.array([1024], np.int32))
    return DecodeLayer(cfg, ex, i, ex.segments[kind], ex.layers[i], jnp.int32(cfg.stack_index(i)),
                       list(ex.init_cache(1, 1040).groups[kind]), x_BTD, rope, start_B,
                       jnp.zeros((1, cfg.hidden_size), jnp.bfloat16), jnp.zeros((1, cfg.hidden_size), jnp.float32))
