"""Data-parallel fine-tuning (issue 16, items 3-5): a run on two devices, and a run of two processes
joined by `jax.distributed` on localhost, make the updates a one-device run makes with the same global
batch. The one-device step itself is checked against PEFT in torch (test_lora's gradient test).

Both runs go through `ktjax finetune` in fresh processes: the CPU backend's device count
(XLA_FLAGS=--xla_force_host_platform_device_count) and jax.distributed are fixed when JAX starts.
Equal results would also come from every device computing every row; the compiled two-device step
of a dense layer shows the rows stay split and the gradients cross devices once (an all-reduce).

Tolerance: float32. The devices sum their own rows' losses and gradients and the all-reduce adds
the partial sums, so the additions run in another order than on one device: the results agree to a
few roundings of those sums (relative 1e-7 each), not bit for bit. rtol 1e-5 / atol 1e-6 leaves
margin for that while staying four orders of magnitude below one step's change of the adapters
(lr 1e-2); and the adapters must have moved by more than that.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import ktjax
from ktjax.cli.main import main as cli_main
from ktjax.train import distributed
from reference import make_reference, save_reference
from tokenizer_fixtures import vocab_size, write_tokenizer

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b\n"},
    {"text": "Once upon a time there was a tiny model."},
]
# Rows of each micro-batch split over two devices; dropout on (its random bits must not depend on the
# split); a held-out set (evaluated with split rows too); two steps, so the second sees the first's update.
RUN = dict(rank=2, alpha=4, dropout=0.1, lr=1e-2, steps=2, batch_size=4, grad_accum=2, seq_len=32, warmup=0,
           targets=("attention", "shared_experts"), seed=2, thinking=False, progress=False)
CLI_RUN = ["--dtype", "float32", "--rank", "2", "--alpha", "4", "--dropout", "0.1", "--lr", "1e-2", "--steps", "2",
           "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--warmup", "0", "--targets",
           "attention,shared_experts", "--seed", "2", "--no-thinking"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dense and a MoE layer with a tokenizer, the data, and the one-device run's adapter, losses and
    checkpoints (after steps 1 and 2)."""
    root = tmp_path_factory.mktemp("dp")
    ref = make_reference("v3", seed=6, num_hidden_layers=2, first_k_dense_replace=1, vocab_size=vocab_size())
    ckpt = save_reference(ref, root / "model")
    write_tokenizer(ckpt)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS), encoding="utf-8")
    one = ktjax.finetune(ktjax.load(ckpt, dtype="float32"), data, output=root / "one", eval_data=data, save_every=1,
                         **RUN)
    return ckpt, data, root, one


def ktjax_cli(log, *args, env_extra: dict | None = None) -> subprocess.Popen:
    """`ktjax finetune ARGS` in a fresh process, its output going to the file `log` (a pipe left unread
    could fill and stall it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "ktjax.cli.main", "finetune", *map(str, args)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def finished(procs: list[subprocess.Popen], logs: list) -> list[str]:
    """Each process's output once all exited successfully; the first failure (or the time limit) ends the
    others, which would otherwise wait for their peer until jax.distributed's own timeout."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, "a process failed or ran out of time"
            time.sleep(0.2)
        assert all(p.returncode == 0 for p in procs), "a process failed"
    except AssertionError as e:
        raise AssertionError(f"{e}:\n" + "\n".join(f"-- {log}:\n{open(log).read()[-3000:]}" for log in logs)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [open(log).read() for log in logs]


def assert_same_run(output, one) -> None:
    with open(os.path.join(output, "finetune_summary.json")) as f:
        summary = json.load(f)
    losses = [h["loss"] for h in summary["history"]]
    np.testing.assert_allclose(losses, [h["loss"] for h in one.history], rtol=1e-5)
    assert summary["eval_loss"] == pytest.approx(one.eval_loss, rel=1e-5)
    want = load_file(os.path.join(one.output, "adapter_model.safetensors"))
    got = load_file(os.path.join(output, "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The comparison means something: two steps moved the adapters (lora_B starts at zero) well beyond it.
    moved = max(float(np.abs(v).max()) for k, v in want.items() if "lora_B" in k)
    assert moved > 1e-3, moved


def test_two_devices_make_the_one_device_updates(setup):
    ckpt, data, root, one = setup
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    log = root / "two.log"
    [err] = finished([ktjax_cli(log, "--model", ckpt, "--data", data, "--eval-data", data, "--output", root / "two",
                                "--devices", 2, *CLI_RUN, env_extra={"XLA_FLAGS": flags})], [log])
    assert "adapter written to" in err
    assert_same_run(root / "two", one)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_make_the_one_device_updates(setup):
    """Two processes of one CPU device each, joined through a coordinator on localhost: the mesh
    spans both, each places its own rows; process 0 alone writes the adapter and speaks. Process 0's
    output holds the one-device run's checkpoint of step 1: it resumes there and sends the state to
    process 1, whose output has none (no shared file system), and they make step 2 together."""
    ckpt, data, root, one = setup
    shutil.copytree(root / "one" / "checkpoints", root / "process0" / "checkpoints")
    shutil.rmtree(root / "process0" / "checkpoints" / "2")
    port = free_port()
    logs = [root / f"process{i}.log" for i in range(2)]
    procs = [ktjax_cli(logs[i], "--model", ckpt, "--data", data, "--eval-data", data, "--output", root / f"process{i}",
                       "--coordinator", f"localhost:{port}", "--num-processes", 2, "--process-id", i, *CLI_RUN)
             for i in range(2)]
    errs = finished(procs, logs)
    assert "adapter written to" in errs[0]
    assert f"finetune: resuming {root / 'process0' / 'checkpoints'} at step 1 of 2\n" in errs[0], errs[0][-2000:]
    assert_same_run(root / "process0", one)
    # Process 1 trained (its device took half of every batch) but wrote nothing and said nothing of the run.
    assert not (root / "process1").exists()
    assert "finetune:" not in errs[1] and "adapter written" not in errs[1], errs[1][-2000:]


def test_cluster_options_and_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.cluster_from(environ={}) is None
    assert distributed.cluster_from(environ=env) == distributed.Cluster("10.0.0.1:1234", 4, 3)
    assert distributed.cluster_from("host:9", 2, 0, environ=env) == distributed.Cluster("host:9", 2, 0)
    for args, message in [(("host:9", None, 0), "--coordinator needs --num-processes and --process-id"),
                          ((None, 2, 1), "need --coordinator HOST:PORT"),
                          (("host", 2, 1), "expected HOST:PORT"),
                          (("host:9", 2, 2), r"--process-id must be in 0\.\.1, got 2")]:
        with pytest.raises(ValueError, match=message):
            distributed.cluster_from(*args, environ={})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x': expected an integer"):
        distributed.cluster_from(environ={**env, "JAX_PROCESS_ID": "x"})


def test_cluster_option_errors_are_one_line_before_anything_runs(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(CONVERSATIONS[0]) + "\n")
    assert cli_main(["finetune", "--data", str(data), "--output", str(tmp_path / "out"), "--coordinator", "h:1",
                     "--num-processes", "2"]) == 1
    assert capsys.readouterr().err == ("ktjax: error: --coordinator needs --num-processes and --process-id (or "
                                       "JAX_NUM_PROCESSES, JAX_PROCESS_ID)\n")
    assert not (tmp_path / "out").exists()


# On two devices: the compiled step of a one-layer dense model keeps each device's rows where they are and
# adds the gradients (with the loss sum and target count) in one all-reduce, nothing else crossing; and the
# runs that cannot split say so in one line.
TWO_DEVICES = """
import collections, re, sys
import jax, numpy as np, optax, ktjax
from ktjax.lora.config import LoRAConfig
from ktjax.lora.modules import init_adapters, lora_graph
from ktjax.train import distributed as D
from ktjax.train.resident import make_train_step
ckpt, dense_ckpt, data, out = sys.argv[1:]

dense = ktjax.load(dense_ckpt, dtype="float32")
lcfg = LoRAConfig(rank=2, targets=("o_proj",))
graphdef, _ = lora_graph(dense.config, dense.dtype, lcfg, attention="reference")
mesh, tx = D.data_mesh(2), optax.adamw(1e-3)
adapters, rows = D.replicate(init_adapters(dense.config, lcfg, 0), mesh), D.micro_batches(mesh)
step = make_train_step(graphdef, tx, mesh=mesh)
hlo = step.lower(adapters, D.replicate(tx.init(adapters), mesh), D.replicate(dense.executor.base_params, mesh),
                 D.put_global(np.zeros((1, 4, 16), np.int32), rows), D.put_global(np.ones((1, 4, 16), bool), rows),
                 jax.random.key(0)).compile().as_text()
print([line.split("=")[1].split("{")[0].strip() for line in hlo.splitlines()
       if "parameter(" in line and 'op_name="tokens_MBT"' in line])
print(dict(collections.Counter(re.findall(r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                                          r"(?:-start)?[(]", hlo))))

run = dict(steps=1, seq_len=32, thinking=False, progress=False, targets=("o_proj",))
model = ktjax.load(ckpt, dtype="float32", placement={r"model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+": "host"},
                   max_context=32)
for kwargs in [dict(batch_size=3, devices=2), dict(batch_size=2, devices=2)]:
    try:
        ktjax.finetune(model, data, output=out, **run, **kwargs)
    except ValueError as e:
        print(e)
"""


def test_two_devices_split_rows_reduce_gradients_and_refuse_what_does_not_split(setup, tmp_path):
    ckpt, data, _, _ = setup
    with pytest.raises(ValueError, match=r"devices=2: this run has 1 device\(s\)"):
        ktjax.finetune(ckpt, data, output=tmp_path / "x", **RUN, devices=2)
    dense = save_reference(make_reference("v3", seed=4, num_hidden_layers=1, first_k_dense_replace=1, vocab_size=64),
                           tmp_path / "dense")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES, ckpt, dense, data, tmp_path / "y"], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "['s32[1,2,16]']",  # [micro-batches, rows, tokens]: two of the four rows on each device
        "{'all-reduce': 1}",
        "batch_size=3 rows do not split over 2 devices; use a multiple of 2 (it is the global micro-batch: each "
        "device takes batch_size / devices)",
        "data-parallel fine-tuning over 2 devices needs every parameter on the device (a resident model); this model "
        "keeps routed experts in host memory: train it on one device (devices=1, --devices 1)"]
