"""The ktjax command line: help, version, info, generate (streamed and --json), chat, errors."""

import io
import json
import os
import subprocess
import sys

import pytest

from ktjax import __version__
from ktjax.cli.main import main
from reference import make_reference, save_reference
from tokenizer_fixtures import vocab_size, write_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    save_reference(make_reference("v3", seed=2, vocab_size=vocab_size() + 7), path)
    write_tokenizer(path, template="r1")
    return str(path)


def test_help_explains_every_command_and_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("generate", "chat", "info"))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--json"):
        assert opt in out
    assert "standard input" in out and "nucleus" in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ktjax {__version__}"


def test_info_counts_parameters_by_group(ckpt, capsys):
    assert main(["info", "--model", ckpt]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3" in out and "routed_experts" in out and "total" in out


def test_generate_json(ckpt, capsys):
    assert main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) <= 5 and isinstance(result["text"], str)
    assert result["stats"]["prompt_tokens"] > 0 and result["stats"]["new_tokens"] == len(result["token_ids"])


def test_generate_streams_from_standard_input(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):"))
    assert main(["generate", "--model", ckpt, "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):") and "tokens/s" in captured.err


def test_chat_keeps_history_and_resets(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you\n/reset\nbye\n/quit\n"))
    assert main(["chat", "--model", ckpt, "--max-new-tokens", "3"]) == 0
    assert "conversation cleared" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "--model /nonexistent: no such checkpoint directory"),
    (["info", "--model", "/nonexistent"], "--model /nonexistent: no such checkpoint directory"),
])
def test_bad_input_is_one_line_naming_the_file(argv, needle, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_installed_console_script_runs():
    script = os.path.join(os.path.dirname(sys.executable), "ktjax")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True).stdout
    assert __version__ in out


def test_info_with_a_budget_prints_the_placement_plan(ckpt, capsys):
    assert main(["info", "--model", ckpt, "--gpu-memory", "1TB", "--max-context", "64"]) == 0
    out = capsys.readouterr().out
    assert "placement under gpu_memory=1TB" in out and "kv_cache" in out and "device total" in out


def test_budget_too_small_is_one_line_saying_what_is_needed(ckpt, capsys):
    assert main(["generate", "--model", ckpt, "--prompt", "x", "--gpu-memory", "1MB"]) == 1
    err = capsys.readouterr().err.strip()
    assert "too small" in err and "need" in err and len(err.splitlines()) == 1


def test_generate_profile_and_trace_on_an_offloaded_model(ckpt, capsys, tmp_path, monkeypatch):
    import ktjax.cli.common
    real_load = ktjax.cli.common.load
    monkeypatch.setattr(ktjax.cli.common, "load", lambda path, **kw: real_load(
        path, **{**kw, "placement": {r".*\.mlp\.experts\..*": "host"}, "gpu_memory": None}))
    assert main(["generate", "--model", ckpt, "--prompt", "hi", "--max-new-tokens", "3", "--profile",
                 "--trace", str(tmp_path / "trace"), "--max-context", "64"]) == 0
    err = capsys.readouterr().err
    assert "from host memory per step" in err and "experts" in err and "pinned_host" in err
    assert any((tmp_path / "trace").rglob("*.xplane.pb"))


def test_sampling_defaults_come_from_generation_config(tmp_path, capsys):
    import ktjax
    path = tmp_path / "sampled"
    save_reference(make_reference("v3", seed=4, vocab_size=vocab_size() + 7), path)
    write_tokenizer(path, template="r1")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 1.3, "top_k": 7}))
    assert main(["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"]
    model = ktjax.load(path)
    assert got == ktjax.generate(model, "abc", max_new_tokens=6, temperature=1.3, top_k=7).token_ids
    assert main(["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "6", "--json",
                 "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ktjax.generate(model, "abc", max_new_tokens=6).token_ids


def test_import_works_from_a_plain_checkout(tmp_path):
    """`import ktjax` from the repository root, with no install in the way: models/ and kernels/
    sit beside ktjax/ there, and the package still finds them."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(ktjax_file())))
    for folder in ("ktjax", "models", "kernels"):
        shutil.copytree(os.path.join(root, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import ktjax, ktjax.models, ktjax.kernels; print(ktjax.models.__file__, ktjax.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(tmp_path / "models" / "__init__.py"), str(tmp_path / "kernels" / "__init__.py")]


def ktjax_file() -> str:
    import ktjax
    return ktjax.__file__
