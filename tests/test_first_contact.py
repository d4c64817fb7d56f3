"""What a new user meets first (issue 15's audit): short summaries, inputs checked before anything
slow runs, and every mistake reported in one line naming its cause."""

import json
import os

import numpy as np
import pytest

import ktjax
from ktjax.cli.main import main
from reference import make_reference, save_reference
from tokenizer_fixtures import vocab_size, write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("first_contact")
    save_reference(make_reference("v3", seed=5, num_hidden_layers=2, first_k_dense_replace=1, vocab_size=vocab_size() + 7), path)
    write_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt):
    return ktjax.load(ckpt, dtype="float32")


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def error_line(capsys) -> str:
    """The error a command ended with (after its progress lines), with no traceback before it."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_model_prints_as_a_short_summary(model):
    text = repr(model)
    assert len(text.splitlines()) <= 12 and "Array(" not in text and "deepseek" in text.lower()


def test_paths_with_a_tilde_are_expanded(ckpt, monkeypatch):
    home = os.path.dirname(ckpt)
    monkeypatch.setenv("HOME", home)
    tokens = [[1, 2, 3]]
    got = ktjax.logits(ktjax.load("~/" + os.path.basename(ckpt), dtype="float32"), tokens)
    assert np.array_equal(np.asarray(got), np.asarray(ktjax.logits(ktjax.load(ckpt, dtype="float32"), tokens)))


@pytest.mark.parametrize("tokens, needle", [
    ([[1, 2, 10 ** 6]], "outside the vocabulary"),
    ([[1, 2, -1]], "outside the vocabulary"),
    ([[1, 2, 3], [4, 5]], "ragged rows"),
])
def test_logits_refuse_token_ids_the_model_cannot_read(model, tokens, needle):
    with pytest.raises(ValueError, match=needle):
        ktjax.logits(model, tokens)


@pytest.mark.parametrize("option, value, needle", [
    ("--max-new-tokens", "-5", "--max-new-tokens must be at least 1"),
    ("--temperature", "-1", "--temperature must be >= 0"),
    ("--top-p", "5", "--top-p must be in (0, 1]"),
])
def test_sampling_option_errors_come_before_the_model_loads(option, value, needle, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ktjax.api, "load", no_loading)
    assert main(["generate", "--prompt", "x", option, value]) == 1
    assert needle in one_line(capsys)


def test_info_on_a_truncated_checkpoint_fails_in_one_line(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(ckpt):
        data = open(os.path.join(ckpt, name), "rb").read()
        (bad / name).write_bytes(data[:-100] if name.endswith(".safetensors") else data)
    assert main(["info", "--model", str(bad)]) == 1
    assert "truncated" in one_line(capsys)


def test_lora_on_routed_experts_of_an_offloaded_model_is_one_line(ckpt, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": "abc " * 20}) for _ in range(4)) + "\n")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--output", str(tmp_path / "out"),
                 "--gpu-memory", "65.5MiB", "--targets", "experts", "--steps", "1", "--seq-len", "16"]) == 1
    assert "routed experts" in error_line(capsys)


def test_a_loss_that_becomes_nan_is_one_line(ckpt, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": "abc " * 20}) for _ in range(4)) + "\n")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--output", str(tmp_path / "out"),
                 "--lr", "1e30", "--steps", "4", "--seq-len", "16", "--rank", "2"]) == 1
    err = error_line(capsys)
    assert err.startswith("ktjax: error: loss became") and "--lr" in err


def test_finetuning_keeps_the_experts_in_the_format_asked(ckpt, tmp_path, monkeypatch):
    """--experts int8 on an offloaded model: the experts stream in int8 and the adapter still learns."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": "abc " * 20}) for _ in range(4)) + "\n")
    seen = []
    real_load = ktjax.api.load

    def recording_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen.append(model.placement.expert_format.name)
        return model

    monkeypatch.setattr(ktjax.api, "load", recording_load)
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--output", str(tmp_path / "out"),
                 "--experts", "int8", "--gpu-memory", "65.5MiB", "--steps", "2", "--seq-len", "16",
                 "--rank", "2", "--targets", "o_proj"]) == 0
    assert seen == ["int8"] and (tmp_path / "out" / "adapter_model.safetensors").exists()
