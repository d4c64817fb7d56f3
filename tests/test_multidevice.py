"""Expert parallelism (issue 16): the routed experts split over 1, 2 and 4 devices compute what one
device computes. The devices are XLA's forced host-platform CPU devices, which exist only when
XLA_FLAGS says so before jax starts: one subprocess (tests/multidevice_worker.py) does every run
on devices, and these tests check what it wrote."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import ktjax
from ktjax.cli.main import main
from reference import make_reference, reference_greedy, reference_logits, save_reference

HERE = os.path.dirname(os.path.abspath(__file__))
# The resident executor's shard_map over 1, 2 and 4 devices, the offloaded executor on 2 and 4 (the worker's RUNS).
MULTI = ("mesh1", "devices2", "devices4", "offload2", "offload4")


def rel_err(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = make_reference("v3", seed=21)  # 8 routed experts: 4, 2 and 1 per device
    return ref, save_reference(ref, tmp_path_factory.mktemp("multidevice"))


@pytest.fixture(scope="module")
def runs(reference, tmp_path_factory):
    _, path = reference
    out = os.path.join(tmp_path_factory.mktemp("runs"), "runs.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multidevice_worker.py"), path, out], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = np.load(out)
    assert int(r["devices"]) == 4
    return r


@pytest.mark.parametrize("run", MULTI)
def test_prefill_and_decode_logits_equal_one_device(runs, run):
    for what in ("prefill", "decode"):  # decode: one token at a time through the KV cache
        assert runs[f"{run}/{what}"].shape == runs[f"single/{what}"].shape
        assert rel_err(runs[f"{run}/{what}"], runs[f"single/{what}"]) < 1e-5, what


def test_greedy_tokens_equal_one_device_and_transformers(runs, reference):
    ref, _ = reference
    single = runs["single/greedy"].tolist()
    assert single == reference_greedy(ref, runs["tokens"][0, :5].tolist(), 8)
    for run in MULTI:
        assert runs[f"{run}/greedy"].tolist() == single, run


@pytest.mark.parametrize("run", ("single",) + MULTI)
def test_a_serving_batch_decodes_as_generate_does_on_every_layout(runs, run):
    """One request in slot 1 of a serving batch of 2 (its rows taken out of the mesh-replicated cache for a
    batch of one, and put back) continues as `ktjax.generate` on one device does."""
    assert runs[f"{run}/served"].tolist() == runs["single/greedy"].tolist()


def test_four_devices_match_transformers(runs, reference):
    ref, _ = reference
    assert rel_err(runs["devices4/prefill"], reference_logits(ref, runs["tokens"])) < 1e-4


@pytest.mark.parametrize("run,n", [("devices2", 2), ("devices4", 4)])
def test_each_device_holds_only_its_own_block_of_experts_and_all_of_the_core(runs, run, n):
    shards = runs[f"{run}/expert_shards"]  # device, first expert, count
    assert sorted(shards[:, 0].tolist()) == list(range(n))
    assert sorted(shards[:, 1:].tolist()) == [[d * 8 // n, 8 // n] for d in range(n)]
    assert runs[f"{run}/core_shards"].tolist() == [[d, 97] for d in range(n)]  # replicated: every row everywhere
    assert int(runs[f"{run}/plan_devices"]) == n


def test_offloaded_experts_live_on_or_behind_their_owner_only(runs):
    for run, n in (("offload2", 2), ("offload4", 4)):
        rows = runs[f"{run}/expert_shards"]  # store, layer, expert, device id, in host memory
        assert sorted(set(rows[:, 1])) == [1, 2]
        for store, layer, e, device, hosted in rows.tolist():
            assert store == device == e // (8 // n), (run, layer, e)
            assert hosted == (run == "offload2" or e <= 4), (run, layer, e)
        assert len(rows) == 2 * 8  # each expert in exactly one store
        assert runs[f"{run}/streamed_per_step"] > 0  # decode really streamed host experts
        assert runs[f"{run}/core_shards"].tolist() == [[d, 97] for d in range(n)]


def test_expert_weights_never_move_between_devices(runs):
    """The compiled prefill on 2 devices combines the experts' shares with an all-reduce and holds no
    other collective: tokens go to the experts, the experts' weights are never gathered."""
    assert json.loads(str(runs["devices2/collectives"])) == ["all-reduce"]


def test_errors_are_one_clear_line(runs):
    errors = json.loads(str(runs["errors"]))
    expected = {
        "more_than_here": "devices=8: only 4 cpu device(s) here",
        "not_dividing": "devices=3 does not divide the 8 routed experts",
        "no_expert_axis": "axis named 'expert', and this mesh has none",
        "other_axis": "mesh axes {'data': 2}: inference splits the routed experts over 'expert' only",
        "both": "give devices=N or mesh=..., not both",
        "host_cpu": "expert_compute='cpu' on 2 devices",
    }
    errors["trainer"] = str(runs["devices2/trainer_error"])
    errors["offloaded_trainer"] = str(runs["offload2/trainer_error"])
    expected["trainer"] = "fine-tuning a model whose experts are split over 2 devices is not built yet"
    expected["offloaded_trainer"] = "fine-tuning with routed experts in host memory runs on one device"
    for case, phrase in expected.items():
        assert phrase in errors[case], (case, errors[case])
        assert "\n" not in errors[case]


def test_one_device_is_the_ordinary_path():
    model = ktjax.load(None, devices=1)
    assert model.executor.mesh is None and model.placement.devices == 1
    assert "split over" not in str(model.placement)


def test_info_shows_the_plan_per_device(reference, capsys):
    _, path = reference
    assert main(["info", "--model", path, "--devices", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^routed_experts \(16, float32\)\s+4 devices ", out, re.MULTILINE)
    assert re.search(r"^embeddings\s+each device ", out, re.MULTILINE)
    for d in range(4):
        assert f"\n{d:<8}{f'{2 * d}-{2 * d + 1} of 2 layers':<24}" in out
    # A budget per device with room for 3 of each device's 8 experts (beyond the fixed bytes and the
    # allocator's 256 MiB reserve): the other 5 stay behind it in host memory.
    roomy = ktjax.plan_placement(path, dtype="float32", devices=2, gpu_memory="1GiB")
    fixed = roomy.device_bytes - len(roomy.device_experts_of(0)) * roomy.expert_bytes
    budget = fixed + (256 << 20) + 3 * roomy.expert_bytes
    plan = ktjax.plan_placement(path, dtype="float32", devices=2, gpu_memory=budget)
    for d in range(2):
        owned = {(i, e) for i in plan.config.moe_layers for e in range(4 * d, 4 * d + 4)}
        assert plan.device_experts_of(d) | plan.host_experts_of(d) == owned
        assert len(plan.device_experts_of(d)) == 3 and len(plan.host_experts_of(d)) == 5
    assert main(["info", "--model", path, "--dtype", "float32", "--devices", "2", "--gpu-memory", str(budget)]) == 0
    out = capsys.readouterr().out
    assert "\n0       0-3 of 2 layers" in out and "3 (72.00 KiB)        5 (120.00 KiB)" in out
    assert "host experts: streamed to the device that owns them" in out
    with pytest.raises(ValueError, match="devices=3 does not divide the 8 routed experts"):
        ktjax.plan_placement(path, devices=3)
