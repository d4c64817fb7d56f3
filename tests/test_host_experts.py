"""Experts where they live: int8/int4 experts computed on the host CPU, streamed over the link, or
resident on the device give the same model; the scheduler's split between the CPU and the link;
prefill-sized batches stream; the hot-expert cache holds the experts a calibration prompt uses most."""

import dataclasses
import threading

import jax
import numpy as np
import pytest

import ktjax
from ktjax.api import plan_placement, routing_counts
from ktjax.runtime.model import Sampling, StepStats
from ktjax.runtime.offload.executor import FUSED_COPIES
from ktjax.runtime.offload.path_rates import PathRates
from ktjax.runtime.offload.scheduler import split
from ktjax.runtime.offload.segments import FUSED_MAX_TOKENS, LayerSegments
from reference import make_reference, save_reference

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
SOME_ON_DEVICE = {r"model\.layers\.2\.mlp\.experts\.[0-3]": "device", **ALL_HOST}
TOKENS = np.random.default_rng(3).integers(0, 97, (2, 9))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_reference(make_reference("v3", seed=31, num_hidden_layers=4, first_k_dense_replace=1),
                          tmp_path_factory.mktemp("host_experts"))


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_the_cpu_takes_the_experts_with_fewest_tokens_until_both_paths_finish_together():
    rates = PathRates(link_gbps=40.0, cpu_gbps=40.0, cpu_call_s=0.0)
    nbytes = 40_000_000  # 1 ms per expert on the link, and per token on the CPU
    counts, hosted = np.zeros(24, int), np.ones(24, bool)
    counts[[3, 5, 9, 11, 20]] = [2, 3, 1, 1, 1]
    hosted[3] = False  # on the device already

    def paths(rates, mode):
        cpu, on_device, n = split(counts, hosted, nbytes, rates, mode)
        return cpu.tolist(), on_device[:n].tolist(), on_device[n:].tolist()

    assert paths(rates, "auto") == ([9, 11], [3], [5, 20])  # CPU 2 ms (two 1-token experts), link 2 ms
    assert paths(rates, "cpu") == ([5, 9, 11, 20], [3], [])
    assert paths(rates, "gpu") == ([], [3], [5, 9, 11, 20])
    slow_cpu = PathRates(link_gbps=40.0, cpu_gbps=10.0)
    assert paths(slow_cpu, "auto")[0] == []  # 4 ms per CPU expert: the link alone wins
    assert split(np.zeros(24, int), hosted, nbytes, rates, "auto")[0].size == 0


def the_rule(counts, hosted, nbytes, rates, mode):
    """The scheduler's rule as the issue states it, in plain Python: (the CPU's experts, fewest tokens first ("cpu":
    in id order); the device's: those already there, then the link's, in id order; how many are already there)."""
    chosen = [int(e) for e in np.flatnonzero(counts)]
    on_host, already = [e for e in chosen if hosted[e]], [e for e in chosen if not hosted[e]]
    by_tokens = sorted(on_host, key=lambda e: counts[e])  # a stable sort: ties in id order

    def finish(k):  # the later of the two paths, the CPU taking the first k
        cpu_s = sum(counts[e] * nbytes / (rates.cpu_gbps * 1e9) for e in by_tokens[:k]) + (rates.cpu_call_s if k else 0)
        return max(cpu_s, (len(on_host) - k) * nbytes / (rates.link_gbps * 1e9))

    if mode == "auto":
        cpu = by_tokens[:min(range(len(on_host) + 1), key=finish)]  # the first best
    else:
        cpu = on_host if mode == "cpu" else []
    return cpu, already + [e for e in on_host if e not in cpu], len(already)


@pytest.mark.parametrize("mode", ["auto", "cpu", "gpu"])
def test_the_split_follows_the_rule_over_many_routings(mode):
    """`scheduler.split` (compiled) gives the rule's paths over 300 random routings of one to four rows of 8 experts
    of 64, some on the device already, and rates that split them every way."""
    rng, E, K, splits = np.random.default_rng(0), 64, 8, set()
    for _ in range(300):
        rates = PathRates(link_gbps=rng.uniform(0.2, 5), cpu_gbps=rng.uniform(0.2, 5), cpu_call_s=rng.uniform(0, 1e-3))
        counts = np.bincount(np.concatenate([rng.choice(E, K, replace=False) for _ in range(rng.integers(1, 5))]),
                             minlength=E)
        hosted = rng.random(E) < 0.8
        cpu, on_device, n = split(counts, hosted, 2_000_000, rates, mode)
        want_cpu, want_device, want_n = the_rule(counts, hosted, 2_000_000, rates, mode)
        assert (cpu.tolist(), on_device.tolist(), n) == (want_cpu, want_device, want_n)
        splits.add((len(cpu) > 0, len(on_device) > n))
    assert splits == {"auto": {(True, True), (True, False), (False, True)}, "cpu": {(True, False)},
                      "gpu": {(False, True)}}[mode]


@pytest.fixture(scope="module")
def split_model(ckpt):
    """split_model(fmt, mode): layer 2's experts 0-3 on the device, the others in host memory in `fmt`,
    host experts computed on path `mode` (exactly: float32 activations). "gpu" is loaded so (no host path at all); "cpu" and "auto"
    are one model loaded with "auto" and told which path to take (`with_expert_compute`: what loading
    with expert_compute="cpu" gives, the experts and compiled programs shared). Loaded once each."""
    loaded = {}

    def get(fmt: str, mode: str) -> ktjax.LoadedModel:
        how = "gpu" if mode == "gpu" else "auto"
        if (fmt, how) not in loaded:
            loaded[fmt, how] = ktjax.load(ckpt, dtype="float32", experts=fmt, placement=SOME_ON_DEVICE,
                                          expert_compute=how, max_context=64, host_activations="float32")
        model = loaded[fmt, how]
        assert (model.executor.host is None) == (mode == "gpu")
        return dataclasses.replace(model, executor=model.executor.with_expert_compute(mode))

    return get


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_path_computes_the_same_model(ckpt, split_model, fmt):
    """The same quantized experts on the device, streamed to it, or computed on the host CPU; streamed in the
    fused form by the program that computes them, by one of their own, or by `jax.device_put`, and that program
    given its expert ids as numpy arrays or in pinned buffers it reads in place (`indices_in_place`)."""
    resident = ktjax.load(ckpt, dtype="float32", experts=fmt)
    few = TOKENS[:1, :5]  # 5 tokens x 3 experts each: decode-sized (the decode forms); TOKENS streams every expert
    on_device = [np.asarray(ktjax.logits(resident, t)) for t in (TOKENS, few)]
    for mode in ("gpu", "cpu", "auto"):
        model = split_model(fmt, mode)
        for form, copies, in_place in ([("fused", how, False) for how in FUSED_COPIES]
                                       + [("fused", FUSED_COPIES[0], True), ("streamed", FUSED_COPIES[0], False)]):
            ex = model.executor.with_decode_form(form).with_fused_copies(copies).with_indices_in_place(in_place)
            for tokens, want in zip((TOKENS, few), on_device):
                logits = ktjax.logits(dataclasses.replace(model, executor=ex), tokens)
                assert rel_err(logits, want) < 1e-5, (mode, form, copies, in_place, tokens.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_activations_are_the_default_and_change_only_the_host_cpus_products(tmp_path, fmt):
    """By default (host_activations="int8") the host CPU's experts multiply activations quantized per
    group of 32, close to the exact model but not equal to it; the GPU's path is untouched. One MoE
    layer, the last: before a later layer, routing turns any small difference into other experts (on
    the 4-layer model int8 weights alone move the logits by a third)."""
    ckpt = save_reference(make_reference("v3", seed=31, num_hidden_layers=2, first_k_dense_replace=1), tmp_path)
    few = TOKENS[:1, :5]
    want = np.asarray(ktjax.logits(ktjax.load(ckpt, dtype="float32", experts=fmt), few))
    errors = {}
    for mode in ("cpu", "gpu"):
        model = ktjax.load(ckpt, dtype="float32", experts=fmt, expert_compute=mode, placement=ALL_HOST,
                           max_context=64)
        errors[mode] = rel_err(ktjax.logits(model, few), want)
        if mode == "cpu":
            assert model.executor.host.kernels.int8_activations
            exact = model.executor.with_host_activations("float32")
            assert rel_err(ktjax.logits(dataclasses.replace(model, executor=exact), few), want) < 1e-5
    # int4's own weights are ~10% from float32 on this model (int8's ~1%): the activations add ~0.5%
    assert 1e-4 < errors["cpu"] < 2e-2 and errors["gpu"] < 1e-5, errors
    with pytest.raises(ValueError, match=r"^host_activations='int16': use one of float32, int8$"):
        ktjax.load(ckpt, experts="int4", host_activations="int16")


@pytest.mark.parametrize("mode", ["gpu", "cpu", "auto"])
def test_forced_splits_generate_the_same_tokens(split_model, mode):
    reference = ktjax.generate(split_model("int8", "gpu"), [5, 9, 13, 2], max_new_tokens=6)
    result = ktjax.generate(split_model("int8", mode), [5, 9, 13, 2], max_new_tokens=6)
    assert result.token_ids == reference.token_ids
    paths = result.stats.decode_experts_per_step
    assert paths["device"] > 0 and paths["host_cpu"] + paths["link"] > 0
    if mode != "auto":  # forced: every host expert on the one path
        assert (paths["host_cpu"] > 0) == (mode == "cpu") and (paths["link"] > 0) == (mode == "gpu")


@pytest.mark.parametrize("fmt, form", [("int8", "streamed"), ("int4", "fused")])
def test_experts_fetched_a_layer_early_change_only_where_they_run(split_model, fmt, form):
    """Lookahead (the next MoE layer's likely host experts fetched a layer early) beside the host CPU's and the
    link's shares, in both decode forms: the tokens of the model with every host expert streamed, and the early
    experts used."""
    reference = ktjax.generate(split_model(fmt, "gpu"), [5, 9, 13, 2], max_new_tokens=6)
    model = split_model(fmt, "auto")
    even = PathRates(link_gbps=1.0, cpu_gbps=1.0, cpu_call_s=0.0)  # a layer's host experts split about evenly
    executor = model.executor.with_decode_form(form).with_rates(even).with_lookahead(2)
    model = dataclasses.replace(model, executor=executor)
    result = ktjax.generate(model, [5, 9, 13, 2], max_new_tokens=6)
    assert result.token_ids == reference.token_ids
    paths = result.stats.decode_experts_per_step
    assert paths["early_used"] > 0 and paths["host_cpu"] > 0


def test_a_watched_decode_step_records_when_its_transfers_land_and_its_device_shares_are_done(split_model):
    """`with_watcher`: a decode step's timeline gains, for each fused MoE layer, when its device share was
    computed, and where the link's transfers are a program of their own (`fused_copies` "program", the default),
    when they landed; unwatched, neither."""
    from ktjax.runtime.model import Sampling
    model = split_model("int4", "auto")
    even = PathRates(link_gbps=1.0, cpu_gbps=1.0, cpu_call_s=0.0)
    plain = model.executor.with_decode_form("fused").with_rates(even)
    assert plain.fused_copies == "program"
    moved_by_it = plain.with_fused_copies("in_program")
    for ex, watched in ((plain, False), (moved_by_it, False), (plain.with_watcher(True), True),
                        (moved_by_it.with_watcher(True), True)):
        key, sampling = jax.random.key(0), Sampling.of()
        cache = ex.init_cache(1, 16)
        token, cache, _ = ex.prefill(cache, np.array([[5, 9, 13, 2]], np.int32), np.array([4], np.int32), key,
                                     sampling)
        token, cache, stats = ex.decode(cache, token, np.array([4], np.int32), key, sampling)
        jax.block_until_ready(token)
        if watched:
            ex.watcher.shutdown(wait=True)  # its waits have recorded their spans
        spans = {}
        for what, start, end in stats.timeline:
            spans.setdefault(what, []).append((start, end))
        assert len(spans["link_put"]) > 0 and len(spans["moe_device"]) == len(model.config.moe_layers)
        if not watched:
            assert "landed" not in spans and "device_share" not in spans
            continue
        assert len(spans["device_share"]) == len(spans["moe_device"])
        for (_, dispatched), (_, done) in zip(sorted(spans["moe_device"]), sorted(spans["device_share"])):
            assert dispatched <= done
        if ex.fused_copies.startswith("in_program"):  # moved by the program that computes them: no landing
            assert "landed" not in spans
            continue
        assert len(spans["landed"]) == len(spans["link_put"])
        for (_, put_end), (watched_from, landed_at) in zip(sorted(spans["link_put"]), sorted(spans["landed"])):
            assert put_end <= watched_from <= landed_at  # watched from the transfers' start to their landing


def test_asking_for_the_cpu_without_placement_computes_every_routed_expert_there(ckpt):
    """expert_compute="cpu" with no rules: the experts go to host memory and the host CPU computes
    them all (the plan would otherwise keep them on the device, and "cpu" would mean nothing)."""
    model = ktjax.load(ckpt, dtype="float32", experts="int8", expert_compute="cpu", max_context=64)
    assert not model.placement.device_experts
    stats = ktjax.generate(model, [5, 9, 13], max_new_tokens=3).stats
    assert stats.decode_experts_per_step == {"device": 0, "link": 0, "host_cpu": 3 * 3}


def test_a_large_prefill_streams_to_the_gpu_and_decode_uses_the_cpu(ckpt):
    # a cost model in which the CPU always wins a decode step's experts (the link: seconds per tiny expert)
    cpu_always_wins = PathRates(link_gbps=1e-6, cpu_gbps=1e6, cpu_call_s=0.0)
    model = ktjax.load(ckpt, dtype="float32", experts="int8", placement=ALL_HOST, max_context=256)
    model = ktjax.LoadedModel(model.config, model.executor.with_rates(cpu_always_wins), model.placement,
                              path=model.path)
    prompt = np.random.default_rng(4).integers(0, 97, 40).tolist()  # 40 tokens x 3 experts >= 2 x 8 experts
    stats = ktjax.generate(model, prompt, max_new_tokens=3).stats
    hosted = len(model.placement.host_experts)
    assert stats.prefill_host_bytes == hosted * model.placement.expert_bytes  # every host expert streamed once
    assert stats.decode_experts_per_step["host_cpu"] == 3 * 3 and stats.decode_experts_per_step["link"] == 0


def test_the_hot_expert_cache_holds_the_experts_a_calibration_prompt_uses_most(ckpt):
    everything = plan_placement(ckpt, dtype="float32", gpu_memory="1TB", max_context=64)
    fixed = everything.device_bytes - len(everything.device_experts) * everything.expert_bytes
    budget = fixed + (256 << 20) + 6 * everything.expert_bytes + 1  # room for 6 of the 24 experts
    prompt = np.random.default_rng(5).integers(0, 97, 48).tolist()
    model = ktjax.load(ckpt, dtype="float32", gpu_memory=budget, max_context=64, hot_experts=prompt)
    assert len(model.placement.device_experts) == 6
    counts = routing_counts(model, prompt)
    on_device = [counts[i][e] for i, e in model.placement.device_experts]
    in_host = [counts[i][e] for i, e in model.placement.host_experts]
    assert min(on_device) >= max(in_host) and max(on_device) > min(in_host)
    spread = ktjax.load(ckpt, dtype="float32", gpu_memory=budget, max_context=64)
    assert model.placement.device_experts != spread.placement.device_experts
    assert rel_err(ktjax.logits(model, TOKENS), ktjax.logits(spread, TOKENS)) < 1e-5  # the same model
    with pytest.raises(ValueError, match="gpu_memory"):
        ktjax.load(ckpt, dtype="float32", placement=ALL_HOST, max_context=64, hot_experts=prompt)


def test_a_host_calls_fixed_cost_and_rate_are_told_apart_from_calls_of_one_and_of_several_experts():
    from ktjax.runtime.offload.path_rates import fitted_rates
    nbytes, rate, call_s = 27_500_000, 55e9, 3e-4  # 0.5 ms per expert read, plus 0.3 ms per call
    one = PathRates(link_gbps=40.0, cpu_gbps=nbytes / (call_s + nbytes / rate) / 1e9)
    many = PathRates(link_gbps=42.0, cpu_gbps=3 * nbytes / (call_s + 3 * nbytes / rate) / 1e9)
    fitted = fitted_rates(one, call_s + nbytes / rate, many, call_s + 3 * nbytes / rate, 3, nbytes)
    assert fitted.cpu_gbps == pytest.approx(55.0) and fitted.cpu_call_s == pytest.approx(3e-4)
    assert fitted.link_gbps == pytest.approx(41.0)
    noisy = fitted_rates(one, 2e-3, many, 1e-3, 3, nbytes)  # the larger call measured faster: no slope to fit
    assert noisy.cpu_gbps == many.cpu_gbps and noisy.cpu_call_s == PathRates(1.0, 1.0).cpu_call_s


def test_a_measured_host_call_is_its_median_call_not_one_held_up():
    """`measure` rates the CPU by its median call: every third call here is held up 50 ms (the link's thread or the
    OS), the others take ~1 ms; the mean would be ~17 ms. Of several rounds, `median_round` keeps the median one."""
    import time

    from ktjax.runtime.offload.path_rates import measure, median_round
    calls = [0]

    def cpu_call():
        calls[0] += 1
        time.sleep(0.05 if calls[0] % 3 == 0 else 0.001)

    rates, per_call = measure(cpu_call, lambda: time.sleep(0.001), 1_000_000, 1_000_000, seconds=0.3)
    assert 1e-3 <= per_call < 8e-3 and rates.cpu_gbps == pytest.approx(1e6 / per_call / 1e9)
    rounds = [(PathRates(1.0, 1.0), 3e-3), (PathRates(2.0, 2.0), 1e-3), (PathRates(3.0, 3.0), 2e-3)]
    assert median_round(rounds) == rounds[2]


def test_the_paths_can_be_measured_where_the_model_runs(ckpt):
    model = ktjax.load(ckpt, dtype="float32", experts="int8", placement=ALL_HOST, max_context=64)
    rates = model.executor.measure_rates(experts_per_call=2, seconds=0.05)
    assert rates.cpu_gbps > 0 and rates.link_gbps > 0


def test_info_shows_the_cpu_link_switch_point_from_measured_rates_once_there_are_some(ckpt, tmp_path, capsys,
                                                                                        monkeypatch):
    from ktjax.cli.main import main
    from ktjax.runtime.offload.path_rates import PathRates, cached_rates, kernel_name

    monkeypatch.setenv("KTJAX_CACHE_DIR", str(tmp_path))
    argv = ["info", "--model", ckpt, "--experts", "int8", "--gpu-memory", "65.5MiB", "--max-context", "64"]
    assert main(argv) == 0
    assert "rates assumed until the first load on a GPU measures them" in capsys.readouterr().out
    # What a load on a GPU would store, for the default kernel (int8 activations)
    cached_rates(kernel_name("int8", "int8"), lambda: PathRates(link_gbps=10.0, cpu_gbps=30.0, cpu_call_s=3e-4))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("up to 3 token(s)" in out and "rates measured on this machine by an earlier load: CPU 30 GB/s per token "
            "and 0.3 ms per call, link 10 GB/s" in out)
    assert main(argv + ["--host-activations", "float32"]) == 0  # another kernel: its rates are not known yet
    assert "rates assumed until the first load on a GPU measures them" in capsys.readouterr().out


def test_experts_fetched_early_are_as_many_as_the_link_has_room_for():
    """A layer fetches early what the link carries while it would otherwise idle: the host CPU's lead over the
    link's share, plus the window a layer's attention and routing leave (LOOKAHEAD_WINDOW_S, 1.5 ms)."""
    from ktjax.runtime.offload.scheduler import early_fetches
    nbytes = 30_000_000
    fast = PathRates(link_gbps=60.0, cpu_gbps=30.0, cpu_call_s=0.0)  # 0.5 ms per expert on the link, 1 ms on the CPU
    assert early_fetches(fast, nbytes, np.array([]), 0, most=8) == 3  # the window: 1.5 ms
    assert early_fetches(fast, nbytes, np.array([1, 1]), 1, most=8) == 6  # CPU 2 ms, link 0.5: + 1.5 ms
    assert early_fetches(fast, nbytes, np.array([1]), 4, most=8) == 3  # the link's share is the longer: the window
    assert early_fetches(fast, nbytes, np.array([1, 1]), 1, most=2) == 2  # never more than asked for
    slow = PathRates(link_gbps=10.0, cpu_gbps=30.0, cpu_call_s=0.0)  # 3 ms per expert: none fits the window
    assert early_fetches(slow, nbytes, np.array([]), 0, most=2) == 0
    assert early_fetches(None, nbytes, np.array([]), 0, most=2) == 2  # float experts: no rates to go by


@pytest.mark.parametrize("to_host", [True, False], ids=["written-by-the-program", "copied"])
@pytest.mark.parametrize("tokens", [1, 5, FUSED_MAX_TOKENS + 1])
def test_a_decode_sized_routing_reaches_the_host_in_one_array_holding_ids_weights_and_h_exactly(split_model, tokens,
                                                                                              to_host):
    """One array brings a decode-sized layer's routing to the host, written to host memory by the routing's own
    program (as on one device) or copied after it: the expert ids, routing weights and h (as float32) read from it
    equal the device's own arrays. A prefill-sized layer has no such array (its h would be a large copy); the host
    reads its arrays apart, alike."""
    ex = split_model("int4", "auto").executor
    i = ex.config.moe_layers[0]
    seg, state = ex.segments[ex.config.layer_kinds[i]], ex.layers[i]
    assert seg.routing_to_host  # as the executor builds its segments on one device
    seg = LayerSegments(seg.graphdef, seg.cfg, routing_to_host=to_host)
    x_BTD = jax.random.normal(jax.random.key(tokens), (1, tokens, ex.config.hidden_size), ex.dtype)
    routing = seg.route(state, x_BTD)
    assert (routing.for_host is None) == (tokens > FUSED_MAX_TOKENS)
    if routing.for_host is not None:
        assert (routing.for_host.sharding.memory_kind == "pinned_host") == to_host
    routing.start_copies(host_inputs=True)
    ids, (w, h) = routing.ids_on_host(), routing.inputs_on_host()
    assert ids.dtype.kind == "i" and ids.flags.c_contiguous
    np.testing.assert_array_equal(ids, np.asarray(routing.idx_NK))
    np.testing.assert_array_equal(w, np.asarray(routing.w_NK))
    np.testing.assert_array_equal(h, np.asarray(routing.h_ND, np.float32))
    assert len(set(ids.ravel().tolist())) > 1  # a routing, not zeros


def test_a_layers_host_experts_moved_by_one_program_land_on_the_device_unchanged(split_model):
    """`ExpertStore.fetch(..., move="program")`, as a fused decode layer starts its transfers, and `jax.device_put`
    (move="put") both give device arrays holding the host experts' bytes."""
    ex = split_model("int4", "auto").executor
    i = ex.config.moe_layers[-1]
    hosted = [e for e in range(ex.config.n_routed_experts) if ex.store.is_hosted(i, e)][:3]
    stats = StepStats()
    for move in ("program", "put"):
        for e, moved in zip(hosted, ex.store.fetch(i, hosted, stats, move=move)):
            there = ex.store.experts[i][e]
            for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(there), strict=True):
                assert (a.sharding.memory_kind, b.sharding.memory_kind) == ("device", "pinned_host")
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert stats.experts_fetched == 2 * len(hosted) == 6


def test_host_shares_land_in_two_pinned_buffers_in_turn_that_programs_read_in_place():
    """`ShareLanding.put` copies a decode-sized host share into pinned host memory, alternating between two
    buffers per shape (and dtype: expert ids too); a program given one reads what was last written there (no copy
    at the call); its zeros are a buffer of their own."""
    from ktjax.runtime.offload.host_path import ShareLanding
    from ktjax.runtime.offload.segments import combine_segment
    landing = ShareLanding(jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))
    assert landing.in_place
    rng = np.random.default_rng(0)
    shares = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(3)]
    first, second = landing.put(shares[0]), landing.put(shares[1])
    assert first is not second and first.sharding.memory_kind == "pinned_host"
    x, shared, routed = (np.zeros((1, 2, 8), np.float32), np.zeros((2, 8), np.float32), np.ones((2, 8), np.float32))
    np.testing.assert_array_equal(np.asarray(combine_segment(x, shared, (routed, second)))[0], shares[1] + 1)
    assert landing.put(shares[2]) is first  # the first buffer again, its program long run
    np.testing.assert_array_equal(np.asarray(combine_segment(x, shared, (routed, first)))[0], shares[2] + 1)
    zeros = landing.zeros((2, 8))
    assert zeros is not first and zeros is not second and not np.asarray(zeros).any()
    assert ShareLanding(None).put(shares[0]) is shares[0]  # nowhere to land: the numpy array itself
    ids = np.array([3, -1, 7, 2], np.int32)  # a fused program's expert ids: a ring of their own shape and dtype
    held = landing.put(ids)
    assert held is not first and held is not second and held.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(held), ids)
    empty = np.zeros(0, np.int32)
    assert landing.put(empty) is empty  # no buffer for no ids


def decoded(model, rows: int = 1) -> tuple[np.ndarray, StepStats]:
    """A decode step's hidden states (of its rows in use: all but the last of several) and stats, after a prefill of
    4 tokens a row."""
    from ktjax.runtime.offload.segments import Segments, settle
    ex = model.executor
    active = np.arange(rows) < max(rows - 1, 1)
    prompt = np.array([[5, 9, 13, 2], [3, 1, 4, 1], [2, 7, 1, 8]][:rows], np.int32)
    cache = ex.init_cache(rows, 16)
    _, cache, _ = ex.prefill(cache, prompt, [4] * rows, jax.random.key(0), Sampling.of())
    stats = StepStats()
    x, _ = ex.forward(cache, np.array([7, 11, 6][:rows], np.int32), np.full(rows, 4, np.int32), stats,
                      Segments(stats, False), active=active)
    return np.asarray(jax.jit(settle)(x)).reshape(rows, -1)[active], stats


def handoff_model(split_model, fmt: str, **settings):
    """The split model in the handoff form, its `HandoffLayers` settings (fill_apart, resident_first) changed."""
    even = PathRates(link_gbps=1.0, cpu_gbps=1.0, cpu_call_s=0.0)  # a layer's host experts split about evenly
    model = split_model(fmt, "auto")
    model = dataclasses.replace(model, executor=model.executor.with_rates(even).with_decode_form("handoff"))
    for name, value in settings.items():
        setattr(model.executor.handoff_layers, name, value)
    return model


@pytest.mark.parametrize("fmt,rows,fill_apart,resident_first", [
    ("int8", 1, False, True), ("int4", 1, False, True), ("int4", 3, False, True), ("int4", 3, True, True),
    ("int4", 3, False, False)])
def test_a_decode_step_launched_whole_computes_the_same_model(split_model, monkeypatch, fmt, rows, fill_apart,
                                                              resident_first):
    """The handoff decode form (`handoff_step`: every layer's program launched at once, each MoE layer's stream
    waiting for the host's copies of its device experts and for the host CPU's share) gives a decode step the hidden
    states of the step whose host experts all stream, with the host CPU's, the link's and the resident experts' paths
    all taken; at 3 rows too, the last not in use (its experts count nowhere; its outputs are not compared); with
    the copies queued by a thread of their own while the host CPU's share runs on the step's thread (`fill_apart`);
    the experts already on the device computed while the link's land, or (`resident_first` off) all after the whole
    fill."""
    from ktjax.runtime.offload import handoff_step
    want, _ = decoded(split_model(fmt, "gpu"), rows)
    model = handoff_model(split_model, fmt, fill_apart=fill_apart, resident_first=resident_first)
    handoff, filled_by, summed_by = model.executor.handoff_layers.handoff, [], []
    fill, host_sum = handoff.fill, handoff_step.host_sum
    monkeypatch.setattr(handoff, "fill", lambda copies, **kw: (filled_by.append(threading.current_thread()),
                                                               fill(copies, **kw)))
    monkeypatch.setattr(handoff_step, "host_sum", lambda *a: (summed_by.append(threading.current_thread()),
                                                              host_sum(*a))[1])
    got, stats = decoded(model, rows)
    assert rel_err(got, want) < 1e-5
    assert stats.experts_on_host_cpu > 0 and stats.experts_fetched > 0 and stats.experts_on_device > 0
    assert any(what == "moe_layer" for what, *_ in stats.timeline)  # the handoff form's programs ran
    assert filled_by and all((t is threading.main_thread()) != fill_apart for t in filled_by)
    assert summed_by and all(t is threading.main_thread() for t in summed_by)


def test_auto_launches_decode_steps_of_up_to_4_rows_whole_on_a_gpu_and_not_on_the_cpu_backend(split_model):
    """decode_form "auto" takes the handoff form for decode steps of up to 4 rows on a GPU (faster there at full size
    in every measured case), and not on the CPU backend (its waits spin on the host kernels' cores), nor for steps
    of 5 rows (its programs hold a slot for every expert of their rows), prefill, or where another form is asked
    for; in every expert_compute mode (with "gpu", the link takes every host expert). decode_form "handoff" takes
    it for up to 4 rows anywhere."""
    import types

    from ktjax.runtime.offload.handoff_step import applies
    from ktjax.runtime.offload.segments import Segments
    ex = split_model("int4", "auto").executor
    run = Segments(StepStats(), False)
    one, four, five, prefill = (np.zeros((n, t), np.int32) for n, t in ((1, 1), (4, 1), (5, 1), (1, 8)))
    assert ex.decode_form == "auto" and not applies(ex, one, run)  # the CPU backend
    on_gpu = ex._with(devices=[types.SimpleNamespace(platform="gpu")])
    assert all(applies(on_gpu.with_expert_compute(mode), tokens, run)
               for mode in ("auto", "cpu", "gpu") for tokens in (one, four))
    assert not any(applies(on_gpu, tokens, run) for tokens in (five, prefill))
    assert not applies(on_gpu, one, Segments(StepStats(), True))  # profiled
    assert not any(applies(on_gpu.with_decode_form(form), one, run) for form in ("fused", "streamed"))
    handoff = ex.with_decode_form("handoff")
    assert applies(handoff, one, run) and applies(handoff, four, run) and not applies(handoff, five, run)


def test_a_decode_step_launched_whole_with_every_host_expert_over_the_link_computes_the_same_model(split_model):
    """The handoff form with expert_compute "gpu": the link takes every host expert, the host CPU none."""
    want, _ = decoded(split_model("int4", "gpu"))
    model = handoff_model(split_model, "int4")
    got, stats = decoded(dataclasses.replace(model, executor=model.executor.with_expert_compute("gpu")))
    assert rel_err(got, want) < 1e-5
    assert stats.experts_on_host_cpu == 0 and stats.experts_fetched > 0
    assert any(what == "moe_layer" for what, *_ in stats.timeline)  # the handoff form's programs ran


def test_a_decode_step_launched_whole_compiles_one_program_for_all_its_moe_layers_and_every_step(split_model):
    """The handoff form's MoE layers all take one compiled program (for a number of rows): the first, given the
    dense layer's plain output, as the others, given their predecessor's terms, and in a later step with a cache
    that earlier programs wrote as in the first, whose cache was made on the host's side (a compile each is ~20 s
    at full size, offload.md run 45)."""
    model = handoff_model(split_model, "int8")
    decoded(model)
    decoded(model)
    assert model.executor.handoff_layers.program("moe", 1)._cache_size() == 1


@pytest.mark.parametrize("rows", [1, 3])
def test_a_decode_step_launched_whole_computes_the_same_model_from_experts_fetched_a_layer_early(split_model,
                                                                                               monkeypatch, rows):
    """The handoff form with the lookahead: each layer's program also hands over its guess at the next MoE layer's
    experts, and the host copies the likeliest of them a layer early into device buffers, from which the next layer
    copies those it chose. The step's hidden states are the streamed step's; every expert the link brought is one a
    layer chose or a guess, and guesses were used (at 3 rows, the row not in use guesses nothing)."""
    want, _ = decoded(split_model("int4", "gpu"), rows)
    model = handoff_model(split_model, "int4")
    model = dataclasses.replace(model, executor=model.executor.with_lookahead(2))
    layers, copied_from = model.executor.handoff_layers, []
    fill = layers.handoff.fill
    monkeypatch.setattr(layers.handoff, "fill", lambda copies, **kw: (copied_from.extend(np.asarray(copies)[:, 2]),
                                                                      fill(copies, **kw))[1])
    got, stats = decoded(model, rows)
    assert rel_err(got, want) < 1e-5
    early_buffers = {address for sources in layers.early(2) for address, _ in sources}
    assert early_buffers & {int(a) for a in copied_from}  # the next layer copied guesses from them
    guessing = len(model.executor.config.moe_layers) - 1  # every MoE layer but the last: at most 2 experts each
    assert 0 < stats.experts_early_used <= stats.experts_early <= 2 * guessing
    chosen = stats.experts_fetched - stats.experts_early + stats.experts_early_used  # the link's for chosen experts
    assert chosen + stats.experts_on_host_cpu + stats.experts_on_device == sum(
        int((c > 0).sum()) for c in stats.expert_counts.values())
    assert any(what == "fetch_early" for what, *_ in stats.timeline)


@pytest.mark.parametrize("failing,fill_apart", [("split", False), ("host_sum", False), ("host_sum", True)])
def test_a_step_whose_host_side_fails_midway_raises_that_and_the_next_step_is_right(split_model, monkeypatch,
                                                                                   failing, fill_apart):
    """A host-side failure in the handoff form (in the first MoE layer: its split, before any copy, or the host
    CPU's share, after them, or while another thread queues them) raises its own error, every program already
    launched runs to its end (its waits let through), and the next step is served from the right sequence numbers."""
    from ktjax.runtime.offload import handoff_step
    want, _ = decoded(split_model("int4", "gpu"))
    model = handoff_model(split_model, "int4", fill_apart=fill_apart)
    decoded(model)  # compiled
    handoff = model.executor.handoff_layers.handoff
    before = handoff.counters.copy()

    def fails(*args, **kwargs):
        raise MemoryError(f"{failing} failed")

    monkeypatch.setattr(handoff_step, failing, fails)
    with pytest.raises(MemoryError, match=f"{failing} failed"):
        decoded(model)
    monkeypatch.undo()
    n_moe = len(model.executor.config.moe_layers)
    np.testing.assert_array_equal(handoff.counters - before, [n_moe] * 3)  # each layer's three calls all ran
    got, _ = decoded(model)
    assert rel_err(got, want) < 1e-5


def test_a_serving_batch_takes_the_handoff_form_for_its_small_steps_and_samples_the_same_tokens(split_model):
    """A server's `DecodeBatch` of 4 slots with 1 and then 3 requests decoding (its steps bucketed to 1 and 4 rows,
    free rows not in use): the handoff form's steps sample the tokens the streamed form's do, and after the batch's
    warm-up they compile nothing (their programs do not vary with the routing)."""
    from ktjax.runtime.generation import SamplingOptions
    from ktjax.runtime.shapes import cache_length
    from ktjax.serve.batch import DecodeBatch

    prompts = [[5, 9, 13, 2], [3, 1, 4, 1, 5], [2, 7, 1]]
    tokens, ran, compiles, listening = {}, {}, [], [False]

    def on_event(event, seconds, **kw):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for form in ("streamed", "handoff"):
            model = handoff_model(split_model, "int4")
            model = dataclasses.replace(model, executor=model.executor.with_decode_form(form))
            batch = DecodeBatch(model, 4, cache_length(model.placement.max_context, 0))
            if form == "handoff":
                batch.warm_up()
                assert model.executor.compile_decode(4) == 0  # no fused or streamed program to warm up
            tokens[form], ran[form] = [], []
            for rows in (1, 3):
                steps = [batch.prefill_into(list(range(rows)), prompts[:rows], [SamplingOptions(8)] * rows)]
                for _ in range(3):
                    listening[0] = form == "handoff"
                    steps.append(batch.decode(np.arange(4) < rows)[:rows].tolist())
                    listening[0] = False
                    ran[form].append(any(what == "moe_layer" for what, *_ in batch.last_stats.timeline))
                tokens[form].append(steps)
    finally:
        listening[0] = False
    assert tokens["handoff"] == tokens["streamed"]
    assert all(ran["handoff"]) and not any(ran["streamed"])
    assert compiles == []
