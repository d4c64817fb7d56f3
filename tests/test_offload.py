"""Offload: a placement plan from rules and a budget; experts in pinned host memory give the same
answers as the all-on-device model, with the offload code path running here on the CPU."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ktjax
from fp8 import write_dequantized_twin, write_fp8_checkpoint
from ktjax.api import plan_placement
from ktjax.experts.device import experts_segment
from ktjax.experts.packed import PackedLayout
from ktjax.experts.weights import ExpertFormat, ExpertWeights, float_expert, fp8_expert
from ktjax.runtime import offload
from ktjax.runtime.offload import executor as executor_module
from ktjax.runtime.offload import moe_block
from ktjax.runtime.offload.segments import head_segment
from ktjax.runtime.placement import PlacementError, fmt_bytes, parse_size, training_nbytes
from ktjax.runtime.resident import ResidentExecutor
from ktjax.train.finetune import check_training_room
from reference import load_reference, make_reference, reference_greedy, reference_logits, save_reference

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
SMALL = dict(max_context=64, max_batch=4)


@pytest.fixture(scope="module")
def ref():
    return make_reference("v3", seed=21, num_hidden_layers=4, first_k_dense_replace=1)


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    return save_reference(ref, tmp_path_factory.mktemp("off"))


@pytest.fixture(scope="module")
def fp8_ckpt(ckpt, tmp_path_factory):
    """Every linear weight FP8 (attention, dense MLP, shared and routed experts), as DeepSeek publishes."""
    return write_fp8_checkpoint(ckpt, str(tmp_path_factory.mktemp("fp8")), block=(16, 16))


@pytest.fixture(scope="module")
def fp8_reference(fp8_ckpt, tmp_path_factory):
    """transformers' model of the FP8 checkpoint's numpy-dequantised twin."""
    return load_reference(write_dequantized_twin(fp8_ckpt, str(tmp_path_factory.mktemp("twin"))))


MIXED = {r"model\.layers\.2\.mlp\.experts\.[0-3]": "device", **ALL_HOST}


@pytest.fixture(scope="module")
def all_host(ckpt):
    """Every routed expert in host memory, streamed: one model for the tests that only run it (an
    offloaded model compiles its own layer programs)."""
    return ktjax.load(ckpt, dtype="float32", placement=ALL_HOST, **SMALL)


@pytest.fixture(scope="module")
def mixed(ckpt):
    """Layer 2's experts 0-3 on the device, every other routed expert in host memory."""
    return ktjax.load(ckpt, dtype="float32", placement=MIXED, **SMALL)


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def memory_kind(x: jax.Array) -> str:
    return x.sharding.memory_kind


def no_eos(model):
    """The model without an end-of-sentence id: it generates every token asked for, as the reference does."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_id=None))


def experts_of(model):
    return model.executor.store.experts


@pytest.mark.parametrize("size, expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5 MiB", 1572864),
                                            (4096, 4096), ("2e9", 2 * 10**9)])
def test_sizes_parse(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", ["lots", "-3GB", "12 parsecs", 0])
def test_bad_sizes_are_named(bad):
    with pytest.raises(PlacementError, match="gpu_memory"):
        parse_size(bad)


@pytest.mark.parametrize("n, text", [(512, "512 B"), (3 * 2**20 + 2**19, "3.50 MiB"), (15 * 2**30, "15.00 GiB")])
def test_sizes_print_in_units_that_fit(n, text):
    assert fmt_bytes(n) == text


def test_rules_place_experts_first_match_wins(ckpt):
    plan = plan_placement(ckpt, placement={r"model\.layers\.2\.mlp\.experts\.[0-2]": "device", **ALL_HOST}, **SMALL)
    assert plan.device_experts == {(2, 0), (2, 1), (2, 2)}
    assert len(plan.host_experts) == 3 * 8 - 3 and plan.offloaded


def test_rules_may_not_send_core_parameters_to_the_host(ckpt):
    with pytest.raises(PlacementError, match="only routed experts"):
        plan_placement(ckpt, placement={r".*shared_experts.*": "host"})


def test_budget_spreads_device_experts_over_the_layers_and_the_rest_stays_on_the_host(ckpt):
    everything = plan_placement(ckpt, gpu_memory="1TB", **SMALL)
    fixed = everything.device_bytes - len(everything.device_experts) * everything.expert_bytes
    reserve = 256 << 20
    budget = fixed + reserve + 10 * everything.expert_bytes + 1
    plan = plan_placement(ckpt, gpu_memory=budget, **SMALL)
    # Expert-major over the MoE layers (1, 2, 3): each layer keeps a similar share on the device.
    assert plan.device_experts == {(i, e) for e in range(3) for i in (1, 2, 3)} | {(1, 3)}
    assert plan.device_bytes <= budget
    table = plan.table()
    assert "pinned_host" in table and "did not fit" in table and fmt_bytes(budget) in table


def test_the_plan_counts_experts_in_the_format_they_are_kept_in(ckpt, fp8_ckpt):
    fp8 = fp8_ckpt
    F, D = 32, 64
    assert plan_placement(fp8, dtype="float32").expert_bytes == 3 * F * D + 3 * 4 * 2 * 4  # as stored: FP8 + scales
    assert plan_placement(fp8, dtype="float32", experts="float32").expert_bytes == 3 * F * D * 4
    for fmt in ("int8", "int4"):  # rows padded to whole groups / super-blocks
        assert plan_placement(ckpt, dtype="float32", experts=fmt).expert_bytes == PackedLayout(fmt, F, D).nbytes
    # What is planned is what is loaded: an FP8 checkpoint keeps FP8 experts, on the device too.
    model = ktjax.load(fp8, dtype="float32")
    for layer in experts_of(model).values():
        for ex in layer:
            assert ex.w.dtype == jnp.float8_e4m3fn and memory_kind(ex.w) == "device"
            assert ex.w.nbytes + ex.scale.nbytes == model.placement.expert_bytes


def test_a_training_plan_reserves_a_steps_activations_instead_of_experts(ckpt):
    everything = plan_placement(ckpt, gpu_memory="1TB", max_context=256)
    extra = training_nbytes(everything.config, 1, 256, jnp.float32)
    # Room for every expert when serving; training's activations take the room of 10 of them.
    budget = everything.device_bytes + (256 << 20) + extra - 10 * everything.expert_bytes
    serve, train = (plan_placement(ckpt, gpu_memory=budget, max_context=256, training=t) for t in (False, True))
    assert train.workspace_bytes == serve.workspace_bytes + extra and train.training_bytes == extra
    assert "training_activations" in train.table() and "training_activations" not in serve.table()
    assert len(serve.device_experts) == 3 * 8 and len(train.device_experts) == 3 * 8 - 10
    assert train.device_bytes <= budget
    # Micro-batches go through each layer together: each one's saved inputs are held at once.
    three = plan_placement(ckpt, gpu_memory="1TB", max_context=256, training=3)
    assert three.workspace_bytes == everything.workspace_bytes + training_nbytes(everything.config, 1, 256,
                                                                                  jnp.float32, 3)
    assert training_nbytes(everything.config, 1, 256, jnp.float32, 3) > extra


def test_finetuning_a_model_planned_for_serving_says_its_steps_may_not_fit(ckpt):
    said = []
    serving = plan_placement(ckpt, dtype="float32", gpu_memory="1GB", max_context=64, placement=ALL_HOST)
    check_training_room(serving, jnp.float32, 2, 64, 2, said.append)
    assert len(said) == 1 and "load it with ktjax.load(..., training=2, max_batch=2, max_context=64)" in said[0]
    training = plan_placement(ckpt, dtype="float32", gpu_memory="1GB", max_batch=2, max_context=64, training=2,
                              placement=ALL_HOST)
    check_training_room(training, jnp.float32, 2, 64, 2, said.append)
    check_training_room(plan_placement(ckpt, dtype="float32", max_context=64), jnp.float32, 2, 64, 2, said.append)
    assert len(said) == 1


def test_budget_too_small_for_the_core_says_how_much_is_needed(ckpt):
    with pytest.raises(PlacementError, match=r"gpu_memory=.* is too small: .* need [\d.]+ [KMG]iB"):
        ktjax.load(ckpt, gpu_memory="1MB")


def test_no_budget_on_the_cpu_keeps_everything_on_the_device(ckpt):
    model = ktjax.load(ckpt)
    assert isinstance(model.executor, ResidentExecutor) and not model.placement.offloaded


def test_host_experts_live_in_pinned_host_memory(ckpt):
    model = ktjax.load(ckpt, placement={r"model\.layers\.1\.mlp\.experts\.[0-3]": "device", **ALL_HOST}, **SMALL)
    assert isinstance(model.executor, offload.OffloadedExecutor)
    assert memory_kind(experts_of(model)[1][0].w) == "device"
    assert memory_kind(experts_of(model)[1][5].w) == "pinned_host"
    assert memory_kind(experts_of(model)[3][7].w) == "pinned_host"


def test_an_offloaded_load_asks_the_disk_for_each_expert_before_it_reads_it(fp8_ckpt, monkeypatch):
    """While one expert converts, the next one's bytes (FP8 values and scales) are being read: each
    expert's file ranges are asked for (posix_fadvise WILLNEED) before the loader reads them."""
    from ktjax.io.checkpoint import Checkpoint
    events = []
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, offset, n, advice: events.append(("ask", os.readlink(f"/proc/self/fd/{fd}"),
                                                                     offset, n, advice)))
    read = Checkpoint.read

    def recording_read(self, name):
        t = self.info(name)
        if ".mlp.experts." in name:
            events.append(("read", os.path.realpath(t.file), t.offset, t.nbytes, os.POSIX_FADV_WILLNEED))
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", recording_read)
    cfg = ktjax.load(fp8_ckpt, dtype="float32", placement=ALL_HOST, **SMALL).config
    reads = [e for e in events if e[0] == "read"]
    asked = {e[1:] for e in events if e[0] == "ask"}
    first_expert = 6  # its gate, up, down and their scales: the loop has nothing to prefetch it behind
    assert len(reads) == len(cfg.moe_layers) * cfg.n_routed_experts * 6
    for i, r in enumerate(reads[first_expert:], first_expert):
        assert r[1:] in asked, r
        assert events.index(("ask", *r[1:])) < events.index(r), "asked for only after it was read"


def test_offloaded_logits_equal_transformers(ckpt, ref):
    model = ktjax.load(ckpt, dtype="float32", placement={r"model\.layers\.2\.mlp\.experts\.[0-4]": "device",
                                                          **ALL_HOST}, **SMALL)
    tokens = np.random.default_rng(3).integers(0, 97, (2, 11))
    assert rel_err(ktjax.logits(model, tokens), reference_logits(ref, tokens)) < 1e-5


def test_offloaded_greedy_generation_equals_transformers(all_host, ref):
    model = no_eos(all_host)
    prompts = [[5, 9, 13, 2], [3, 4], [8, 1, 2, 3, 4, 5, 6, 7, 9]]
    got = ktjax.generate(model, prompts, max_new_tokens=8)
    assert [r.token_ids for r in got] == [reference_greedy(ref, p, 8) for p in prompts]
    stats = got[0].stats
    assert stats.prefill_host_bytes > 0 and stats.decode_host_bytes_per_step > 0


def test_decode_moves_only_the_chosen_experts(all_host):
    model = all_host
    stats = ktjax.generate(model, [5, 9, 13], max_new_tokens=3).stats
    K, moe_layers = model.config.num_experts_per_tok, 3
    assert stats.decode_experts_per_step == {"device": 0, "link": K * moe_layers, "host_cpu": 0}
    assert stats.decode_host_bytes_per_step == K * moe_layers * model.placement.expert_bytes


def test_an_expert_gathers_only_as_many_tokens_as_its_busiest_chunk_member_needs():
    """Capacity (tokens computed per expert): the whole batch, weighted, when some expert meets about that
    many; else the busiest expert's count (1 or 2 as it is, more up to a power of two of at least 16), so
    experts that one token of a wide batch meets (a serving batch's masked free rows) run at 1 token, and
    decode batches meet few compiled variants."""
    from ktjax.runtime.offload.streaming import capacity_for
    assert capacity_for(1, [1]) == 1
    assert capacity_for(32, [1, 1, 0]) == 1  # one decoding row among 32 slots
    assert capacity_for(32, [2, 1]) == 2
    assert capacity_for(32, [3, 1]) == 16 and capacity_for(32, [9]) == 16  # the dequantize-then-matmul forms
    assert capacity_for(64, [17]) == 32
    assert capacity_for(8, [2, 1, 3]) == 8  # 16 would reach the batch: every token
    assert capacity_for(8, [8, 1]) == 8 and capacity_for(3, [3]) == 4  # every token: the dense weighted form
    assert capacity_for(4096, [700, 12]) == 1024  # prefill-sized: the largest count, rounded
    assert capacity_for(8, []) == 1


@pytest.mark.parametrize("form, lookahead", [("streamed", 0), ("fused", 0), ("fused", 2)])
def test_padding_and_inactive_rows_route_to_no_expert(all_host, form, lookahead):
    """A prefill's padding, and in decode a serving batch's free slots (active_B False), bring in no
    experts; the active rows' tokens are unchanged, in either decode form (the fused program computes
    the routed experts on the active rows alone), and with experts fetched a layer early (every transfer is
    then a chosen expert or a guess). Shapes as generate() pads a batch of 3 (compiled by the tests above)."""
    from ktjax.runtime.model import Sampling, StepStats
    from ktjax.runtime.offload.segments import Segments, settled
    ex = all_host.executor.with_decode_form(form).with_lookahead(lookahead)

    def needed(stats):  # the transfers of chosen experts: all of them, less the guesses, plus the guesses used
        return stats.experts_fetched - stats.experts_early + stats.experts_early_used

    tokens_BT = np.zeros((4, 16), np.int32)
    tokens_BT[:, :4] = [[5, 9, 13, 2], [3, 4, 8, 1], [40, 7, 7, 3], [11, 22, 33, 44]]
    greedy = Sampling.of()
    lengths_B = np.array([2, 1, 1, 1], np.int32)  # 5 tokens: not prefill-sized (which streams every expert)
    token_B, cache, prefill = ex.prefill(ex.init_cache(4, 256), tokens_BT, lengths_B, jax.random.key(0), greedy)
    K = ex.config.num_experts_per_tok
    assert all(int(c.sum()) == 5 * K for c in prefill.expert_counts.values())  # the prompts' tokens, no padding
    assert needed(prefill) == sum(int((c > 0).sum()) for c in prefill.expert_counts.values())
    pos_B = jnp.asarray(lengths_B)

    def decode_hidden(cache, active_B):  # a decode step's last hidden states, each segment timed
        stats = StepStats()
        run = Segments(stats, True)
        x_BTD, _ = ex.forward(cache, token_B, pos_B, stats, run, active=active_B)
        return np.asarray(settled(x_BTD, run))[:, 0], stats

    every, all_stats = decode_hidden(jax.tree.map(jnp.copy, cache), None)
    one, one_stats = decode_hidden(cache, np.array([True, False, False, False]))
    np.testing.assert_allclose(one[0], every[0], rtol=1e-5, atol=1e-5 * np.abs(every[0]).max())
    assert ("moe_device" in one_stats.segment_seconds) == (form == "fused")
    moe_layers = len(ex.config.moe_layers)
    assert needed(one_stats) == K * moe_layers < needed(all_stats)
    assert one_stats.experts_early == lookahead * (moe_layers - 1)  # the active row guesses 3, 2 of them fetched
    assert all(int((c > 0).sum()) == K for c in one_stats.expert_counts.values())


@pytest.mark.parametrize("form", ["fused", "streamed"])
def test_decode_steps_reuse_their_compiled_segments(mixed, form):
    """Steps that mix device and host experts in a layer, in any proportion, run the same programs: the
    experts' and those that read a MoE layer's terms (the next layer's attention, the head)."""
    model = dataclasses.replace(mixed, executor=mixed.executor.with_decode_form(form))
    seg = model.executor.segments["moe"]
    segments = (seg.moe_device if form == "fused" else experts_segment, seg.attention_route, head_segment)
    ktjax.generate(model, [5, 9, 13], max_new_tokens=3)
    ktjax.generate(model, [11, 3, 2, 40, 5], max_new_tokens=2)  # its prefill's variant (a prompt's own count of experts)
    compiled = [s._cache_size() for s in segments]
    assert min(compiled) > 0  # the decode steps ran these
    ktjax.generate(model, [11, 3, 2, 40, 5], max_new_tokens=12)  # the same prefill, then ten more decode steps
    assert [s._cache_size() for s in segments] == compiled


@pytest.mark.parametrize("form", ["fused", "streamed"])
def test_both_decode_forms_generate_transformers_tokens(mixed, ref, form):
    model = dataclasses.replace(no_eos(mixed), executor=mixed.executor.with_decode_form(form))
    prompts = [[5, 9, 13, 2], [3, 4]]
    got = ktjax.generate(model, prompts, max_new_tokens=6, profile=True)
    assert [r.token_ids for r in got] == [reference_greedy(ref, p, 6) for p in prompts]
    assert ("moe_device" in got[0].stats.segment_seconds) == (form == "fused")
    # A MoE layer's terms are summed by the next program that reads them, not by a program of their own.
    assert "combine" not in got[0].stats.segment_seconds


def test_resident_experts_apart_from_streamed_ones_generate_transformers_tokens(mixed, ref):
    """The fused form with a layer's resident experts computed in a program of their own (`moe_device`) and the
    streamed ones added when they land (`moe_landed`): layer 2 mixes both, and the tokens stay transformers'."""
    apart = mixed.executor.with_decode_form("fused").with_resident_apart(True)
    model = dataclasses.replace(no_eos(mixed), executor=apart)
    prompts = [[5, 9, 13, 2], [3, 4]]
    got = ktjax.generate(model, prompts, max_new_tokens=6, profile=True)
    assert [r.token_ids for r in got] == [reference_greedy(ref, p, 6) for p in prompts]
    assert "moe_landed" in got[0].stats.segment_seconds


def test_long_prefill_streams_every_host_expert_once_and_equals_transformers(ckpt, ref, monkeypatch):
    monkeypatch.setattr(executor_module, "QUERY_CHUNK", 16)  # attention in query chunks too: 40 = 16 + 16 + 8
    model = ktjax.load(ckpt, dtype="float32", placement=ALL_HOST, max_context=256)
    prompt = np.random.default_rng(4).integers(0, 97, 40).tolist()
    stats = ktjax.generate(model, prompt, max_new_tokens=1).stats
    assert stats.prefill_host_bytes == len(model.placement.host_experts) * model.placement.expert_bytes
    tokens = np.asarray([prompt, prompt[::-1]])
    assert rel_err(ktjax.logits(model, tokens), reference_logits(ref, tokens)) < 1e-5


@pytest.fixture
def frozen_heap():
    """Everything alive now out of the garbage collector's sight until the test ends (gc.freeze): a
    full collection then looks at the test's own objects only, in milliseconds instead of the ~0.5 s
    (and more late in a long session) that the whole process's heap takes."""
    import gc
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def count_live_fetches(model) -> list[int]:
    """Wrap the store's fetch: before each fetch, how many experts fetched earlier are still referenced
    (after a full garbage collection: a reference cycle does not count)."""
    import gc
    import weakref
    store = model.executor.store
    fetched, live = [], []
    fetch = store.fetch

    def counting(layer, ids, stats, *early):
        gc.collect()
        live.append(sum(r() is not None for r in fetched))
        out = fetch(layer, ids, stats, *early)
        fetched.extend(weakref.ref(ex.w) for ex in out)
        return out

    store.fetch = counting
    return live


@pytest.mark.parametrize("phase", ["prefill", pytest.param("training", marks=pytest.mark.slow)])
def test_streaming_keeps_at_most_two_chunks_of_experts_on_the_device(ckpt, phase, frozen_heap):
    """What the plan's workspace holds: the chunk being computed and the one in flight, no more."""
    from ktjax.lora.config import LoRAConfig, resolve_sites
    from ktjax.lora.modules import init_adapters
    from ktjax.train.config import TrainConfig
    model = ktjax.load(ckpt, dtype="float32", placement=ALL_HOST, max_context=64, expert_chunk=2)
    live = count_live_fetches(model)
    tokens = np.random.default_rng(6).integers(0, 97, (1, 24))
    if phase == "prefill":
        ktjax.logits(model, tokens)
    else:
        lcfg = LoRAConfig(rank=2)
        sites = resolve_sites(model.config, lcfg.targets)
        adapters = jax.tree.map(jnp.asarray, init_adapters(model.config, lcfg, 0, sites))
        trainer = model.executor.trainer(lcfg, sites, TrainConfig())
        trainer.micro_loss_and_grads(adapters, tokens[None], np.ones_like(tokens, bool)[None], None)
    assert len(live) >= 4 * 3 and max(live) <= 2  # one chunk of 2 experts in flight when the next is fetched


@pytest.mark.parametrize("fp8", [False, True])  # gate and up in one matmul; FP8: in two
def test_a_chunk_of_experts_adds_exactly_its_routed_tokens_weighted_contributions(fp8):
    rng = np.random.default_rng(9)
    N, D, F, E, K = 40, 16, 8, 12, 3
    h = rng.normal(size=(N, D)).astype(np.float32)
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    wts = rng.uniform(size=(N, K)).astype(np.float32)
    w = rng.normal(size=(E, 3, F, D)).astype(np.float32) / 4  # gate, up, down^T
    scale = rng.uniform(0.5, 2.0, size=(E, 3, 1, 2)).astype(np.float32)  # blocks of 8
    fmt = ExpertFormat("fp8" if fp8 else "float32", F, D, 8)
    if fp8:
        q = w.astype(jnp.float8_e4m3fn)
        w = q.astype(np.float32) * np.repeat(np.repeat(scale, 8, 2), 8, 3)
    chunk = [7, 2, 11, 5]  # not in id order; a padded slot (-1) reuses expert 7's arrays
    ids = np.array(chunk + [-1], np.int32)
    experts = tuple(fp8_expert(jnp.asarray(q[e, 0]), jnp.asarray(q[e, 1]), jnp.asarray(q[e, 2]).T,
                               jnp.asarray(scale[e, 0]), jnp.asarray(scale[e, 1]), jnp.asarray(scale[e, 2]).T, fmt)
                    if fp8 else float_expert(jnp.asarray(w[e, 0]), jnp.asarray(w[e, 1]), jnp.asarray(w[e, 2]).T, fmt)
                    for e in chunk + [chunk[0]])
    capacity = int(max((idx == e).any(-1).sum() for e in chunk))
    acc = np.ones((N, D), np.float32)  # added to, not overwritten
    got = experts_segment(jnp.asarray(acc), jnp.asarray(h), jnp.asarray(wts), jnp.asarray(idx), jnp.asarray(ids),
                          experts, capacity=capacity)
    want = acc.copy()
    for e in chunk:
        g, u = h @ w[e, 0].T, h @ w[e, 1].T
        y = (g / (1 + np.exp(-g)) * u) @ w[e, 2]
        want += y * (wts * (idx == e)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("F, D", [(32, 64), (20, 36)])  # whole blocks, and ragged edge blocks
def test_fp8_expert_matrices_dequantise_blockwise(F, D):
    rng = np.random.default_rng(8)
    w = rng.normal(size=(3, F, D)).astype(jnp.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, size=(3, -(-F // 16), -(-D // 16))).astype(np.float32)
    ex = ExpertWeights(jnp.asarray(w), jnp.asarray(scale), ExpertFormat("fp8", F, D, 16))
    want = w.astype(np.float32) * np.repeat(np.repeat(scale, 16, 1), 16, 2)[:, :F, :D]
    np.testing.assert_array_equal(np.asarray(ex.gate_up(jnp.float32)), want[:2].reshape(2 * F, D))
    np.testing.assert_array_equal(np.asarray(ex.down(jnp.float32)), want[2].T)


@pytest.mark.parametrize("where", ["resident", "offloaded"])
def test_an_fp8_checkpoint_gives_transformers_logits_on_its_dequantised_weights(fp8_ckpt, fp8_reference, where):
    """The reference: transformers' model of the checkpoint's numpy-dequantised twin (value = block * scale)."""
    opts = dict(placement=ALL_HOST, **SMALL) if where == "offloaded" else {}
    model = ktjax.load(fp8_ckpt, dtype="float32", **opts)
    ex = experts_of(model)[2][3]
    assert ex.w.dtype == jnp.float8_e4m3fn and ex.scale is not None
    assert memory_kind(ex.w) == ("pinned_host" if where == "offloaded" else "device")
    assert model.placement.expert_bytes < 3 * 32 * 64 * 4  # FP8 bytes (plus scales), not float32
    tokens = np.random.default_rng(5).integers(0, 97, (2, 9))
    assert rel_err(ktjax.logits(model, tokens), reference_logits(fp8_reference, tokens)) < 1e-5
    prompt = tokens[0].tolist()
    assert ktjax.generate(no_eos(model), prompt, max_new_tokens=6).token_ids == reference_greedy(fp8_reference, prompt, 6)


def test_profile_times_segments(all_host):
    stats = ktjax.generate(all_host, [5, 9, 13], max_new_tokens=2, profile=True).stats
    assert {"attention_route", "experts", "shared_expert", "head"} <= set(stats.segment_seconds)  # float experts: streamed


@pytest.mark.parametrize("form, apart", [("fused", False), ("fused", True), ("streamed", False)])
def test_experts_fetched_a_layer_early_generate_transformers_tokens(mixed, ref, form, apart):
    """Lookahead: each MoE layer fetches the next one's likely host experts (that layer's router on this one's
    residual after attention), and the next layer computes the ones it chooses from those copies: the tokens
    stay transformers', and some of the early experts are used. Also with the fused form's resident experts
    apart, where the early ones count as resident."""
    ex = mixed.executor.with_decode_form(form).with_lookahead(2).with_resident_apart(apart)
    model = dataclasses.replace(no_eos(mixed), executor=ex)
    prompts = [[5, 9, 13, 2], [3, 4]]
    got = ktjax.generate(model, prompts, max_new_tokens=6, profile=apart)
    assert [r.token_ids for r in got] == [reference_greedy(ref, p, 6) for p in prompts]
    assert ("moe_landed" in got[0].stats.segment_seconds) == apart
    paths = got[0].stats.decode_experts_per_step
    # 2 rows x 3 experts, 2 MoE layers predicted per step: at most 2 fetched early for each.
    assert 0 < paths["early_used"] <= paths["link_early"] <= 2 * 2


def test_lookahead_fetches_the_next_layers_likeliest_host_experts(mixed):
    """The experts fetched early: the largest routing weight summed over the active tokens, among the next
    layer's host experts (layer 2 keeps experts 0-3 on the device), at most `most` of them, likeliest first."""
    ex = mixed.executor
    idx_NK = np.array([[0, 5, 6, 7], [5, 1, 4, 6], [5, 4, 0, 1]], np.int32)
    w_NK = np.array([[0.9, 0.1, 0.5, 0.3], [0.15, 0.8, 0.05, 0.1], [0.9, 0.9, 0.9, 0.9]], np.float32)
    stats = offload.executor.StepStats()
    guess = (2, jnp.asarray(w_NK), jnp.asarray(idx_NK))
    got = moe_block.fetch_ahead(ex, guess, np.array([0, 1]), stats, most=2)  # row 2 is not active
    # 6: 0.6, 7: 0.3, 5: 0.25, 4: 0.05; experts 0 (0.9) and 1 (0.8) are on the device. With row 2: 5, 4.
    assert list(got) == [6, 7]
    assert stats.experts_early == stats.experts_fetched == 2
    assert stats.bytes_from_host == 2 * mixed.placement.expert_bytes
    for e, arrays in got.items():
        for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(experts_of(mixed)[2][e])):
            assert a.sharding.memory_kind == "device"
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
