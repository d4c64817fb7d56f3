"""Tokenizer and chat template: ktjax against transformers on the same DeepSeek-style files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from ktjax.text import (
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    TokenizerMissingError,
    load_tokenizer,
    require_tokenizer,
)
from tokenizer_fixtures import ASSISTANT, BOS, EOS, THINK, USER, vocab_size, write_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # AutoTokenizer reads local directories only

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in French."},
    ],
    "two systems, multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Write fibonacci in Python."},
        {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"},
        {"role": "user", "content": "Thanks 🙂 世界"},
    ],
    "earlier reasoning": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "reasoning_content": "add them"},
        {"role": "user", "content": "and 3 + 3?"},
    ],
    "tool call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
        ]},
        {"role": "tool", "content": "18C, sunny"},
        {"role": "tool", "content": "14:00"},
        {"role": "assistant", "content": "It is 18C and sunny at 14:00."},
        {"role": "user", "content": "Thanks"},
    ],
    "None-valued keys": [{"role": "user", "content": "hi", "name": None}],
}

TEXTS = [
    "Hello, world!",
    "héllo 世界 🙂",
    "def fibonacci(n):\n    return n\n\n\n  indented  spaces\t tab",
    f"{BOS}{USER}Why?{ASSISTANT}{THINK}\nBecause.</think>\n\nDone.{EOS}",
    "Numbers 1234567 and ∑ √ π ≈ 3.14159, Привет 👍🏽",
    "",
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: write_tokenizer(root / name, template=name) for name in ("r1", "v3")}


@pytest.fixture(scope="module")
def hf_tokenizers(tok_dirs):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # its note about LlamaTokenizerFast vs ByteLevel is expected
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in tok_dirs.items()}


@pytest.fixture(scope="module")
def toks(tok_dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(d) for name, d in tok_dirs.items()}


# -- chat template -----------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["r1", "v3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(toks, hf_tokenizers, template, add_generation_prompt, name):
    messages = CONVERSATIONS[name]
    ours = toks[template].apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizers[template].apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    ours_ids = toks[template].apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    theirs_ids = hf_tokenizers[template].apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours_ids == list(theirs_ids)


def test_r1_prompt_shape(toks):
    text = toks["r1"].apply_chat_template(CONVERSATIONS["system"])
    assert text == f"{BOS}You are a helpful assistant.{USER}Say hello in French.{ASSISTANT}<think>\n"


# Exercises what the environment provides beyond plain Jinja: namespace, dict, tojson (no HTML
# escaping, unicode kept), loop controls, {% generation %}, extra variables, trim/lstrip blocks.
FEATURE_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m.role }}: {{ m.content | tojson }}
  {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor %}
{{ dict(a=1, b='<&>') | tojson(sort_keys=true) }}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% if custom_flag %}custom={{ custom_flag }}{% endif %}
{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"""


@pytest.mark.parametrize("form", ["jinja file", "config list"])
def test_template_sources_and_environment_match_transformers(tmp_path, form):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    d = write_tokenizer(tmp_path, template="r1")
    if form == "jinja file":
        # transformers 5 writes the template next to the config, and that file wins over the config's entry.
        (d / "chat_template.jinja").write_text(FEATURE_TEMPLATE, encoding="utf-8")
    else:
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = [{"name": "other", "template": "x"}, {"name": "default", "template": FEATURE_TEMPLATE}]
        (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    messages = CONVERSATIONS["two systems, multi-turn"] + [{"role": "assistant", "content": "<b>\"quoted\" & 世界</b>"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "é <x>", "parameters": {}}}]
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    for kwargs in ({}, {"tools": tools, "custom_flag": "yes"}):
        for agp in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=agp, **kwargs) == expected
    assert "custom=yes" in expected and '"<&>"' in expected


def test_thinking_option(toks):
    messages = CONVERSATIONS["system"]
    r1, v3 = toks["r1"], toks["v3"]
    r1_text = r1.apply_chat_template(messages)
    v3_text = v3.apply_chat_template(messages)
    assert r1_text.endswith(f"{ASSISTANT}<think>\n") and v3_text.endswith(ASSISTANT)
    # True forces the reasoning block open (once); False leaves the prompt at the assistant tag.
    assert r1.apply_chat_template(messages, thinking=True) == r1_text
    assert v3.apply_chat_template(messages, thinking=True) == r1_text
    assert r1.apply_chat_template(messages, thinking=False) == v3_text
    assert v3.apply_chat_template(messages, thinking=False) == v3_text
    # Without a generation prompt there is nothing to open.
    assert v3.apply_chat_template(messages, add_generation_prompt=False, thinking=True) == \
        v3.apply_chat_template(messages, add_generation_prompt=False)
    ids = v3.apply_chat_template(messages, thinking=True, tokenize=True)
    assert ids[-2:] == [v3.token_to_id(THINK), v3.encode("\n", add_special_tokens=False)[0]]


def test_template_errors(tmp_path, toks):
    d = write_tokenizer(tmp_path / "bad", template="r1")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }", encoding="utf-8")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(d)
    assert str(e.value).startswith(f"{d / 'chat_template.jinja'}: bad chat template") and "\n" not in str(e.value)

    (d / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
        encoding="utf-8",
    )
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="chat_template.jinja: chat template failed: first message must be"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        toks["r1"].apply_chat_template([])

    d2 = write_tokenizer(tmp_path / "none", template=None)
    with pytest.raises(TokenizerMissingError) as e:
        Tokenizer.from_dir(d2).apply_chat_template(CONVERSATIONS["system"])
    assert str(e.value).startswith(f"{d2 / 'tokenizer_config.json'}: no chat_template")


# -- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(toks, hf_tokenizers, text):
    ours, hf = toks["r1"], hf_tokenizers["r1"]
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == hf.encode(text, add_special_tokens=add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode(text)[:1] == [ours.bos_token_id]
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_special_tokens(toks, hf_tokenizers, tmp_path):
    tok, hf = toks["r1"], hf_tokenizers["r1"]
    assert tok.vocab_size == len(hf) == vocab_size()
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (0, (1,), 1)
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert tok.encode_batch(["a b", "世界"]) == [tok.encode("a b"), tok.encode("世界")]

    # Plain-string special tokens and an eos list in generation_config.json: every listed id stops.
    d = write_tokenizer(tmp_path, template="r1")
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(bos_token=BOS, eos_token=EOS, pad_token=None)
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    user_id = tok.token_to_id(USER)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [user_id, 1]}))
    t = Tokenizer.from_dir(d)
    assert (t.bos_token_id, t.eos_token_ids, t.pad_token_id) == (0, (user_id, 1), None)

    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id must be"):
        Tokenizer.from_dir(d)


# -- streaming ---------------------------------------------------------------------------------


def _pieces(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    out = [dec.push(i) for i in ids]
    return out + [dec.flush()]


@pytest.mark.parametrize("text", ["héllo 世界 🙂", "Emoji 👍🏽❤️🎉 and 日本語のテキスト, Ελληνικά", TEXTS[3]])
@pytest.mark.parametrize("skip", [False, True])
def test_stream_never_splits_a_character(toks, text, skip):
    tok = toks["r1"]
    ids = tok.encode(text)
    # The test is only meaningful if some token alone is part of a character.
    if text.startswith("héllo"):
        assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = _pieces(tok, ids, skip)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert list(StreamDecoder(tok, skip)(ids)) == [p for p in pieces if p]


def test_stream_joins_to_decode_on_random_ids(toks):
    # Random ids make invalid UTF-8 too: the pieces still join to exactly what decode() shows.
    tok = toks["r1"]
    rng = random.Random(0)
    for n in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert "".join(_pieces(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_extend_and_late_flush(toks):
    tok = toks["r1"]
    ids = tok.encode("🙂🙂 ok", add_special_tokens=False)
    dec = tok.stream_decoder()
    first = dec.extend(ids[:1])  # one byte-level token is only part of the emoji
    assert first == "" and dec.flush() == tok.decode(ids[:1])
    assert dec.flush() == ""


# -- missing and broken files ------------------------------------------------------------------


def test_missing_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None
    expected = f"{tmp_path / 'tokenizer.json'}: missing; text APIs need a tokenizer (token-id APIs work without one)"
    with pytest.raises(TokenizerMissingError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(e.value) == expected and isinstance(e.value, ValueError)
    with pytest.raises(TokenizerMissingError) as e:
        require_tokenizer(None, tmp_path)
    assert str(e.value) == expected
    tok = load_tokenizer(write_tokenizer(tmp_path / "ok"))
    assert require_tokenizer(tok, tmp_path / "ok") is tok


@pytest.mark.parametrize("file,content,match", [
    ("tokenizer.json", "{not json", "tokenizer.json: cannot read tokenizer"),
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": 3}}', "tokenizer.json: cannot read tokenizer"),
    ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON"),
    ("generation_config.json", "[1]", "generation_config.json: expected a JSON object"),
])
def test_bad_files_name_the_file(tmp_path, file, content, match):
    d = write_tokenizer(tmp_path)
    (d / file).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match) as e:
        load_tokenizer(d)
    assert str(e.value).startswith(str(d / file)) and "\n" not in str(e.value)
