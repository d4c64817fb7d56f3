"""LoRA fine-tuning end to end on a tiny random checkpoint (CPU, float32): the loss falls, the base
weights stay bit-for-bit unchanged, an interrupted run resumes exactly, data errors name the line,
the CLI writes a PEFT adapter and `ktjax merge` gives the adapted model's logits."""

import argparse
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import ktjax
from ktjax import finetune
from ktjax.cli import finetune as finetune_command
from ktjax.cli import merge as merge_command
from ktjax.cli.main import main as cli_main
from ktjax.experts.weights import ExpertFormat, float_expert
from ktjax.lora.config import LoRAConfig, flatten, resolve_sites
from ktjax.lora.modules import init_adapters, lora_graph
from ktjax.runtime.model import StepStats
from ktjax.text import load_tokenizer
from ktjax.train import data as D
from ktjax.train.config import TrainConfig
from ktjax.train.resident import make_train_step
from reference import make_reference, save_reference
from tokenizer_fixtures import vocab_size, write_tokenizer

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b\n"},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again!"}]},
]
# The shape test_lora's logits use (same model config): forward passes compile once for both files.
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 9))
# One configuration for the runs below, so they share the compiled step.
RUN = dict(rank=4, alpha=8, dropout=0.05, lr=2e-2, thinking=False, steps=12, batch_size=2, grad_accum=2, seq_len=64, warmup=2,
           targets=("attention", "shared_experts"), seed=3, progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = save_reference(make_reference("v3", seed=11, vocab_size=vocab_size()), tmp_path_factory.mktemp("m"))
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A one-layer dense model: the step-level tests compile fast."""
    ref = make_reference("v3", seed=4, num_hidden_layers=1, first_k_dense_replace=1, vocab_size=64)
    return save_reference(ref, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def runs(ckpt, data_file, tmp_path_factory):
    """An uninterrupted run, and the same run stopped (Ctrl-C) after step 5 and resumed."""
    model = ktjax.load(ckpt, dtype="float32")
    before = [np.array(x) for x in jax.tree.leaves(model.executor.params)]
    full = finetune(model, data_file, output=tmp_path_factory.mktemp("full"), **RUN)

    out = tmp_path_factory.mktemp("resumed")

    def stop(metrics):
        if metrics["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, data_file, output=out, callback=stop, save_every=100, **RUN)
    resumed = finetune(model, data_file, output=out, **RUN)
    return model, before, full, resumed


def test_loss_falls_on_a_memorisation_set(runs):
    _, _, full, _ = runs
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 12 and full.steps == 12
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
    assert all(h["tokens_per_s"] > 0 and h["seq_len"] in D.length_buckets(64) for h in full.history)


def test_base_weights_stay_bit_for_bit_unchanged(runs):
    model, before, _, _ = runs
    after = jax.tree.leaves(model.executor.params)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_resumed_run_continues_identically(runs):
    _, _, full, resumed = runs
    assert resumed.start_step == 5 and resumed.steps == 12
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (p, a), (_, b) in zip(sorted(flatten(full.adapters).items()), sorted(flatten(resumed.adapters).items())):
        np.testing.assert_array_equal(a, b, err_msg=str(p))


def test_exported_adapter_reloads_as_the_trained_model(runs):
    model, _, full, _ = runs
    tokens = TOKENS
    trained = ktjax.logits(ktjax.apply_adapter(model, full.adapters, full.lora), tokens)
    assert not np.allclose(trained, ktjax.logits(model, tokens), atol=1e-3)
    np.testing.assert_allclose(ktjax.logits(ktjax.load_adapter(model, full.output), tokens), trained, atol=1e-5)
    with open(f"{full.output}/finetune_summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 12 and summary["lora"]["rank"] == 4


def test_cli_finetune_then_merge_gives_the_adapted_logits(runs, ckpt, data_file, tmp_path):
    model, _, full, _ = runs
    parser = argparse.ArgumentParser(prog="ktjax")
    sub = parser.add_subparsers(dest="command")
    finetune_command.add_parser(sub)
    merge_command.add_parser(sub)
    out = tmp_path / "adapter"
    args = parser.parse_args(["finetune", "--model", ckpt, "--data", str(data_file), "--output", str(out),
                              "--dtype", "float32", "--rank", "4", "--alpha", "8", "--dropout", "0.05", "--lr", "2e-2", "--no-thinking",
                              "--steps", "12", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "64",
                              "--warmup", "2", "--targets", "attention,shared_experts", "--seed", "3"])
    assert args.func(args) == 0
    adapted = ktjax.load_adapter(model, out)
    tokens = TOKENS
    # Same data, seed and settings as the API run: the same adapter.
    np.testing.assert_allclose(ktjax.logits(adapted, tokens), ktjax.logits(ktjax.apply_adapter(model, full.adapters, full.lora), tokens), atol=1e-6)

    args = parser.parse_args(["merge", "--model", ckpt, "--adapter", str(out), "--output", str(tmp_path / "merged")])
    assert args.func(args) == 0
    merged = ktjax.load(tmp_path / "merged")
    assert merged.tokenizer is not None
    got, want = ktjax.logits(merged, tokens), ktjax.logits(adapted, tokens)
    assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 1e-5


def test_gradient_accumulation_equals_one_larger_batch(small):
    """M micro-batches of B rows give the update of one batch of M*B rows (token-weighted mean)."""
    model = ktjax.load(small, dtype="float32")
    lcfg = LoRAConfig(rank=2, targets=("q_b_proj", "o_proj"))
    graphdef, _ = lora_graph(model.config, model.dtype, lcfg)
    adapters = jax.tree.map(lambda x: x + 0.01, init_adapters(model.config, lcfg, 0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (2, 16)).astype(np.int32)
    mask = np.zeros((2, 16), bool)
    mask[0, 3:] = True
    mask[1, 10:] = True  # different target counts per row: a plain mean of micro-batch means would differ
    step = make_train_step(graphdef, optax.sgd(1.0), loss_chunk=8)
    key = jax.random.key(0)
    one, _, m1 = step(adapters, optax.sgd(1.0).init(adapters), model.executor.base_params, tokens[None], mask[None], key)
    two, _, m2 = step(adapters, optax.sgd(1.0).init(adapters), model.executor.base_params, tokens[:, None], mask[:, None], key)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_adapters(small):
    model = ktjax.load(small, dtype="bfloat16")
    lcfg = LoRAConfig(rank=2, targets=("kv_b_proj", "o_proj"))
    graphdef, _ = lora_graph(model.config, model.dtype, lcfg)
    adapters = jax.tree.map(jnp.asarray, init_adapters(model.config, lcfg, 0))
    tx = optax.adamw(1e-3)
    tokens = np.arange(16, dtype=np.int32).reshape(1, 1, 16)
    new, opt, m = make_train_step(graphdef, tx)(adapters, tx.init(adapters), model.executor.base_params, tokens,
                                                np.ones_like(tokens, bool), jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_bad_data_lines_name_the_file_and_line(ckpt, tmp_path):
    tok = load_tokenizer(ckpt)
    good = json.dumps(CONVERSATIONS[0])
    cases = {
        '{"messages": [oops': r"bad\.jsonl:3: not valid JSON",
        '{"messages": [{"role": "user", "content": "hi"}]}': r"bad\.jsonl:3: no assistant message",
        '{"messages": [{"role": "robot", "content": "hi"}]}': r"bad\.jsonl:3: message 0 has role 'robot'",
        '{"prompt": "a", "completion": 3}': r"bad\.jsonl:3: 'completion' must be a string",
        '{"input": "a"}': r"bad\.jsonl:3: expected 'messages', 'prompt'/'completion' or 'text'",
        "[1, 2]": r"bad\.jsonl:3: expected a JSON object",
    }
    for line, pattern in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=pattern):
            D.load_dataset(f, tok, seq_len=64)
    with pytest.raises(ValueError, match=r"data\[1\]: 'messages' must be a non-empty list"):
        D.load_dataset([CONVERSATIONS[0], {"messages": []}], tok, seq_len=64)
    with pytest.raises(ValueError, match="missing.jsonl: cannot read data file"):
        D.load_dataset(tmp_path / "missing.jsonl", tok, seq_len=64)


def test_loss_mask_covers_only_the_responses(ckpt):
    tok = load_tokenizer(ckpt)
    # R1's template: each assistant turn its own example, its context exactly what chat feeds the model.
    first, second = D.encode_record(CONVERSATIONS[3], tok)
    assert tok.decode(first.ids[first.mask]) == "\n</think>\n\nHi!<｜end▁of▁sentence｜>"
    assert tok.decode(second.ids[~second.mask]) == tok.apply_chat_template(CONVERSATIONS[3]["messages"][:3])
    assert tok.decode(second.ids[second.mask]) == "\n</think>\n\nHi again!<｜end▁of▁sentence｜>"
    [ex] = D.encode_record(CONVERSATIONS[2], tok)
    assert tok.decode(ex.ids[ex.mask]) == "\n    return a + b\n<｜end▁of▁sentence｜>"
    assert ex.ids[0] == tok.bos_token_id and not ex.mask[0]


def test_loader_is_seeded_shuffled_and_bucketed(ckpt):
    tok = load_tokenizer(ckpt)
    ds = D.load_dataset(CONVERSATIONS * 3, tok, seq_len=100, eval_fraction=0.25, seed=1, thinking=False)
    assert len(ds.eval) == 3 and len(ds.train) == 9
    loader = D.Loader(ds.train, batch_size=2, grad_accum=2, seq_len=100, seed=1, pad_id=1)
    assert D.length_buckets(100) == (32, 64, 100)
    b = loader.batch(3)
    assert b.tokens.shape[:2] == (2, 2) and b.tokens.shape[2] in (32, 64, 100)
    again = D.Loader(ds.train, batch_size=2, grad_accum=2, seq_len=100, seed=1, pad_id=1).batch(3)
    np.testing.assert_array_equal(b.tokens, again.tokens)
    # Each epoch visits every example once, in a new order.
    epoch = [i for s in range(0, 9, 1) for i in loader.indices(s)][:9 * 4]
    assert sorted(epoch[:9]) == list(range(9)) and epoch[:9] != epoch[9:18]
    assert loader.position(5) == {"examples_seen": 20, "epoch": 2, "index": 2}


def test_offloaded_model_trains_with_experts_streamed_from_host(ckpt, data_file, tmp_path, capsys):
    """Routed experts in host memory: each step streams them forward and backward; the adapter
    exports like any other and loads (merged) into the offloaded model for inference."""
    model = ktjax.load(ckpt, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                       max_context=64)
    assert model.placement.offloaded
    # Same adapters and shapes as test_lora's gradient test (per-layer segments compiled once).
    r = finetune(model, data_file, output=tmp_path, rank=3, alpha=6, targets=("attention", "shared_experts",
                 "dense_mlp"), steps=4, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_data=data_file,
                 eval_every=2, progress=False)
    assert "examples cut to seq_len=32" in capsys.readouterr().err
    assert r.steps == 4 and all(np.isfinite(h["loss"]) for h in r.history)
    assert all(h["host_bytes"] == 2 * 2 * 8 * 3 * 32 * 64 * 4 for h in r.history)
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    evals = [h["eval_loss"] for h in r.history if "eval_loss" in h]  # the held-out loss, every 2 steps
    assert len(evals) == 2 and r.eval_loss == evals[-1] and np.isfinite(evals).all()
    # Loading the adapter into an offloaded model merges it into the per-layer device weights, as a
    # resident merge does (the offloaded forward itself is tested against the resident one elsewhere).
    adapted = ktjax.load_adapter(model, tmp_path)
    resident = dict(nnx.to_flat_state(ktjax.load_adapter(ktjax.load(ckpt, dtype="float32"), tmp_path,
                                                          merge=True).executor.params))
    for i, j, group, path in [(0, 0, "dense_layers", ("mlp", "up_proj", "weight")),
                              (2, 1, "moe_layers", ("self_attn", "kv_b_proj", "weight")),
                              (1, 0, "moe_layers", ("mlp", "shared_experts", "down_proj", "weight"))]:
        got = adapted.executor.layers[i]
        for p in path:
            got = got[p]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(resident[(group, *path)][...][j]))
        assert not np.array_equal(np.asarray(got), np.asarray(_base_layer(model, i, path)))  # it did change


def test_offloaded_micro_batches_share_each_expert_transfer(ckpt):
    """Gradient accumulation on an offloaded model runs the micro-batches through each layer
    together: the step moves the host experts as often as one micro-batch does (twice), and sums
    the same gradients as the micro-batches taken one at a time. The layer inputs saved for the
    backward pass wait in host memory."""
    model = ktjax.load(ckpt, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                       max_context=64)
    lcfg = LoRAConfig(rank=2, targets=("attention",))
    sites = resolve_sites(model.config, lcfg.targets)
    adapters = jax.tree.map(lambda x: jnp.asarray(x) + 0.01, init_adapters(model.config, lcfg, 0, sites))
    trainer = model.executor.trainer(lcfg, sites, TrainConfig())
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 97, (3, *TOKENS.shape))
    mask = rng.random(tokens.shape) < 0.7

    _, (saved, _, _) = trainer.forward(trainer.per_layer(adapters), list(jnp.asarray(tokens)), [None] * 3, StepStats())
    assert len(saved) == 3 and {x.sharding.memory_kind for layer in saved for x in layer} == {"pinned_host"}

    s, n, grads, stats = trainer.micro_loss_and_grads(adapters, tokens, mask, None)
    together = stats.bytes_from_host
    one_by_one = []
    for t, mk in zip(tokens, mask):
        one_by_one.append(trainer.micro_loss_and_grads(adapters, t[None], mk[None], None))
        assert one_by_one[-1][3].bytes_from_host == together
    assert together == 2 * 2 * 8 * 3 * 32 * 64 * 4  # two MoE layers of 8 experts, forward and backward
    np.testing.assert_allclose(float(s), sum(float(r[0]) for r in one_by_one), rtol=1e-6)
    assert float(n) == sum(float(r[1]) for r in one_by_one)
    summed = jax.tree.map(lambda *g: sum(np.asarray(x) for x in g), *[r[2] for r in one_by_one])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(summed)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)


def _base_layer(model, i, path):
    node = model.executor.layers[i]
    for p in path:
        node = node[p]
    return node


def _matmul_operand_dtypes(jaxpr) -> list[tuple]:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars[:2]))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                if hasattr(sub, "eqns"):
                    out += _matmul_operand_dtypes(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += _matmul_operand_dtypes(sub.jaxpr)
    return out


@pytest.mark.parametrize("block", ["linear", "offloaded experts", "gathered experts", "sorted experts"])
def test_bfloat16_backward_matmuls_stay_bfloat16(block):
    # A float32 cotangent meeting a bf16 weight makes XLA upcast the weight and run a float32 matmul
    # (measured on the H200: over half of an expert chunk's backward). Small float32 x float32
    # combines of activations (routing weights) are fine.
    from ktjax.models.layers import linear
    from ktjax.models.moe import experts_gathered, experts_sorted
    from ktjax.experts.device import experts_segment
    bf16 = jnp.bfloat16
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 8)), bf16)
    w = jnp.asarray(rng.normal(size=(3, 4, 16, 8)), bf16)  # [E, 3, F, D]
    idx = jnp.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]], jnp.int32)
    wts = jnp.full((6, 2), 0.5, jnp.float32)
    gate, up, down = w[:, 0], w[:, 1], jnp.swapaxes(w[:, 2], 1, 2)
    f = {"linear": lambda x: linear(x, w[0, 0]),
         "offloaded experts": lambda x: experts_segment.__wrapped__(
             None, x, wts, idx, jnp.arange(4, dtype=jnp.int32),
             tuple(float_expert(w[e, 0], w[e, 1], w[e, 2].T, ExpertFormat("bf16", 16, 8)) for e in range(4)),
             capacity=4),
         "gathered experts": lambda x: experts_gathered(x, wts, idx, gate, up, down),
         "sorted experts": lambda x: experts_sorted(x, wts, idx, gate, up, down)}[block]
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: f(x).astype(jnp.float32).sum()))(x).jaxpr
    pairs = _matmul_operand_dtypes(jaxpr)
    assert pairs.count(("bfloat16", "bfloat16")) >= 2 and all(a == b for a, b in pairs), pairs


# -- Ctrl-C at every point of a step ----------------------------------------------------------------
#
# A checkpoint must hold exactly the state of the step it names, wherever in a step the interrupt
# lands. The points are found, not guessed: a line tracer (sys.settrace, deterministic) lists every
# line ktjax.train executes during step 2 of a run (drawing the batch, dispatching the step, waiting
# on its loss, committing the state, logging, writing the checkpoint, the callback) and points spread
# over orbax's writing of the checkpoint; the run is then repeated with a real SIGINT delivered at
# each point (and, where the first one is deferred to the end of the step, a second SIGINT there,
# which stops at once), resumed, and compared with the uninterrupted run.

INTERRUPT_RUN = dict(rank=2, alpha=4, dropout=0.1, lr=1e-2, steps=3, batch_size=1, grad_accum=2, seq_len=32,
                     warmup=0, save_every=2, targets=("q_b_proj", "o_proj"), seed=1, thinking=False, progress=False)
TRAIN_DIR = os.path.dirname(os.path.abspath(ktjax.train.finetune.__file__)) + os.sep
ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep
ORBAX_POINTS = 6  # orbax runs ~8k lines writing a checkpoint: that many of them, evenly spread
# The loop, its state changes and checkpoints, the step (drawing a batch, in data.py, is one point:
# the loop's line that calls it).
TRACED = {"finetune.py", "progress.py", "checkpoints.py", "resident.py", "offloaded.py"}


class StepTracer:
    """Follows the lines executed in ktjax.train (and orbax) while step `step` runs, from the end of
    the previous step's callback to the end of its own. Records them as points (file, line, n-th
    time), or at one point delivers `presses` SIGINTs, as a terminal's Ctrl-C does. Tracing starts
    in the callback (as pdb.set_trace does), so the steps before run at full speed."""

    def __init__(self, step: int, point: tuple | None = None, presses: int = 1):
        self.step, self.point, self.presses = step, point, presses
        self.armed = False
        self.seen: dict[tuple, int] = {}
        self.points: list[tuple] = []  # (file, line, n, SIGINT deferred there)
        self.fired = False

    def callback(self, metrics: dict) -> None:
        self.armed = metrics["step"] == self.step - 1
        if self.armed:
            frame = sys._getframe().f_back
            while frame is not None:
                if self._traced(frame.f_code.co_filename):
                    frame.f_trace = self._line
                frame = frame.f_back
            sys.settrace(self._global)
        else:
            sys.settrace(None)

    def _traced(self, file: str) -> bool:
        return file.startswith(TRAIN_DIR) and os.path.basename(file) in TRACED or file.startswith(ORBAX_DIR)

    def _global(self, frame, event, arg):
        return self._line if self._traced(frame.f_code.co_filename) else None

    def _line(self, frame, event, arg):
        if event != "line" or not self.armed or self.fired:
            return self._line
        where = (frame.f_code.co_filename, frame.f_lineno)
        n = self.seen[where] = self.seen.get(where, 0) + 1
        if self.point is None:
            self.points.append((*where, n, signal.getsignal(signal.SIGINT) is not signal.default_int_handler))
        elif (*where, n) == self.point:
            self.fired = True
            for _ in range(self.presses):
                signal.raise_signal(signal.SIGINT)  # the handler in force runs here, as for a real Ctrl-C
        return self._line

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, callback=self.callback, **kwargs)
        finally:
            sys.settrace(None)


def points_to_interrupt(recorded: list[tuple]) -> list[tuple[tuple, int]]:
    """(point, presses): two presses at every point where a first press is deferred (the second
    stops at once there); one press at every other point and at both ends of each deferred stretch
    (inside it a first press only raises a flag, so its ends stand for it). Orbax's ~8k lines
    writing the checkpoint: a spread of them."""
    ours = [p for p in recorded if p[0].startswith(TRAIN_DIR)]
    theirs = [p for p in recorded if p[0].startswith(ORBAX_DIR)]
    points = ours + theirs[::max(1, len(theirs) // ORBAX_POINTS)][:ORBAX_POINTS]
    edges = [p for k, p in enumerate(ours) if not p[3] or not (0 < k < len(ours) - 1 and ours[k - 1][3]
                                                                and ours[k + 1][3])]
    return [(p[:3], 1) for p in edges] + [(p[:3], 2) for p in points if p[3]]


@pytest.fixture(scope="module")
def interrupt_model(tmp_path_factory):
    """One dense layer and a tokenizer: a step compiles in seconds and runs in milliseconds."""
    ref = make_reference("v3", seed=4, num_hidden_layers=1, first_k_dense_replace=1, vocab_size=vocab_size())
    path = save_reference(ref, tmp_path_factory.mktemp("one_layer"))
    write_tokenizer(path)
    return ktjax.load(path, dtype="float32")


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal, however pytest was started: a shell starts a
    background job (`pytest &`, nohup) with SIGINT ignored, and Python then installs no handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def resumed_differently(model, tmp_path, choose_points) -> tuple[list[str], set[int]]:
    """Runs INTERRUPT_RUN whole, then once per point chosen from its step-2 lines with Ctrl-C there,
    resumed each time: the points where the resumed run differs from the whole one, and the steps
    the resumed runs started from."""
    tracer = StepTracer(step=2)
    full = tracer.run(finetune, model, CONVERSATIONS, output=tmp_path / "full", **INTERRUPT_RUN)
    points = choose_points(tracer.points)
    assert any(presses == 2 for _, presses in points)  # the step itself defers the first press
    wrong, starts = [], set()
    for k, (point, presses) in enumerate(points):
        out = tmp_path / f"run{k}"
        stopped = StepTracer(step=2, point=point, presses=presses)
        with pytest.raises(KeyboardInterrupt):
            stopped.run(finetune, model, CONVERSATIONS, output=out, **INTERRUPT_RUN)
        assert stopped.fired, point
        resumed = finetune(model, CONVERSATIONS, output=out, **INTERRUPT_RUN)
        losses = [h["loss"] for h in resumed.history]
        starts.add(resumed.start_step)
        same_adapters = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full.adapters),
                                                                   jax.tree.leaves(resumed.adapters)))
        if losses != [h["loss"] for h in full.history] or not same_adapters:
            wrong.append(f"{os.path.basename(point[0])}:{point[1]} (time {point[2]}, {presses} "
                         f"press{'es' if presses > 1 else ''}): resumed at step {resumed.start_step}, losses {losses}")
    if wrong:
        wrong.insert(0, f"{len(wrong)} of {len(points)} interrupts resumed differently from the uninterrupted run "
                        f"(losses {[h['loss'] for h in full.history]}):")
    return wrong, starts


def test_ctrl_c_anywhere_in_a_step_saves_exactly_the_step_it_names(interrupt_model, tmp_path, ctrl_c_raises):
    def points(recorded):
        chosen = points_to_interrupt(recorded)
        files = {os.path.basename(p[0]) for (p, _) in chosen}
        assert {"finetune.py", "progress.py", "checkpoints.py", "resident.py"} <= files, files
        return chosen

    wrong, starts = resumed_differently(interrupt_model, tmp_path, points)
    assert not wrong, "\n".join(wrong)
    # Every outcome came up: step 2 finished and saved (one press), step 1 saved (a second press
    # before step 2 took its inputs), nothing saved (after; step 1 was never checkpointed).
    assert starts == {0, 1, 2}


OFFLOADED_POINTS = 4


def test_ctrl_c_inside_an_offloaded_step_saves_exactly_the_step_it_names(ckpt, tmp_path, ctrl_c_raises):
    """Experts streamed from host memory: the step is Python driving per-layer segments, and a
    second Ctrl-C stops inside it, before or after the update has taken the step's inputs. The
    loop around it is the resident one's, interrupted everywhere above; here points spread over the
    offloaded step's own lines."""
    model = ktjax.load(ckpt, dtype="float32", placement={r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"},
                       max_context=64)
    assert model.placement.offloaded

    def points(recorded):
        inside = [p for p in recorded if os.path.basename(p[0]) == "offloaded.py"]
        assert inside and all(p[3] for p in inside)  # the whole step defers a first press
        spread = inside[::max(1, len(inside) // OFFLOADED_POINTS)][:OFFLOADED_POINTS - 1] + [inside[-1]]
        return [(spread[0][:3], 1)] + [(p[:3], 2) for p in spread]

    wrong, starts = resumed_differently(model, tmp_path, points)
    assert not wrong, "\n".join(wrong)
    # Step 2 finished and saved; step 1 saved as the second press came (the state intact); or
    # lost with the inputs the update took.
    assert starts == {0, 1, 2}


# -- first contact: `ktjax finetune` as a new user meets it --------------------------------------------

def finetune_cli(*args) -> int:
    return cli_main(["finetune", *map(str, args)])


CLI_RUN = ("--dtype", "float32", "--rank", "2", "--steps", "4", "--batch-size", "1", "--seq-len", "32", "--lr", "1e-2",
           "--warmup", "0", "--no-thinking", "--targets", "q_b_proj")


def test_finetune_cli_logs_resumes_and_warns_in_one_line_each(ckpt, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is this directory
    (tmp_path / "chat.jsonl").write_text(data_file.read_text())
    assert finetune_cli("--model", ckpt, "--data", "~/chat.jsonl", "--output", "~/adapter", "--log-every", "2",
                        *CLI_RUN) == 0
    err = capsys.readouterr().err.splitlines()
    # stderr is not a terminal here: no bar, a log line every 2 steps
    assert [line.split(",")[0] for line in err if line.startswith("finetune: step")] == ["finetune: step 2/4",
                                                                                         "finetune: step 4/4"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert err[-1].startswith(f"adapter written to {tmp_path / 'adapter'} (4 steps")

    # Run again with other data: it resumes, says so once, and names what changed, in one line.
    (tmp_path / "other.jsonl").write_text(json.dumps(CONVERSATIONS[0]) + "\n")
    assert finetune_cli("--model", ckpt, "--data", "~/other.jsonl", "--output", "~/adapter", *CLI_RUN) == 0
    err = capsys.readouterr().err
    resumed = [line for line in err.splitlines() if line.startswith("finetune: resum")]
    assert resumed == [f"finetune: resuming {tmp_path / 'adapter' / 'checkpoints'} at step 4 of 4 with changed "
                       "settings (data): the run will differ from an uninterrupted one"], err
    assert "Warning" not in err and "warn(" not in err, err

    # A setting the checkpoint cannot take: one line, exit 1.
    assert finetune_cli("--model", ckpt, "--data", "~/chat.jsonl", "--output", "~/adapter",
                        *CLI_RUN[:3], "3", *CLI_RUN[4:]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the checkpoint has rank=2, this run 3" in err, err


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "-5", "--steps must be at least 1, got -5"),
    ("--lr", "-1", "--lr must be positive, got -1.0"),
    ("--rank", "0", "--rank must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--seq-len", "1", "--seq-len must be at least 2, got 1"),
    ("--dropout", "1.5", "--dropout must be in [0, 1), got 1.5"),
    ("--eval-fraction", "-0.1", "--eval-fraction must be in [0, 1), got -0.1"),
    ("--save-every", "0", "--save-every must be at least 1, got 0"),
    ("--data", "missing.jsonl", "--data missing.jsonl: no such file"),
])
def test_finetune_argument_errors_are_one_line_before_the_model_loads(data_file, tmp_path, capsys, option, value,
                                                                      message):
    # A directory that is no checkpoint: had the model been loaded first, the error would be about it.
    (tmp_path / "not_a_model").mkdir()
    args = {"--model": tmp_path / "not_a_model", "--data": data_file, "--output": tmp_path / "out", option: value}
    assert finetune_cli(*[x for kv in args.items() for x in kv]) == 1
    assert capsys.readouterr().err == f"ktjax: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_an_existing_file_as_output_is_one_line(data_file, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert finetune_cli("--data", data_file, "--output", tmp_path / "taken") == 1
    assert capsys.readouterr().err == f"ktjax: error: --output {tmp_path / 'taken'}: exists and is not a directory\n"
    with pytest.raises(ValueError, match="taken: exists and is not a directory"):
        finetune(None, data_file, output=tmp_path / "taken")


def test_the_embedded_model_needs_no_model_option(data_file, tmp_path, capsys):
    """`ktjax finetune` and `ktjax merge` without --model use the embedded model, as ktjax.finetune(None, ...) does."""
    run = ("--rank", "2", "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--no-thinking", "--targets", "o_proj")
    assert finetune_cli("--data", data_file, "--output", tmp_path / "adapter", *run) == 0
    assert cli_main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    embedded, merged = ktjax.load(), ktjax.load(tmp_path / "merged")
    assert merged.config == embedded.config
    r = finetune(None, data_file, output=tmp_path / "api", rank=2, steps=1, batch_size=1, seq_len=32, thinking=False,
                 targets=("o_proj",), progress=False)
    adapted = ktjax.load_adapter(embedded, r.output, merge=True)
    # The same run through the command line and the API: the merged checkpoint is the adapted model.
    np.testing.assert_allclose(ktjax.logits(merged, TOKENS), ktjax.logits(adapted, TOKENS), rtol=1e-3, atol=1e-3)
