"""`ktjax quantize`: a checkpoint whose routed experts are stored as int8/int4 arrays (the layout of
docs/quantized_checkpoints.md) is exactly `ktjax.experts.quant`'s quantizer applied to the source,
loads without running a quantizer into the very model that quantizing while loading gives, computes
what transformers computes with the dequantized weights, and fails in one line on bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import transformers

import ktjax
from fp8 import dequantize_reference, read_tensors, write_fp8_checkpoint
from ktjax.api import default_model_path
from ktjax.cli.main import main
from ktjax.config import ModelConfig
from ktjax.experts import packed, quant, quant_host
from reference import make_reference, reference_logits, save_reference

FORMATS = ("int8", "int4")
TOKENS = np.random.default_rng(12).integers(0, 97, (2, 9))
EXPERT = "model.layers.{i}.mlp.experts.{e}.{p}"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
STORED = {"int8": {"q": np.int8, "scale": np.float16},
          "int4": {"q": np.uint8, "sc": np.uint8, "mn": np.uint8, "d": np.float32, "dmin": np.float32}}
# How far int experts may move the tiny model's logits from the float model's: the median over positions
# of max |diff| / max |logit| (a median, because a near-tie in routing can flip one expert choice at a
# position, which moves that position's logits much more than the weights' error). Measured: about
# 0.006 for int8 (each weight within half a step of 1/127 of its group's largest value) and 0.09 for
# int4 (within a step of 1/15 of its group's range).
FIDELITY = {"int8": 0.01, "int4": 0.15}


def fidelity(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.median(np.abs(got - want).max(-1)) / np.abs(want).max())


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def expert_weights(cfg: dict):
    moe = range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])
    return [EXPERT.format(i=i, e=e, p=p) for i in moe for e in range(cfg["n_routed_experts"]) for p in PROJECTIONS]


def config_of(path):
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def stored_arrays(tensors: dict, weight: str, fmt: str) -> dict:
    """One weight's arrays as quant.py holds them (float16 scales as their bits)."""
    out = {a: tensors[f"{weight}.{a}"] for a in STORED[fmt]}
    if fmt == "int8":
        out["scale"] = out["scale"].view(np.uint16)
    return out


def write_twin(src: str, quantized: str, dst: str) -> str:
    """The source checkpoint with each routed expert replaced by its dequantized int weights (numpy)."""
    tensors, stored, cfg = read_tensors(src), read_tensors(quantized), config_of(quantized)
    fmt = cfg["quantization_config"]["experts"]
    for weight in expert_weights(cfg):
        cols = tensors[weight + ".weight"].shape[1]
        tensors[weight + ".weight"] = np.ascontiguousarray(quant.dequantize(stored_arrays(stored, weight, fmt), fmt, cols))
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def reference():
    return make_reference("v3", seed=21)


@pytest.fixture(scope="module")
def src(reference, tmp_path_factory):
    return save_reference(reference, tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def written(src, tmp_path_factory):
    """Each format written by the command line."""
    out = {}
    for fmt in FORMATS:
        out[fmt] = str(tmp_path_factory.mktemp("quantized") / fmt)
        assert main(["quantize", "--model", src, "--experts", fmt, "--output", out[fmt]]) == 0
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_files_hold_the_quantizers_arrays_and_copy_everything_else(src, written, fmt):
    source, stored, cfg = read_tensors(src), read_tensors(written[fmt]), config_of(written[fmt])
    assert cfg["quantization_config"] == {"quant_method": "ktjax", "experts": fmt, "group_size": 32}
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == config_of(src)
    assert ModelConfig.from_json(written[fmt]).to_dict()["quantization_config"] == cfg["quantization_config"]
    with open(os.path.join(written[fmt], "model.safetensors.index.json"), encoding="utf-8") as f:
        assert set(json.load(f)["weight_map"]) == set(stored)
    experts = expert_weights(cfg)
    for weight in experts:
        w = source.pop(weight + ".weight")
        want = quant.quantize(w.astype(np.float32), fmt)
        got = stored_arrays(stored, weight, fmt)
        for a, dtype in STORED[fmt].items():
            assert stored[f"{weight}.{a}"].dtype == dtype, (weight, a)
            np.testing.assert_array_equal(got[a], want[a], err_msg=f"{weight}.{a}")
        # Dequantized (numpy reference), every weight is within the format's error of its group.
        back = quant.dequantize(got, fmt, w.shape[1])
        cols = -(-w.shape[1] // 32) * 32
        groups = np.pad(w, ((0, 0), (0, cols - w.shape[1]))).reshape(w.shape[0], -1, 32)
        if fmt == "int8":
            bound = np.abs(groups).max(-1) / 127 / 2 * 1.01  # half a step (float16 scale rounding aside)
        else:
            bound = (groups.max(-1) - np.minimum(groups.min(-1), 0)) / 15 * 1.01  # a step of the group's range
        err = np.abs(back - w)
        err = np.pad(err, ((0, 0), (0, cols - w.shape[1]))).reshape(w.shape[0], -1, 32).max(-1)
        assert (err <= bound).all(), weight
    for name, value in source.items():  # everything but the experts, as the source had it
        np.testing.assert_array_equal(stored.pop(name), value, err_msg=name)
    assert len(stored) == len(experts) * len(STORED[fmt])  # and nothing else


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_runs_no_quantizer_and_gives_the_model_quantized_while_loading(src, written, reference, fmt,
                                                                               monkeypatch, tmp_path):
    quantized_while_loading = ktjax.logits(ktjax.load(src, experts=fmt), TOKENS)

    def refuse(*args, **kwargs):
        raise AssertionError("a quantizer ran")

    for module, name in [(quant, "quantize"), (quant, "quantize_int8"), (quant, "quantize_int4"),
                         (packed, "quantize"), (quant_host, "quantize")]:
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(AssertionError, match="a quantizer ran"):  # the patch is on the loader's way
        ktjax.load(src, experts=fmt)
    model = ktjax.load(written[fmt])
    assert model.placement.expert_format.name == fmt  # the stored format by default
    got = np.asarray(ktjax.logits(model, TOKENS))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(quantized_while_loading))
    # transformers with the dequantized weights computes the same model; the float model is near.
    twin = transformers.DeepseekV3ForCausalLM.from_pretrained(write_twin(src, written[fmt], str(tmp_path / "twin")))
    assert rel_err(got, reference_logits(twin.eval(), TOKENS)) < 1e-5
    assert fidelity(got, reference_logits(reference, TOKENS)) < FIDELITY[fmt]


def test_other_formats_come_from_the_dequantized_values(src, written, reference, tmp_path):
    # A float format dequantizes (here through the resident loader: every parameter on the device).
    model = ktjax.load(written["int4"], experts="float32")
    assert model.placement.expert_format.name == "float32" and not model.placement.offloaded
    assert rel_err(ktjax.logits(model, TOKENS), ktjax.logits(ktjax.load(written["int4"]), TOKENS)) < 1e-5
    # The other integer format is quantized again from the dequantized weights.
    model = ktjax.load(written["int8"], experts="int4")
    buffer = np.asarray(model.executor.store.experts[1][0].w)
    D, F = reference.config.hidden_size, reference.config.moe_intermediate_size
    stored = read_tensors(written["int8"])
    gate, up, down = (quant.dequantize(stored_arrays(stored, EXPERT.format(i=1, e=0, p=p), "int8"), "int8", cols)
                      for p, cols in zip(PROJECTIONS, (D, D, F)))
    np.testing.assert_array_equal(buffer, packed.PackedLayout("int4", F, D).pack(gate, up, down))
    assert fidelity(ktjax.logits(model, TOKENS), reference_logits(reference, TOKENS)) < FIDELITY["int4"]
    # Quantizing a quantized checkpoint again into its own format changes nothing.
    again = ktjax.quantize(written["int8"], experts="int8", output=tmp_path / "again")
    assert read_tensors(again).keys() == stored.keys()
    for name, value in read_tensors(again).items():
        np.testing.assert_array_equal(value, stored[name], err_msg=name)


def test_an_fp8_checkpoint_keeps_its_fp8_weights_and_scales(src, tmp_path):
    fp8 = write_fp8_checkpoint(src, str(tmp_path / "fp8"), block=(16, 16))
    out = ktjax.quantize(fp8, experts="int4", output=tmp_path / "fp8-int4")  # the Python entry point
    cfg, source, stored = config_of(out), read_tensors(fp8), read_tensors(out)
    assert cfg["quantization_config"] == {"quant_method": "ktjax", "experts": "int4", "group_size": 32,
                                          "fp8_weight_block_size": [16, 16]}
    for weight in expert_weights(cfg):
        w = dequantize_reference(source.pop(weight + ".weight"), source.pop(weight + ".weight_scale_inv"), (16, 16))
        want = quant.quantize(w, "int4")
        for a, value in stored_arrays(stored, weight, "int4").items():
            np.testing.assert_array_equal(value, want[a], err_msg=f"{weight}.{a}")
    fp8_kept = [n for n, v in source.items() if v.dtype.name == "float8_e4m3fn"]
    assert fp8_kept and all(n + "_scale_inv" in source for n in fp8_kept)
    for name, value in source.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    got = ktjax.logits(ktjax.load(out, dtype="float32"), TOKENS)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ktjax.logits(ktjax.load(fp8, dtype="float32",
                                                                                      experts="int4"), TOKENS)))


def test_the_embedded_model_by_default_with_its_tokenizer_and_info(tmp_path, capsys):
    out = str(tmp_path / "tiny-int8")
    assert main(["quantize", "--experts", "int8", "--output", out]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(default_model_path(), name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    capsys.readouterr()
    assert main(["info", "--model", out]) == 0
    info = capsys.readouterr().out
    assert "kept as int8" in info and "routed experts stored as int8" in info
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = capsys.readouterr().out
    assert all(s in help_text for s in ("--model", "--experts", "--output", "int8", "int4", "embedded"))


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("ktjax: error: ")
    return captured.err


def test_bad_output_format_or_files_are_one_line_errors(src, written, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert "exists and is not a directory" in one_line_error(
        ["quantize", "--model", src, "--experts", "int8", "--output", str(taken)], capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("x")
    assert "not an empty directory" in one_line_error(
        ["quantize", "--model", src, "--experts", "int8", "--output", str(full)], capsys)
    assert "--experts int3" in one_line_error(
        ["quantize", "--model", src, "--experts", "int3", "--output", str(tmp_path / "new")], capsys)
    assert sorted(os.listdir(tmp_path)) == ["full", "taken"]  # nothing written, nothing left behind
    # A quantized checkpoint missing one expert's scales, and one with a truncated shard.
    bad = shutil.copytree(written["int8"], tmp_path / "missing")
    shard = bad / "model-00001-of-00001.safetensors"
    tensors = safetensors.numpy.load_file(shard)
    del tensors["model.layers.2.mlp.experts.5.up_proj.scale"]
    safetensors.numpy.save_file(tensors, shard)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.5.up_proj.scale"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    err = one_line_error(["generate", "--model", str(bad), "--prompt", "hi"], capsys)
    assert "tensor model.layers.2.mlp.experts.5.up_proj.scale is missing" in err
    # A config that says int4 over int8 tensors.
    liar = shutil.copytree(written["int8"], tmp_path / "liar")
    cfg = config_of(liar)
    cfg["quantization_config"]["experts"] = "int4"
    (liar / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(["generate", "--model", str(liar), "--prompt", "hi"], capsys)
    assert "tensor model.layers.1.mlp.experts.0.down_proj.q is I8 [64, 32], expected U8 [64, 128]" in err
    cfg["quantization_config"]["experts"] = "int3"
    (liar / "config.json").write_text(json.dumps(cfg))
    assert "quantization_config.experts' 'int3'" in one_line_error(["info", "--model", str(liar)], capsys)
    cut = shutil.copytree(written["int4"], tmp_path / "truncated")
    shard = cut / "model-00001-of-00001.safetensors"
    os.truncate(shard, os.path.getsize(shard) - 100)
    assert "truncated" in one_line_error(["info", "--model", str(cut)], capsys)


def test_an_interrupted_run_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    from ktjax.io import quantized

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantized, "write_expert", interrupt)
    assert main(["quantize", "--model", src, "--experts", "int4", "--output", str(tmp_path / "out")]) == 130
    assert os.listdir(tmp_path) == []


def test_shards_stay_under_their_size_and_the_index_finds_every_tensor(src, written, tmp_path):
    from ktjax.io.quantized import quantize_checkpoint

    out = quantize_checkpoint(src, str(tmp_path / "sharded"), "int8", shard_bytes=100_000)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and all(os.path.getsize(os.path.join(out, f)) < 100_000 + 70_000 for f in shards)
    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    whole = read_tensors(written["int8"])
    assert weight_map.keys() == whole.keys()
    for name, file in weight_map.items():
        np.testing.assert_array_equal(safetensors.numpy.load_file(os.path.join(out, file))[name], whole[name])
