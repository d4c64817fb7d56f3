"""The ktjax command line: help, version, info, generate (streamed and --json), chat, errors."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import ktjax
from ktjax import __version__
from ktjax.cli.main import main
from reference import make_reference, save_reference
from tokenizer_fixtures import EOS, vocab_size, write_tokenizer


@pytest.fixture(scope="module")
def ref():
    return make_reference("v3", seed=2, vocab_size=vocab_size() + 7)


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    save_reference(ref, path)
    write_tokenizer(path, template="r1")
    return str(path)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt):
    return transformers.AutoTokenizer.from_pretrained(ckpt)


def reference_reply(ref, tokenizer, ids: list[int], n: int) -> tuple[list[int], str]:
    """transformers' greedy continuation of `ids` (at most n tokens, ending at the end-of-sentence
    token), with its text as the tokenizer decodes it."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids_T = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
        out = ref.generate(ids_T, attention_mask=torch.ones_like(ids_T), max_new_tokens=n, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def reference_chat_reply(ref, tokenizer, messages: list[dict], n: int) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return reference_reply(ref, tokenizer, tokenizer.encode(text, add_special_tokens=False), n)[1]


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


def test_generate_json_is_transformers_greedy_continuation(ckpt, ref, hf_tokenizer, capsys):
    assert main(["generate", "--model", ckpt, "--prompt", "hello world", "--max-new-tokens", "12", "--json",
                 "--temperature", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt = hf_tokenizer.encode("hello world")  # bos first, as the tokenizer's post-processor adds it
    want_ids, want_text = reference_reply(ref, hf_tokenizer, prompt, 12)
    assert result["token_ids"] == want_ids and result["text"] == want_text
    assert result["stats"]["prompt_tokens"] == len(prompt) and result["stats"]["new_tokens"] == len(want_ids)


def test_generate_streams_from_standard_input(ckpt, ref, hf_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):"))
    assert main(["generate", "--model", ckpt, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    _, reply = reference_reply(ref, hf_tokenizer, hf_tokenizer.encode("def f(x):"), 6)
    assert captured.out == "def f(x):" + reply + "\n" and "tokens/s" in captured.err


def test_chat_keeps_history_and_resets(ckpt, ref, hf_tokenizer, capsys, monkeypatch):
    """Each reply continues the whole conversation so far (transformers' greedy reply to the template's
    rendering of it); after /reset the same message is answered as a first one."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nwhat is 2+2?\n/reset\nwhat is 2+2?\n/quit\n"))
    assert main(["chat", "--model", ckpt, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    first = reference_chat_reply(ref, hf_tokenizer, [{"role": "user", "content": "hi"}], 6)
    second = reference_chat_reply(ref, hf_tokenizer, [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": first},
                                                      {"role": "user", "content": "what is 2+2?"}], 6)
    alone = reference_chat_reply(ref, hf_tokenizer, [{"role": "user", "content": "what is 2+2?"}], 6)
    assert second != alone, "premise: the model answers differently with the history, so the test can see it"
    assert out == f">>> {first}\n>>> {second}\n>>> >>> {alone}\n>>> "
    assert "conversation cleared" in err and "dropped" not in err


def test_chat_drops_the_oldest_turns_when_the_conversation_outgrows_the_context(ckpt, ref, hf_tokenizer, capsys,
                                                                                 monkeypatch):
    turns = [{"role": "user", "content": "hi"}]
    first = reference_chat_reply(ref, hf_tokenizer, turns, 6)
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "what is 2+2?"}]
    whole = len(hf_tokenizer.encode(hf_tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                                    tokenize=False), add_special_tokens=False))
    # Room for the first turn and for the last message alone, not for the conversation.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nwhat is 2+2?\n"))
    assert main(["chat", "--model", ckpt, "--max-new-tokens", "6", "--temperature", "0",
                 "--max-context", str(whole - 1 + 6)]) == 0
    out, err = capsys.readouterr()
    alone = reference_chat_reply(ref, hf_tokenizer, turns[2:], 6)
    assert out == f">>> {first}\n>>> {alone}\n>>> \n"
    assert "dropped its oldest turns" in err


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


def test_info_says_whether_host_experts_fit_the_machine(ckpt, capsys, monkeypatch):
    from ktjax.runtime import host_memory
    args = ["info", "--model", ckpt, "--gpu-memory", "200MiB", "--max-context", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "of routed experts; this machine has" in out and "loading would stop" not in out
    monkeypatch.setattr(host_memory, "available_memory", lambda: 1 << 10)  # a machine with 1 KiB to spare
    assert main(args) == 0
    assert "host memory: loading would stop:" in capsys.readouterr().out


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


@pytest.mark.parametrize("setting, value, off", [("top_k", 3, 0), ("top_p", 0.3, 1.0)])
def test_sampling_defaults_come_from_generation_config(ckpt, tmp_path, capsys, setting, value, off):
    """generation_config.json's temperature, top_k and top_p are the defaults; options override them."""
    path = shutil.copytree(ckpt, tmp_path / "sampled")
    gen = json.loads((path / "generation_config.json").read_text())
    gen = {k: v for k, v in gen.items() if k not in ("top_k", "top_p")}
    (path / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 1.5,
                                                             setting: value}))
    args = ["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "16", "--json", "--seed", "3"]
    model = ktjax.load(path)

    def library(**settings):
        return ktjax.generate(model, "abc", max_new_tokens=16, seed=3, **{"temperature": 1.5, **settings}).token_ids

    assert library(**{setting: value}) != library(**{setting: off}), f"premise: {setting}={value} changes the draw"
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == library(**{setting: value})
    assert main(args + [f"--{setting.replace('_', '-')}", str(off)]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == library(**{setting: off})
    assert main(args + ["--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == library(temperature=0.0)


def test_import_works_from_a_plain_checkout(tmp_path):
    """`import ktjax` from a copy of the checkout with no install in the way finds the whole package,
    the model and the kernels included."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ktjax_file())))
    shutil.copytree(os.path.join(root, "ktjax"), tmp_path / "ktjax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import ktjax, ktjax.models, ktjax.kernels; print(ktjax.models.__file__, ktjax.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(tmp_path / "ktjax" / "models" / "__init__.py"),
                           str(tmp_path / "ktjax" / "kernels" / "__init__.py")]


def test_the_repository_root_shadows_no_other_projects_import_names():
    """`python -m pytest` and scripts run from the repository root put it first on sys.path, so any
    package or module there hides an installed one of the same name (a top-level `kernels/` once hid
    the `kernels` package transformers imports). The root holds one import name: ktjax."""
    root = Path(ktjax_file()).resolve().parents[1]
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.stem for p in root.glob("*.py")}
    assert names == {"ktjax"}


def ktjax_file() -> str:
    import ktjax
    return ktjax.__file__
