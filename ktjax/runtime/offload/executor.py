"""The offloaded executor: core parameters on the device, routed experts apart (on the device, or in
pinned host memory), one segment per layer phase scheduled from Python.

Each MoE layer's chosen experts (`moe_block`) take one of three paths: resident on the device (no transfer), streamed
over the link and computed on the GPU, or, for int8/int4 experts, computed on the host CPU where they live
(`HostPath`); `scheduler.split` divides a step's host experts between the last two so both finish together. A GPU's
decode steps of up to 4 rows launch every layer at once (`handoff_step`). Prefill streams whole layers.

Over several devices (a mesh with an `expert` axis, `ktjax.runtime.mesh`), the core parameters and the cache are
replicated and every segment runs on every device; each device streams and computes the chosen experts it owns from
its own `ExpertStore` (its resident experts, and its host experts in pinned memory behind it), and one program sums
the devices' shares (an all-reduce).
"""

from __future__ import annotations

import copy
import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.config import ModelConfig
from ktjax.experts.host import check_activations
from ktjax.experts.weights import ExpertWeights
from ktjax.lora.merge import merge_layers
from ktjax.models import KVCache, LayerCache, layer_structure
from ktjax.runtime.model import Sampling, StepStats
from ktjax.runtime.offload.handoff_step import HandoffLayers, handoff_forward, applies as handoff_applies
from ktjax.runtime.offload.host_path import HostPath, ShareLanding
from ktjax.runtime.offload.path_rates import DEFAULT_RATES, PathRates, kernel_name, measured_rates
from ktjax.runtime.offload.scheduler import MODES
from ktjax.runtime.offload.devices import owned_by
from ktjax.runtime.offload.moe_block import Lookahead, moe_block
from ktjax.runtime.offload.segments import (FUSED_MAX_TOKENS, LayerSegments, Segments, embed_segment, head_segment,
                                            logits_segment, settled)
from ktjax.runtime.offload.streaming import ExpertStore, Prefetch
from ktjax.runtime.offload.warm_up import compile_fused, compile_streamed
from ktjax.runtime.mesh import replicated
from ktjax.runtime.placement import QUERY_CHUNK, PlacementPlan
from ktjax.train.offloaded import OffloadedTrainer


DECODE_FORMS = ("auto", "fused", "streamed", "handoff")
FUSED_COPIES = ("program", "in_program", "in_program_here", "put")  # `OffloadedExecutor.fused_copies`, default first


class OffloadedExecutor:
    """top: embed_tokens, norm, lm_head (None when tied); layers: one plain dict of arrays per
    decoder layer (MoE layers without their routed experts); experts: {layer: [ExpertWeights]}.
    expert_compute: "auto" | "gpu" | "cpu" (where host experts are computed; `scheduler`).
    host_activations: "float32" | "int8": what the host CPU multiplies int8/int4 experts by (`HostExperts`).
    decode_form: how decode-sized batches with at most `moe_block.FUSED_MAX_EXPERTS` chosen experts per layer
    run them: "fused" (their transfers start, the host CPU computes its share meanwhile, then one
    program computes the rest: the shared expert, the device's experts and the combine),
    "streamed" (a program per streamed expert as it lands, dispatched by a worker thread beside the
    host CPU's kernels), "handoff": a decode step of up to 4 rows launched whole, each MoE layer's program waiting
    on its stream for the host's copies and share (`handoff_step`; other steps as "auto" takes them), or "auto":
    on a GPU "handoff" for steps of up to 4 rows (`handoff_step.applies` says why), else fused for int4 experts,
    streamed for the others (measured at batch 1 on the H200, offload.md run 10: int4 18.4 against 20.6 ms, int8
    24.7 against 22.4 ms). mesh: the
    expert mesh the core arrays are replicated over and the experts split over (None: one device);
    experts then live on (or behind) their owner's device. lookahead: in decode steps on one device, how many
    of the next MoE layer's likely host experts each MoE layer fetches early (`moe_block.Lookahead`; 0: none).
    resident_apart: in the fused form, a layer's resident experts in a program of their own (`moe_device`),
    which need not wait for the streamed ones, and those added by `moe_landed` once they have landed.
    Both off by default until measured on the GPU (`scripts/bench_offload.py --lookahead`,
    `scripts/bench_decode_variants.py --rules current apart lookahead`): offload runs 19-20 could not separate
    `resident_apart` from the host CPU's slower speed in those runs, and on the CPU backend it is slower (XLA's
    path computes each program's padded slots)."""

    def __init__(self, config: ModelConfig, plan: PlacementPlan, dtype, top: dict, layers: list[dict],
                 experts: dict[int, list[ExpertWeights]], *, attention: str = "auto", expert_compute: str = "auto",
                 rates: PathRates | None = None, decode_form: str = "auto",
                 mesh: jax.sharding.Mesh | None = None, host_activations: str = "int8", lookahead: int = 0,
                 resident_apart: bool = False):
        if decode_form not in DECODE_FORMS:
            raise ValueError(f"decode_form={decode_form!r}: use one of {', '.join(DECODE_FORMS)}")
        if expert_compute not in MODES:
            raise ValueError(f"expert_compute={expert_compute!r}: use one of {', '.join(MODES)}")
        fmt = plan.expert_format
        if expert_compute == "cpu" and not fmt.host_computable:
            raise ValueError(f"expert_compute='cpu' needs int8 or int4 experts, not {fmt.name} "
                             "(load with experts='int8' or 'int4')")
        self.config, self.plan, self.attention = config, plan, attention
        self._dtype = jnp.dtype(dtype)
        self.top, self.layers = top, layers
        self.mesh = mesh
        self.segments = {k: LayerSegments(layer_structure(config, k, dtype, attention=attention, with_experts=False)[0],
                                          config, routing_to_host=mesh is None) for k in set(config.layer_kinds)}
        self.devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
        self.stores = [ExpertStore(config, plan, owned_by(experts, plan, d), device, d)
                       for d, device in enumerate(self.devices)]
        self.store = self.stores[0]
        self.expert_compute = expert_compute
        self.host_activations = check_activations(host_activations)
        # The host-CPU path serves one device: over several, host experts stream to their owner.
        with_host = fmt.host_computable and plan.host_experts and expert_compute != "gpu" and mesh is None
        hosted = {(i, e): self.store.experts[i][e] for i, e in plan.host_experts} if with_host else {}
        self.host = (HostPath(fmt, hosted, activations=host_activations, landing=self.store.on_host) if with_host
                     else None)
        # While the host kernels run on the calling thread (they release the GIL), one worker thread
        # dispatches the layer's GPU work.
        self.dispatcher = ThreadPoolExecutor(1, thread_name_prefix="ktjax-gpu-dispatch") if self.host else None
        self.device_threads = None if mesh is None else ThreadPoolExecutor(len(self.devices),
                                                                           thread_name_prefix="ktjax-device")
        self.rates = rates or DEFAULT_RATES.get(kernel_name(fmt.name, host_activations))
        self.decode_form = decode_form
        self.lookahead = lookahead
        self.resident_apart = resident_apart
        # How a fused layer's host experts reach the device: "program", by a program of their own called before the
        # device's; "in_program", by the device's own program, which takes their pinned arrays, dispatched by the
        # worker beside the host kernels; "in_program_here", the same called by this thread before the host kernels;
        # "put", by `jax.device_put`. The in_program forms took a probe's layer 11-17% sooner but a step's no sooner,
        # their programs' call 0.5-0.7 ms of a thread (offload.md, runs 35-41; bench_offload.py --r1-variants).
        self.fused_copies = FUSED_COPIES[0]
        # A fused layer's expert ids and rows handed to its device program in pinned buffers it reads in place
        # (`host_path.ShareLanding`), not as numpy arrays, each of which that program's call moves: off until
        # measured on the GPU (scripts/probe_device_share_call.py, bench_offload --r1-variants indices-in-place).
        self.indices_in_place = False
        self.watcher: ThreadPoolExecutor | None = None  # `with_watcher`: a diagnostic of the steps' timelines
        self._stack_index = [jnp.int32(config.stack_index(i)) for i in range(config.num_hidden_layers)]
        self._zeros: dict[tuple, jax.Array] = {}

    @functools.cached_property
    def index_landing(self) -> ShareLanding:  # where `indices_in_place` puts a fused layer's ids and rows
        """Made the first time it is used, not at every load."""
        return ShareLanding(self.store.on_host)

    @functools.cached_property
    def handoff_layers(self) -> HandoffLayers:  # made the first time a step takes the handoff form
        return HandoffLayers(self)

    @property
    def dtype(self):
        return self._dtype

    @property
    def fuses_decode(self) -> bool:
        if self.decode_form in ("auto", "handoff"):  # handoff's other steps (batches, prefill) as auto's
            return self.plan.expert_format.name == "int4"
        return self.decode_form == "fused"

    @property
    def head_weight(self) -> jax.Array:
        return self.top["embed_tokens"] if self.top.get("lm_head") is None else self.top["lm_head"]

    # ---- the executor protocol -------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cache = KVCache.zeros(self.config, batch, max_len, self._dtype)
        return cache if self.mesh is None else jax.device_put(cache, replicated(self.mesh))

    def prefill(self, cache, tokens_BT, lengths_B, key, sampling: Sampling, *, profile: bool = False):
        """The whole (padded) prompt layer by layer, so each layer's experts stream once."""
        lengths_B = np.asarray(lengths_B, np.int32)
        # Padding (after each row's prompt) routes to no expert: it moves none and sets no capacity.
        active_BT = np.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]
        return self.extend(cache, tokens_BT, np.zeros(len(lengths_B), np.int32), lengths_B - 1, active_BT, key,
                           sampling, profile=profile)

    def extend(self, cache, tokens_BT, start_B, last_B, active_BT, key, sampling: Sampling, *,
               profile: bool = False):
        """One layer pass over rows of different kinds: row b's tokens go to positions start_B[b] + t, its
        active ones (host bools [B, T]) choose experts, and it samples at column last_B[b]. A serving batch
        uses it to prefill new prompts and advance the decoding rows (their one token in column 0) at
        once, so every host expert streams once for both. Each row's positions start_B[b] .. + T - 1 must
        lie in the cache (the writes of inactive columns are garbage that later steps overwrite before
        reading). Returns (token_B, cache, stats)."""
        stats = StepStats()
        run = Segments(stats, profile, self.watcher)
        x_BTD, cache = self.forward(cache, tokens_BT, np.asarray(start_B, np.int32), stats, run, active=active_BT)
        token_B = run("head", head_segment, self.top["norm"], self.head_weight, self.config.rms_norm_eps, x_BTD,
                      np.asarray(last_B, np.int32), key, sampling)
        return token_B, cache, stats.finish()

    def prefill_steps(self, cache, tokens_BT, lengths_B, key, sampling: Sampling, *, profile: bool = False):
        """`prefill` as one step (a generator that never yields): the prompt is not run in chunks
        here, because this prefill streams each layer's host experts once for the whole prompt, and
        chunking it would stream them all again for every chunk (what bounds an offloaded prefill's
        stall on a serving batch's decode steps is fusing the decode rows into its layer pass, not
        built). Returns (token_B, cache, stats)."""
        yield from ()
        return self.prefill(cache, tokens_BT, lengths_B, key, sampling, profile=profile)

    def decode(self, cache, token_B, pos_B, key, sampling: Sampling, *, profile: bool = False,
               active_B: np.ndarray | None = None):
        """active_B (host bools, optional): the rows whose tokens matter. Only their experts are
        moved and computed; other rows' outputs are garbage (a serving batch's free slots)."""
        # No eager jnp work here: each would be a separate dispatch (~0.1-0.5 ms) on the step's path.
        stats = StepStats()
        run = Segments(stats, profile, self.watcher)
        x_BTD, cache = self.forward(cache, token_B, pos_B, stats, run, active=active_B)
        token_B = run("head", head_segment, self.top["norm"], self.head_weight, self.config.rms_norm_eps, x_BTD,
                      np.zeros(np.shape(token_B)[0], np.int32), key, sampling)
        return token_B, cache, stats.finish()

    def logits(self, tokens_BT) -> jax.Array:
        B, T = np.shape(tokens_BT)
        return self.chunk_logits(self.init_cache(B, T), tokens_BT, np.zeros((B,), np.int32))[0]

    def chunk_logits(self, cache, tokens_BT, start_B):
        stats = StepStats()
        x_BTD, cache = self.forward(cache, np.asarray(tokens_BT, np.int32), np.asarray(start_B, np.int32), stats,
                                    Segments(stats, False))
        return logits_segment(self.top["norm"], self.head_weight, self.config.rms_norm_eps, x_BTD), cache

    def trainer(self, lora, sites, train_config) -> OffloadedTrainer:
        if self.mesh is not None:  # its backward streams experts through one device's store
            raise ValueError(f"fine-tuning with routed experts in host memory runs on one device; this model splits "
                             f"them over {len(self.devices)} (load it without devices= or mesh=)")
        return OffloadedTrainer(self, lora, sites, train_config)

    def measure_rates(self, experts_per_call: int = 3, seconds: float = 0.3) -> PathRates:
        """Both paths into this model's host experts at once, as decode steps use them (`path_rates.measured_rates`)."""
        return measured_rates(self, experts_per_call, seconds)

    def _with(self, **attrs) -> OffloadedExecutor:
        """A shallow copy with attrs replaced: the `with_*` settings share the weights, segments and threads."""
        out = copy.copy(self)
        out.__dict__.update(attrs)
        return out

    def with_host_threads(self, threads: int | None) -> OffloadedExecutor:
        """This model running its host kernels on `threads` threads (None: every core)."""
        out = copy.copy(self)
        if self.host is not None:
            out.host = copy.copy(self.host)
            out.host.threads = threads
        return out

    def with_decode_form(self, form: str) -> OffloadedExecutor:
        if form not in DECODE_FORMS:
            raise ValueError(f"decode_form={form!r}: use one of {', '.join(DECODE_FORMS)}")
        return self._with(decode_form=form)

    def with_host_activations(self, activations: str) -> OffloadedExecutor:
        """This model with its host CPU multiplying int8/int4 experts by activations in another form
        ("float32" or "int8"); the experts are shared."""
        return self._with(host_activations=check_activations(activations),
                          host=self.host and self.host.with_activations(activations))

    def with_lookahead(self, experts: int) -> OffloadedExecutor:
        """This model fetching that many of the next MoE layer's likely experts a layer early
        (`moe_block.Lookahead`)."""
        if experts < 0:
            raise ValueError(f"lookahead={experts}: the number of experts fetched early, 0 or more")
        return self._with(lookahead=experts)

    def with_resident_apart(self, apart: bool) -> OffloadedExecutor:
        """This model computing a fused layer's resident experts apart from the streamed ones (`resident_apart`)."""
        return self._with(resident_apart=bool(apart))

    def with_fused_copies(self, how: str) -> OffloadedExecutor:
        """This model moving a fused layer's host experts to the device `how` (`fused_copies`)."""
        if how not in FUSED_COPIES:
            raise ValueError(f"fused_copies={how!r}: one of {', '.join(FUSED_COPIES)}")
        return self._with(fused_copies=how)

    def with_indices_in_place(self, on: bool) -> OffloadedExecutor:
        """This model handing a fused layer's expert ids and rows to its program in place (`indices_in_place`)."""
        return self._with(indices_in_place=bool(on))

    def with_watcher(self, on: bool) -> OffloadedExecutor:
        """This model recording in each step's timeline (`StepStats.timeline`) when a fused layer's transfers land
        and its device share is computed, waited for on threads of their own (`Segments.watch`): a diagnostic."""
        return self._with(watcher=ThreadPoolExecutor(2, thread_name_prefix="ktjax-watch") if on else None)

    def with_rates(self, rates: PathRates) -> OffloadedExecutor:
        return self._with(rates=rates)

    def with_placement(self, plan: PlacementPlan) -> OffloadedExecutor:
        """This model with its experts moved where another plan (same format) puts them: experts
        leaving the device go to host memory first, so device memory never holds both sets."""
        if self.mesh is not None:
            raise ValueError("moving experts between device and host memory (hot_experts) is single-device for now")
        old = self.plan
        leaving = sorted(old.device_experts & plan.host_experts)
        arriving = sorted(old.host_experts & plan.device_experts)
        experts = {i: list(slots) for i, slots in self.store.experts.items()}
        for i, e in leaving:
            experts[i][e] = jax.block_until_ready(jax.device_put(experts[i][e], self.store.on_host))
        for i, e in arriving:
            experts[i][e] = jax.block_until_ready(jax.device_put(experts[i][e], self.store.on_device))
        return OffloadedExecutor(self.config, plan, self._dtype, self.top, self.layers, experts,
                                 attention=self.attention, expert_compute=self.expert_compute, rates=self.rates,
                                 decode_form=self.decode_form, host_activations=self.host_activations,
                                 lookahead=self.lookahead, resident_apart=self.resident_apart
                                 )._with(fused_copies=self.fused_copies, indices_in_place=self.indices_in_place)

    def with_expert_compute(self, mode: str) -> OffloadedExecutor:
        """This model computing host experts on another path ("auto", "gpu", "cpu"); the experts are shared."""
        if mode not in MODES or (mode != "gpu" and self.host is None and self.plan.offloaded
                                 and self.plan.expert_format.host_computable):
            raise ValueError(f"expert_compute={mode!r}: use one of {', '.join(MODES)} (the model was loaded with "
                             f"expert_compute={self.expert_compute!r})")
        return self._with(expert_compute=mode)

    def with_adapter(self, adapters, lcfg, *, merge: bool | None = None) -> OffloadedExecutor:
        """This model with a LoRA adapter merged into its core weights (the experts are shared)."""
        if merge is False:
            raise ValueError("an offloaded model takes adapters merged only (merge=True or None)")
        return self._with(layers=merge_layers(self.config, self.layers, adapters, lcfg))

    def compile_decode(self, batch: int) -> int:
        """Run every program variant a decode step of `batch` rows may meet by its routing (`warm_up`'s fused and
        streamed programs), so a server's streams never wait for one to compile; none in the handoff form, whose
        one program per size does not vary with the routing (the step's first call compiles it)."""
        if handoff_applies(self, np.zeros((batch, 1), np.int32), Segments(StepStats(), False)):
            return 0
        return compile_fused(self, batch) + compile_streamed(self, batch)

    def zeros(self, shape) -> jax.Array:
        """Device f32 zeros [N, D] standing for an absent term of a decode-sized MoE layer's output
        (`segments.Unsummed`), cached per shape (made anew, they would cost a transfer on the step's path),
        with the sharding of the terms they stand for, so the next program does not compile apart for them."""
        if shape not in self._zeros:
            self._zeros[shape] = jax.device_put(np.zeros(shape, np.float32), self.store.on_device)
        return self._zeros[shape]

    def no_host_share(self, shape):
        """What stands for the host CPU's term of a decode-sized MoE layer (`segments.Unsummed`) that had no
        experts there: zeros of the kind its share comes as, so the next program compiles once. Where the host
        CPU may compute (in any `expert_compute` mode: a server may switch), its share lands in pinned host memory
        (`host_path.ShareLanding`), and so do these."""
        if self.host is not None:
            return self.host.landing.zeros(shape)
        return self.zeros(shape)

    # ---- the forward pass ------------------------------------------------------------------
    def forward(self, cache: KVCache, tokens_BT, start_B, stats: StepStats, run: Segments, *,
                active: np.ndarray | None = None):
        """Hidden states after the last layer for a chunk at positions start[b] + t (`segments.Unsummed`
        when that is a MoE layer on one device: the head sums them); updates the cache.
        active (host bools, [B] or [B, T]): the tokens whose routed experts count (None: all); the
        others get none (their outputs are garbage: padding, a serving batch's free slots)."""
        cfg = self.config
        active_N = None
        if active is not None:
            B, T = np.shape(tokens_BT)[0], (np.shape(tokens_BT)[1] if np.ndim(tokens_BT) == 2 else 1)
            active_N = np.broadcast_to(np.asarray(active, bool).reshape(B, -1), (B, T)).reshape(-1)
            if active_N.all() or not active_N.any():
                active_N = None
        if handoff_applies(self, tokens_BT, run):
            return handoff_forward(self, cache, tokens_BT, start_B, stats, run, active_N)
        # Token ids and positions may be host arrays; they cross to the device once, here.
        x_BTD, rope, start_B = run("embed", embed_segment, cfg, self.top["embed_tokens"], tokens_BT, start_B)
        short = x_BTD.shape[1] <= QUERY_CHUNK  # attention and what follows fit one segment
        groups = dict(cache.groups)
        # Per device: the next MoE layer's first chunk of its experts, fetched ahead.
        prefetched: list[list[Prefetch]] = [[] for _ in self.stores]
        lookahead = self._lookahead(x_BTD.shape[0] * x_BTD.shape[1])
        for i, kind in enumerate(cfg.layer_kinds):
            seg, state, j = self.segments[kind], self.layers[i], self._stack_index[i]
            latent, rp = groups[kind]
            if kind == "dense" and short:
                x_BTD, latent, rp = run("dense_layer", seg.dense_layer, state, x_BTD, rope, start_B, latent, rp, j)
            elif kind == "dense":
                x_BTD = settled(x_BTD, run)
                x_BTD, latent, rp = self._attention(seg, state, x_BTD, rope, start_B, latent, rp, j, run)
                x_BTD = run("dense_mlp", seg.dense_mlp, state, x_BTD)
            else:
                ahead_of = cfg.next_moe_layer.get(i) if lookahead is not None else None
                guess = None
                if short and ahead_of is not None:  # a MoE layer too: this kind's graph takes its arrays
                    x_BTD, layer_routing, ahead_w, ahead_idx, latent, rp = run(
                        "attention_route", seg.attention_route_ahead, state, self.layers[ahead_of], x_BTD, rope,
                        start_B, latent, rp, j)
                    guess = (ahead_of, ahead_w, ahead_idx)
                elif short:
                    x_BTD, layer_routing, latent, rp = run("attention_route", seg.attention_route, state, x_BTD,
                                                           rope, start_B, latent, rp, j)
                else:
                    x_BTD = settled(x_BTD, run)
                    x_BTD, latent, rp = self._attention(seg, state, x_BTD, rope, start_B, latent, rp, j, run)
                    layer_routing = run("route", seg.route, state, x_BTD)
                x_BTD = moe_block(self, i, seg, state, x_BTD, layer_routing, prefetched, stats, run, active_N,
                                  lookahead, guess)
            groups[kind] = LayerCache(latent, rp)
        # Not waited for: the head's dispatch overlaps the last layer's compute.
        return x_BTD, KVCache(groups)

    def _lookahead(self, n_tokens: int) -> Lookahead | None:
        """A forward's `Lookahead`, where it applies: decode-sized steps on one device, where the link may carry
        experts (not with expert_compute="cpu")."""
        if self.lookahead and self.mesh is None and n_tokens <= FUSED_MAX_TOKENS and self.expert_compute != "cpu":
            return Lookahead(self.lookahead)
        return None

    def _attention(self, seg: LayerSegments, state, x_BTD, rope, start_B, latent, rp, j, run: Segments):
        """Attention over query chunks, so prefill activations stay bounded for long prompts."""
        T = x_BTD.shape[1]
        outs = []
        for q0 in range(0, T, QUERY_CHUNK):
            q1 = min(T, q0 + QUERY_CHUNK)
            rope_q = (rope[0][:, q0:q1], rope[1][:, q0:q1])
            out, latent, rp = run("attention", seg.attention, state, x_BTD[:, q0:q1], rope_q, start_B + q0, latent, rp, j)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), latent, rp
