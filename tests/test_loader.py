"""The checkpoint loader: FP8, shards, MTP, dtypes, bounded memory, progress, and every bad input's error."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import ktjax
from ktjax.config import ConfigError, ModelConfig
from ktjax.experts.weights import ExpertFormat
from ktjax.io.checkpoint import Checkpoint, CheckpointError, dequantize_fp8, tensor_names
from ktjax.io.experts import read_expert
from ktjax.io.load import abstract_params
from tests.fp8 import dequantize_reference, read_tensors, write_dequantized_twin, write_fp8_checkpoint
from tests.reference import load_reference, make_reference, reference_logits, save_reference

BLOCK = (16, 16)  # small blocks so the tiny model's 24- and 20-row weights get partial edge blocks
TOKENS = np.array([[3, 17, 42, 5, 88, 1, 60, 23], [9, 9, 71, 30, 2, 45, 13, 96]])


def leaves(model: ktjax.LoadedModel) -> dict[tuple[str, ...], np.ndarray]:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(model.executor.params)}


def dequantized(path: str, dtype: str) -> ktjax.LoadedModel:
    """A checkpoint loaded with every weight (experts included) in float: FP8 dequantised on loading."""
    return ktjax.load(path, dtype=dtype, experts=dtype)


def assert_same_params(a: ktjax.LoadedModel, b: ktjax.LoadedModel) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=str(path))


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).view(f"u{np.asarray(x).dtype.itemsize}")


def write_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(path, f))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        d = json.load(f)
    d.update(changes)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f)


@pytest.fixture(scope="module")
def ref():
    return make_reference("v3")


@pytest.fixture(scope="module")
def ckpt_dir(ref, tmp_path_factory) -> str:
    return save_reference(ref, tmp_path_factory.mktemp("f32"))


@pytest.fixture(scope="module")
def sharded_dir(ref, tmp_path_factory) -> str:
    return save_reference(ref, tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


@pytest.fixture(scope="module")
def fp8_dir(ckpt_dir, tmp_path_factory) -> str:
    return write_fp8_checkpoint(ckpt_dir, str(tmp_path_factory.mktemp("fp8")), block=BLOCK)


@pytest.fixture(scope="module")
def twin_dir(fp8_dir, tmp_path_factory) -> str:
    return write_dequantized_twin(fp8_dir, str(tmp_path_factory.mktemp("twin")))


@pytest.fixture(scope="module")
def model_f32(ckpt_dir) -> ktjax.LoadedModel:
    return ktjax.load(ckpt_dir, dtype="float32")


# ---- FP8 -----------------------------------------------------------------------------------

def test_fp8_checkpoint_gives_the_logits_of_its_dequantized_twin(fp8_dir, twin_dir):
    ckpt = Checkpoint(fp8_dir)
    fp8_names = [n for n, t in ckpt.tensors.items() if t.dtype == "F8_E4M3"]
    assert "model.layers.1.self_attn.q_a_proj.weight" in fp8_names and "model.layers.2.mlp.experts.7.down_proj.weight" in fp8_names
    assert ckpt.info("model.embed_tokens.weight").dtype == "F32"  # FP8-ness is per tensor, read from the file

    fp8, twin = dequantized(fp8_dir, "float32"), ktjax.load(twin_dir, dtype="float32")
    assert_same_params(fp8, twin)
    np.testing.assert_array_equal(np.asarray(ktjax.logits(fp8, TOKENS)), np.asarray(ktjax.logits(twin, TOKENS)))
    # Kept as FP8 (the default for FP8 experts), on the device or in host memory: transformers' function
    # of the dequantised weights.
    want = reference_logits(load_reference(twin_dir), TOKENS)
    for placement in (None, {r".*\.experts\..*": "host"}):
        kept = ktjax.load(fp8_dir, dtype="float32", placement=placement)
        assert kept.placement.expert_format.name == "fp8"
        np.testing.assert_allclose(np.asarray(ktjax.logits(kept, TOKENS)), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fp8_and_float_tensors_mixed_in_one_leaf(ckpt_dir, tmp_path):
    # Half the experts, and in one expert only its down matrix, in FP8: each tensor is read as the file says.
    fp8 = write_fp8_checkpoint(ckpt_dir, str(tmp_path / "mixed"), block=BLOCK,
                               quantized=re.compile(r"experts\.([0-3]\.(gate|up|down)|5\.down)_proj\.weight$"))
    twin = write_dequantized_twin(fp8, str(tmp_path / "twin"))
    assert Checkpoint(fp8).info("model.layers.1.mlp.experts.4.up_proj.weight").dtype == "F32"
    assert Checkpoint(fp8).info("model.layers.1.mlp.experts.5.down_proj.weight").dtype == "F8_E4M3"
    assert_same_params(ktjax.load(fp8, dtype="float32"), ktjax.load(twin, dtype="float32"))
    # Held apart in host memory, an expert not wholly FP8 keeps each matrix's own scales: transformers'
    # logits on the dequantised weights.
    offloaded = ktjax.load(fp8, dtype="float32", placement={r".*\.experts\..*": "host"})
    want = reference_logits(load_reference(twin), TOKENS)
    np.testing.assert_allclose(np.asarray(ktjax.logits(offloaded, TOKENS)), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fp8_dequantization_is_bit_exact(fp8_dir):
    raw = read_tensors(fp8_dir)
    f32, bf16 = leaves(dequantized(fp8_dir, "float32")), leaves(dequantized(fp8_dir, "bfloat16"))
    # [24, 64] and [20, 64]: partial row blocks; [48, 24]: partial column blocks; [32, 64] experts: whole blocks.
    cases = [(("moe_layers", "self_attn", "q_a_proj", "weight"), "model.layers.2.self_attn.q_a_proj.weight", (1,)),
             (("dense_layers", "self_attn", "kv_a_proj_with_mqa", "weight"), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (0,)),
             (("moe_layers", "self_attn", "q_b_proj", "weight"), "model.layers.1.self_attn.q_b_proj.weight", (0,)),
             (("moe_layers", "mlp", "experts", "up_proj"), "model.layers.2.mlp.experts.5.up_proj.weight", (1, 5))]
    for path, name, index in cases:
        want = dequantize_reference(raw[name], raw[name + "_scale_inv"], BLOCK)
        assert raw[name].shape in ((24, 64), (20, 64), (48, 24), (32, 64))
        np.testing.assert_array_equal(bits(f32[path][index]), bits(want), err_msg=name)
        # bfloat16: dequantised in float32, rounded once.
        np.testing.assert_array_equal(bits(bf16[path][index]), bits(want.astype(ml_dtypes.bfloat16)), err_msg=name)


def test_an_fp8_expert_stays_fp8_with_its_scales(fp8_dir):
    cfg = ModelConfig.from_json(fp8_dir)
    ckpt = Checkpoint(fp8_dir)
    raw = read_tensors(fp8_dir)
    F, D = cfg.moe_intermediate_size, cfg.hidden_size
    names = [f"model.layers.2.mlp.experts.6.{p}_proj.weight" for p in ("gate", "up", "down")]
    ex = read_expert(ckpt, [(n, n + "_scale_inv") for n in names], ExpertFormat("fp8", F, D, 16), BLOCK)
    assert ex.w.dtype == ml_dtypes.float8_e4m3fn and ex.w.shape == (3, F, D) and ex.scale.shape == (3, F // 16, D // 16)
    np.testing.assert_array_equal(bits(ex.w[0]), bits(raw[names[0]]))
    np.testing.assert_array_equal(bits(ex.w[2]), bits(raw[names[2]].T))  # down stored transposed: [F, D]
    want = dequantize_reference(raw[names[2]], raw[names[2] + "_scale_inv"], BLOCK)
    np.testing.assert_array_equal(bits(np.asarray(ex.down(np.float32))), bits(want))
    np.testing.assert_array_equal(bits(dequantize_fp8(raw[names[2]], raw[names[2] + "_scale_inv"], BLOCK)),
                                  bits(want))  # numpy in, numpy out


# ---- layouts and dtypes --------------------------------------------------------------------

def test_sharded_equals_single_file(sharded_dir, model_f32):
    files = [f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]
    assert len(files) > 2 and os.path.exists(os.path.join(sharded_dir, "model.safetensors.index.json"))
    assert_same_params(ktjax.load(sharded_dir, dtype="float32"), model_f32)


def test_matches_transformers(ref, model_f32):
    np.testing.assert_allclose(np.asarray(ktjax.logits(model_f32, TOKENS)), reference_logits(ref, TOKENS), atol=2e-5, rtol=2e-5)


def test_bfloat16_load(ckpt_dir, model_f32, ref):
    model = ktjax.load(ckpt_dir, dtype="bfloat16")
    f32 = leaves(model_f32)
    for path, value in leaves(model).items():
        want = np.float32 if "gate" in path else ml_dtypes.bfloat16  # the router stays float32
        assert value.dtype == want, path
        np.testing.assert_array_equal(bits(value), bits(f32[path].astype(want)), err_msg=str(path))
    # The loader's part is the bitwise check above; bfloat16 logits of a random MoE can reroute tokens.
    assert np.isfinite(np.asarray(ktjax.logits(model, TOKENS))).all()


def test_mtp_layers_are_skipped(ckpt_dir, model_f32, tmp_path):
    cfg = ModelConfig.from_json(ckpt_dir)
    mtp = cfg.num_hidden_layers  # the MTP module's layer index
    tensors = read_tensors(ckpt_dir)
    tensors |= {n.replace("model.layers.2.", f"model.layers.{mtp}."): v for n, v in tensors.items() if n.startswith("model.layers.2.")}
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = np.zeros((cfg.hidden_size, 2 * cfg.hidden_size), np.float32)
    path = str(shutil.copytree(ckpt_dir, tmp_path / "mtp"))
    write_tensors(path, tensors)
    edit_config(path, num_nextn_predict_layers=1)
    assert_same_params(ktjax.load(path, dtype="float32"), model_f32)
    edit_config(path, num_nextn_predict_layers=0)  # now layer 3 is nobody's
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: unexpected tensor model\.layers\.{mtp}\."):
        ktjax.load(path)


# ---- bad input -----------------------------------------------------------------------------

def _on_tensors(edit):
    """A directory edit that rewrites the checkpoint's tensors (as one file) through `edit(dict)`."""
    def apply(path):
        tensors = read_tensors(path)
        edit(tensors)
        write_tensors(path, tensors)
    return apply


def _drop(name):
    return _on_tensors(lambda t: t.pop(name))


def _set(name, value):
    return _on_tensors(lambda t: t.__setitem__(name, value(t[name]) if callable(value) else value))


def _edit_header(edit):
    """Rewrite model.safetensors's JSON header in place (same length, padded), for what safetensors refuses to write."""
    def apply(path):
        file = os.path.join(path, "model.safetensors")
        data = bytearray(open(file, "rb").read())
        (n,) = struct.unpack("<Q", data[:8])
        header = edit(bytes(data[8:8 + n]))
        assert len(header) <= n
        data[8:8 + n] = header.ljust(n, b" ")
        open(file, "wb").write(bytes(data))
    return apply


def _truncate(path):
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) - 100)


def _missing_shard(path):
    with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as f:
        shard = json.load(f)["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    os.remove(os.path.join(path, shard))
    return shard


Q_A = "model.layers.1.self_attn.q_a_proj.weight"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"
# (name, checkpoint it starts from, edit of the directory (may return a file to name), error, what the message names)
BAD = [
    ("missing config", "f32", lambda p: os.remove(os.path.join(p, "config.json")), ConfigError, ["config.json"]),
    ("missing tensor", "f32", _drop(EXPERT), CheckpointError, [EXPERT, "missing"]),
    ("unexpected tensor", "f32", _set("model.layers.1.mlp.experts.99.up_proj.weight", np.zeros((32, 64), np.float32)),
     CheckpointError, ["model.safetensors", "model.layers.1.mlp.experts.99.up_proj.weight", "unexpected"]),
    ("wrong shape", "f32", _set(Q_A, lambda w: w[:, :63]), CheckpointError, ["model.safetensors", Q_A, "[24, 63]", "[24, 64]"]),
    ("integer parameter", "f32", _set("model.norm.weight", lambda w: w.astype(np.int32)), CheckpointError,
     ["model.safetensors", "model.norm.weight", "unsupported dtype I32"]),
    ("unknown dtype", "f32", _edit_header(lambda h: h.replace(b'"F32"', b'"C64"', 1)), CheckpointError,
     ["model.safetensors", "unsupported dtype C64"]),
    ("truncated file", "f32", _truncate, CheckpointError, ["model.safetensors", "truncated"]),
    ("corrupt header", "f32", _edit_header(lambda h: b"#" + h[1:]), CheckpointError, ["model.safetensors", "corrupt"]),
    ("missing shard", "sharded", _missing_shard, CheckpointError, ["missing (listed in model.safetensors.index.json)"]),
    ("missing fp8 scale", "fp8", _drop(Q_A + "_scale_inv"), CheckpointError, [Q_A + "_scale_inv", "missing", Q_A]),
    ("wrong fp8 scale shape", "fp8", _set(Q_A + "_scale_inv", lambda s: s[:1]), CheckpointError,
     ["model.safetensors", Q_A + "_scale_inv", "[1, 4]", "[2, 4]"]),
    ("stray fp8 scale", "f32", _set(Q_A + "_scale_inv", np.ones((2, 4), np.float32)), CheckpointError,
     ["model.safetensors", "unexpected tensor " + Q_A + "_scale_inv"]),
]


@pytest.mark.parametrize("kind, start, edit, error, named", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_with_one_line_naming_file_and_tensor(kind, start, edit, error, named, request, tmp_path, monkeypatch):
    src = request.getfixturevalue({"f32": "ckpt_dir", "sharded": "sharded_dir", "fp8": "fp8_dir"}[start])
    path = str(shutil.copytree(src, tmp_path / "ckpt"))
    named = named + [edit(path) or ""]
    reads = []
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name))
    with pytest.raises(error) as e:
        ktjax.load(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(path), message  # the file (or directory) at fault, by its full path
    for part in named:
        assert part in message, message
    assert not reads, "data was read before the input was checked"


# ---- memory and progress -------------------------------------------------------------------

def write_big_checkpoint(path: str) -> int:
    """A ~200 MB bfloat16 checkpoint of a wider config (constant weights: only sizes matter); returns param bytes."""
    d = dict(model_type="deepseek_v3", vocab_size=1024, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
             num_hidden_layers=3, num_attention_heads=8, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
             n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256, torch_dtype="bfloat16")
    cfg = ModelConfig.from_dict(d)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f)
    _, abstract = abstract_params(cfg, jnp.bfloat16)
    tensors, nbytes = {}, 0
    for leaf_path, var in nnx.to_flat_state(abstract):
        nbytes += var.size * var.dtype.itemsize
        for name, index in tensor_names(cfg, leaf_path):
            tensors[name] = np.full(var.shape[len(index):], 0.01, var.dtype)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
    return nbytes


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS counters")
def test_peak_host_memory_stays_near_the_parameters(tmp_path):
    param_bytes = write_big_checkpoint(str(tmp_path))
    # Peak RSS from /proc (VmHWM, reset through clear_refs): getrusage's ru_maxrss would carry the
    # forking pytest process's own peak into the child. The first load also compiles the per-leaf
    # programs, which stay for the life of the process; the second shows the load's own buffers.
    script = textwrap.dedent(f"""
        import ctypes, gc, json, jax.numpy as jnp, ktjax
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        jnp.zeros(1).block_until_ready()  # the backend exists before the baseline
        out = {{}}
        for run in ("cold", "warm"):
            gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS
            open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
            base = status("VmRSS:")
            model = ktjax.load({str(tmp_path)!r}, progress=False)
            out[run] = status("VmHWM:") - base
            del model
        print(json.dumps(out))
    """)
    # XLA's default build, as a user's load runs: built as the tests' tiny models are (conftest.py),
    # each tensor's update of its 200 MB leaf copies the leaf (15 s a load instead of 2).
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if f not in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = os.path.getsize(tmp_path / "model.safetensors")
    print(f"\nparams {param_bytes / 1e6:.0f} MB, file {file_bytes / 1e6:.0f} MB, peak RSS over baseline: "
          f"first load {peak['cold'] / 1e6:.0f} MB, second load {peak['warm'] / 1e6:.0f} MB")
    # A second copy of the largest leaf (67 MB) or the whole file kept mapped (200 MB) would break these.
    assert peak["warm"] < param_bytes + 48e6, peak
    assert peak["cold"] < param_bytes + 192e6, peak  # compiled programs: ~3 MB per leaf shape, not per byte


def test_progress_bar_only_when_asked(ckpt_dir, capsys):
    ktjax.load(ckpt_dir)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    ktjax.load(ckpt_dir, progress=True)
    err = capsys.readouterr().err
    assert "91/91 tensors" in err and "B/s" in err and "100%" in err
