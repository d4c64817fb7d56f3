"""`ktjax merge`: an FP8 checkpoint plus a PEFT adapter (written by PEFT itself) becomes a checkpoint
whose tensors and config agree, that transformers loads as the model PEFT merges itself
(`merge_and_unload`), written shard by shard in bounded memory, and never half written.

The reference base model is the FP8 checkpoint dequantized by numpy (tests/fp8.py), loaded by
transformers; its adapter is made by PEFT on it, with random B (init_lora_weights=False)."""

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import ktjax
from ktjax.cli.main import main
from ktjax.config import ModelConfig
from ktjax.io.checkpoint import Checkpoint
from ktjax.io.merge import ShardWriter, merge_checkpoint
from ktjax.io.peft import read_adapter
from ktjax.io.save import save_params
from fp8 import dequantize_reference, quantize_fp8, read_tensors, write_dequantized_twin, write_fp8_checkpoint
from reference import make_reference, reference_logits, save_reference
from tokenizer_fixtures import write_tokenizer

BLOCK = (16, 8)  # small and not square: edge blocks are partial in both directions
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # all FP8 in the base
TOKENS = np.random.default_rng(1).integers(0, 97, (2, 11))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def peft_adapter(base_dir: str, out: str, seed: int = 0) -> str:
    """An adapter made by PEFT on the model in base_dir, random A and B."""
    from peft import LoraConfig, get_peft_model
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False,
                                                  task_type="CAUSAL_LM"))
    peft_model.save_pretrained(out)
    return out


def peft_merged_logits(base_dir: str, adapter_dir: str) -> np.ndarray:
    from peft import PeftModel
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    return reference_logits(merged, TOKENS)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """(FP8 checkpoint, its float32 dequantization, a PEFT adapter, PEFT's merged logits)."""
    root = tmp_path_factory.mktemp("fp8")
    src = save_reference(make_reference("v3", seed=7), root / "float")
    write_tokenizer(src)
    fp8 = write_fp8_checkpoint(src, str(root / "fp8"), block=BLOCK)
    twin = write_dequantized_twin(fp8, str(root / "twin"))
    adapter = peft_adapter(twin, str(root / "adapter"))
    return fp8, twin, adapter, peft_merged_logits(twin, adapter)


def merge_cli(*args) -> int:
    return main(["merge", *map(str, args)])


def config_of(path) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_float_merge_has_float_tensors_a_float_config_and_peft_merged_logits(fp8_model, tmp_path, capsys):
    fp8, _, adapter, want = fp8_model
    out = tmp_path / "merged"
    assert merge_cli("--model", fp8, "--adapter", adapter, "--output", out, "--dtype", "float32") == 0
    assert capsys.readouterr().err.strip() == f"merged checkpoint written to {out}"
    config, tensors = config_of(out), read_tensors(str(out))
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert not [n for n in tensors if n.endswith("_scale_inv")]
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    # transformers loads it as the model PEFT merges itself (float32 both: only summation order differs).
    got = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), TOKENS)
    assert rel_err(got, want) < 1e-5
    assert rel_err(ktjax.logits(ktjax.load(out), TOKENS), want) < 1e-4
    assert ktjax.load(out).tokenizer is not None  # tokenizer files travel along


def test_fp8_merge_requantizes_with_scales_the_config_describes(fp8_model, tmp_path):
    """Kept FP8: each merged weight is PEFT's merged weight quantized as DeepSeek's format does
    (tests/fp8.py: per block, largest |w| -> 448, round to nearest e4m3); untouched ones keep their
    bytes and scales; the config still declares the blocks."""
    from peft import PeftModel
    fp8, twin, adapter, _ = fp8_model
    out = tmp_path / "merged"
    assert merge_cli("--model", fp8, "--adapter", adapter, "--output", out) == 0
    config, tensors, source = config_of(out), read_tensors(str(out)), read_tensors(fp8)
    assert config["quantization_config"] == config_of(fp8)["quantization_config"]
    assert set(tensors) == set(source)
    peft_merged = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32),
                                            adapter).merge_and_unload().eval()
    merged_w = {k: v.numpy() for k, v in peft_merged.state_dict().items()}
    changed = []
    for name, q in tensors.items():
        if name.endswith("_scale_inv"):
            continue  # checked with its weight
        if source[name].dtype != ml_dtypes.float8_e4m3fn:
            assert q.dtype == source[name].dtype and np.array_equal(q, source[name]), name
            continue
        scale = tensors[name + "_scale_inv"]
        assert q.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32, name
        assert scale.shape == tuple(-(-s // b) for s, b in zip(q.shape, BLOCK)), name
        if np.array_equal(q.view(np.uint8), source[name].view(np.uint8)):
            np.testing.assert_array_equal(scale, source[name + "_scale_inv"], err_msg=name)
            continue
        changed.append(name)
        want_q, want_scale = quantize_fp8(merged_w[name], BLOCK)
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6, err_msg=name)
        # float32 sums in another order may round a value sitting on an e4m3 tie the other way: one code apart
        codes = np.abs(q.view(np.uint8).astype(int) - want_q.view(np.uint8).astype(int))
        assert codes.max() <= 1 and (codes > 0).mean() < 0.01, name
    assert len(changed) == 5 * 3  # every targeted projection of the three layers
    # Run by transformers (dequantized by numpy): PEFT's merged model with those weights FP8-rounded.
    for name in changed:
        peft_merged.get_parameter(name).data = torch.from_numpy(dequantize_reference(*quantize_fp8(merged_w[name], BLOCK), BLOCK))
    ours = transformers.AutoModelForCausalLM.from_pretrained(write_dequantized_twin(str(out), str(tmp_path / "twin")),
                                                             dtype=torch.float32).eval()
    assert rel_err(reference_logits(ours, TOKENS), reference_logits(peft_merged, TOKENS)) < 1e-3


def test_a_small_shard_size_gives_several_shards_and_an_index(fp8_model, tmp_path):
    from safetensors import safe_open
    fp8, _, adapter, _ = fp8_model
    out, whole = tmp_path / "sharded", tmp_path / "whole"
    assert merge_cli("--model", fp8, "--adapter", adapter, "--output", out, "--dtype", "bfloat16",
                     "--shard-size", "64KiB") == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3 and files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    with open(out / "model.safetensors.index.json", encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == {n for n in read_tensors(fp8) if not n.endswith("_scale_inv")}
    for file in files:
        with safe_open(out / file, "pt") as f:
            assert sorted(f.keys()) == sorted(n for n, where in weight_map.items() if where == file)
            header_bytes = 8 + int.from_bytes((out / file).read_bytes()[:8], "little")
            assert os.path.getsize(out / file) - header_bytes <= 64 * 1024 or len(f.keys()) == 1, file
    # The same tensors as one unsharded file would hold.
    assert merge_cli("--model", fp8, "--adapter", adapter, "--output", whole, "--dtype", "bfloat16") == 0
    assert os.listdir(whole).count("model-00001-of-00001.safetensors") == 1
    a, b = read_tensors(str(out)), read_tensors(str(whole))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def test_shards_with_more_tensors_than_their_header_room_read_back_exactly(tmp_path):
    from safetensors import safe_open
    writer = ShardWriter(str(tmp_path), 64 << 10)
    values = {f"t{i}": np.full((i % 3 + 1, 2), i, np.float32) for i in range(700)}  # ~90 KiB of header
    for name, v in values.items():
        writer.add(name, v)
    writer.close()
    assert os.listdir(tmp_path).count("model-00001-of-00001.safetensors") == 1
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", "np") as f:
        assert sorted(f.keys()) == sorted(values)
        for name, v in values.items():
            np.testing.assert_array_equal(f.get_tensor(name), v)


def test_merge_memory_stays_within_two_layers(tmp_path):
    """Many layers, shards of one layer: the merge holds about a tensor at a time, never the model
    nor a shard (numpy's and Python's allocations, traced by tracemalloc; the source is memory-mapped)."""
    ref = make_reference("v3", seed=3, num_hidden_layers=12, first_k_dense_replace=1, moe_intermediate_size=128)
    src = save_reference(ref, tmp_path / "float")
    fp8 = write_fp8_checkpoint(src, str(tmp_path / "fp8"), block=(32, 32))
    adapter = peft_adapter(src, str(tmp_path / "adapter"))
    infos = Checkpoint(fp8).tensors
    layer_bytes = sum(4 * int(np.prod(t.shape)) for n, t in infos.items() if n.startswith("model.layers.5."))  # float32
    model_bytes = sum(4 * int(np.prod(t.shape)) for t in infos.values())
    assert model_bytes > 10 * layer_bytes
    read_adapter(adapter, ModelConfig.from_json(fp8))  # jax traces the adapter's shapes once per process: not the merge's
    tracemalloc.start()
    try:
        merge_checkpoint(fp8, adapter, str(tmp_path / "merged"), dtype="float32", shard_bytes=layer_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * layer_bytes, (peak, layer_bytes, model_bytes)
    assert len([f for f in os.listdir(tmp_path / "merged") if f.endswith(".safetensors")]) >= 12


def write_corrupted(src: str, dst, corrupt) -> str:
    """A copy of the checkpoint src with corrupt(tensors) applied."""
    tensors = read_tensors(src)
    corrupt(tensors)
    os.makedirs(dst)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            os.link(os.path.join(src, f), os.path.join(dst, f))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def nan_in(name):
    def corrupt(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name].view(np.uint8)[-1, -1] = 0x7F  # an e4m3 NaN
    return corrupt


def short_scales(name):
    def corrupt(tensors):
        tensors[name] = tensors[name][:-1]
    return corrupt


@pytest.mark.parametrize("corrupt, tensor", [
    (nan_in, "model.layers.2.self_attn.o_proj.weight"),  # found while merging the last layer
    (short_scales, "model.layers.2.self_attn.kv_a_proj_with_mqa.weight_scale_inv"),  # found in the headers
])
@pytest.mark.parametrize("dtype", [[], ["--dtype", "float32"]])
def test_a_corrupt_tensor_leaves_no_output_and_one_line(fp8_model, tmp_path, capsys, corrupt, tensor, dtype):
    fp8, _, adapter, _ = fp8_model
    bad = write_corrupted(fp8, tmp_path / "bad", corrupt(tensor))
    out = tmp_path / "merged"
    assert merge_cli("--model", bad, "--adapter", adapter, "--output", out, "--shard-size", "16KiB", *dtype) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ktjax: error: {bad}/model.safetensors: tensor {tensor} "), err
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # neither the output nor its staging directory


def test_an_existing_file_as_output_is_one_line(fp8_model, tmp_path, capsys):
    fp8, _, adapter, _ = fp8_model
    (tmp_path / "taken").write_text("x")
    assert merge_cli("--model", fp8, "--adapter", adapter, "--output", tmp_path / "taken") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taken: exists and is not a directory" in err, err


# -- ktjax.io.save.save_params: the other writer of checkpoints users load ------------------------------

@pytest.fixture(scope="module")
def square_fp8(tmp_path_factory):
    """An FP8 checkpoint in square blocks (what ktjax loads FP8 experts in) and its float32 twin."""
    root = tmp_path_factory.mktemp("square")
    src = save_reference(make_reference("v3", seed=8), root / "float")
    fp8 = write_fp8_checkpoint(src, str(root / "fp8"), block=(16, 16))
    return fp8, write_dequantized_twin(fp8, str(root / "twin"))


def test_save_params_writes_float_tensors_a_float_config_and_the_same_model(square_fp8, tmp_path):
    fp8, twin = square_fp8
    model = ktjax.load(fp8, dtype="float32", experts="float32")  # FP8 weights dequantized on loading, resident
    out = tmp_path / "saved"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # files beside the weights stay
    save_params(model.config, model.executor.params, out, shard_bytes=32 << 10)
    config, tensors = config_of(out), read_tensors(str(out))
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)} and not [n for n in tensors if "scale" in n]
    assert (out / "tokenizer.json").read_text() == "{}" and not [f for f in os.listdir(out) if f.startswith(".")]
    with open(out / "model.safetensors.index.json", encoding="utf-8") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    # transformers runs it as the numpy dequantization of the FP8 checkpoint (float32, bit-exact weights).
    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    np.testing.assert_array_equal(reference_logits(load(out), TOKENS), reference_logits(load(twin), TOKENS))

    # Saved again as one file, over the shards: the old shards and index go, the new file loads.
    save_params(model.config, model.executor.params, out, dtype="bfloat16")
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    assert config_of(out)["torch_dtype"] == "bfloat16"
    saved, want = read_tensors(str(out)), read_tensors(twin)
    assert saved.keys() == want.keys()
    for name, w in want.items():  # each the twin's float32 rounded to bfloat16; the router stays float32
        router = ".mlp.gate." in name
        np.testing.assert_array_equal(saved[name], w if router else w.astype(ml_dtypes.bfloat16), err_msg=name)


def test_save_params_failing_midway_leaves_the_directory_as_it_was(square_fp8, tmp_path):
    import jax
    from flax import nnx
    fp8, _ = square_fp8
    model = ktjax.load(fp8, dtype="float32", experts="float32")
    out = tmp_path / "saved"
    save_params(model.config, model.executor.params, out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    params = jax.tree.map(lambda x: x.copy(), model.executor.params)
    last_path, last = list(nnx.to_flat_state(params))[-1]
    last[...].delete()  # as a step's donated input is: reading it fails, late in the save
    with pytest.raises(RuntimeError, match="deleted"):
        save_params(model.config, params, out, dtype="bfloat16")  # another config.json too, were it written
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_paths_with_tilde_and_bad_sizes(fp8_model, tmp_path, capsys, monkeypatch):
    fp8, _, adapter, _ = fp8_model
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is this directory
    os.symlink(fp8, tmp_path / "base")
    os.symlink(adapter, tmp_path / "adapter")
    assert merge_cli("--model", "~/base", "--adapter", "~/adapter", "--output", "~/merged", "--shard-size", "1x") == 1
    assert capsys.readouterr().err == "ktjax: error: --shard-size '1x' is not a size (examples: 4GiB, 500MB)\n"
    assert merge_cli("--model", "~/base", "--adapter", "~/adapter", "--output", "~/merged") == 0
    assert (tmp_path / "merged" / "config.json").is_file()
