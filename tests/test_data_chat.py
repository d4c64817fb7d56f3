"""Chat fine-tuning data trains what chat inference feeds and expects: for every assistant turn, the
context is byte for byte the prompt `chat_prompt` builds (and transformers renders) for the turns
before it, and the target is exactly the reply the model should then generate."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from ktjax.train import data as D
from ktjax.runtime.generation import chat_prompt
from ktjax.text import Tokenizer, assistant_turns, split_reasoning
from ktjax.text.chat_turns import reply_after
from tokenizer_fixtures import ASSISTANT, EOS, USER, write_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # AutoTokenizer reads local directories only

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Hi again!"},
]
# The answer opens with "<", as R1's generation prompt "<｜Assistant｜><think>\n" goes on after the tag.
ANSWER_LIKE_PROMPT_TAIL = [
    {"role": "user", "content": "Bold Paris in HTML"},
    {"role": "assistant", "content": "<b>Paris</b>"},
]
WITH_REASONING = [
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    {"role": "user", "content": "and 3 + 3?"},
    {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"},  # R1's raw output form
]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."},
]
CONVERSATIONS = {"multi-turn": MULTI_TURN, "answer like prompt tail": ANSWER_LIKE_PROMPT_TAIL,
                 "reasoning": WITH_REASONING, "tool call": TOOL_CALL}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: write_tokenizer(root / name, template=name) for name in ("r1", "v3")}


@pytest.fixture(scope="module")
def toks(tok_dirs):
    return {name: Tokenizer.from_dir(d) for name, d in tok_dirs.items()}


@pytest.fixture(scope="module")
def hf_tokenizers(tok_dirs):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {name: transformers.AutoTokenizer.from_pretrained(str(d)) for name, d in tok_dirs.items()}


def trained_turns(examples: list[D.Example]) -> list[tuple[list[int], list[int]]]:
    """(context, target) ids of every assistant turn: each run of target tokens and all before it."""
    turns = []
    for ex in examples:
        mask = np.concatenate([[False], ex.mask, [False]])
        starts, ends = np.flatnonzero(~mask[:-1] & mask[1:]), np.flatnonzero(mask[:-1] & ~mask[1:])
        turns += [(ex.ids[:s].tolist(), ex.ids[s:e].tolist()) for s, e in zip(starts, ends)]
    return turns


def assistant_indices(messages):
    return [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]


@pytest.mark.parametrize("template", ["r1", "v3"])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_each_context_is_the_inference_prompt(toks, hf_tokenizers, tok_dirs, template, thinking, name):
    messages, tok = CONVERSATIONS[name], toks[template]
    model = SimpleNamespace(tokenizer=tok, path=str(tok_dirs[template]))  # what chat_prompt reads of a model
    turns = trained_turns(D.encode_chat(messages, tok, thinking=thinking))
    indices = assistant_indices(messages)
    assert len(turns) == len(indices)
    for (context, _), k in zip(turns, indices):
        assert context == chat_prompt(model, messages[:k], thinking=thinking)
        if thinking is None:  # transformers renders the same prompt independently
            theirs = hf_tokenizers[template].apply_chat_template(
                messages[:k], add_generation_prompt=True, tokenize=True, return_dict=False)
            assert context == list(theirs)


R1_REPLIES = {  # what R1 generates after "<｜Assistant｜><think>\n" when its reasoning is not trained
    "multi-turn": ["\n</think>\n\nHi!", "\n</think>\n\nHi again!"],
    "answer like prompt tail": ["\n</think>\n\n<b>Paris</b>"],
    "reasoning": ["\n</think>\n\n4", "\n</think>\n\n6"],
    # After tool outputs R1's template adds no generation prompt, so nothing was opened.
    "tool call": ["\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                  "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                  "It is 18C and sunny."],
}
V3_REPLIES = {
    "multi-turn": ["Hi!", "Hi again!"],
    "answer like prompt tail": ["<b>Paris</b>"],
    "reasoning": ["4", "6"],
    "tool call": [R1_REPLIES["tool call"][0].removeprefix("\n</think>\n\n"), "It is 18C and sunny."],
}


@pytest.mark.parametrize("template,replies", [("r1", R1_REPLIES), ("v3", V3_REPLIES)])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_each_target_is_the_reply(toks, template, replies, name):
    tok = toks[template]
    turns = trained_turns(D.encode_chat(CONVERSATIONS[name], tok))
    assert [tok.decode(target) for _, target in turns] == [r + EOS for r in replies[name]]
    for _, target in turns:  # the reply as the model generates it: its own tokenization
        assert target == tok.encode(tok.decode(target), add_special_tokens=False)


def test_answer_keeps_the_character_the_prompt_tail_shares(toks):
    tok = toks["r1"]
    [(context, target)] = trained_turns(D.encode_chat(ANSWER_LIKE_PROMPT_TAIL, tok))
    assert tok.decode(context).endswith(f"{ASSISTANT}<think>\n")
    assert tok.decode(target) == f"\n</think>\n\n<b>Paris</b>{EOS}"


@pytest.mark.parametrize("template,thinking,opened", [
    ("r1", None, True), ("r1", True, True), ("r1", False, False),
    ("v3", None, False), ("v3", True, True), ("v3", False, False),
])
def test_keep_reasoning_trains_the_reasoning(toks, template, thinking, opened):
    tok = toks[template]
    examples = D.encode_record({"messages": WITH_REASONING}, tok, keep_reasoning=True, thinking=thinking)
    replies = [(context, tok.decode(target)) for context, target in trained_turns(examples)]
    # A reasoning field and R1's inline block give the same reply.
    for (context, reply), reasoning, answer in zip(replies, ["add them", "add again"], ["4", "6"]):
        full = f"<think>\n{reasoning}\n</think>\n\n{answer}{EOS}"
        assert tok.decode(context).endswith(ASSISTANT + ("<think>\n" if opened else ""))
        assert reply == (full.removeprefix("<think>\n") if opened else full)


def test_v3_conversation_stays_one_example(toks):
    # V3's history renders each reply as it was trained, so every turn continues the same sequence.
    tok = toks["v3"]
    [ex] = D.encode_chat(MULTI_TURN, tok)
    assert tok.decode(ex.ids) == tok.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert tok.decode(ex.ids[ex.mask]) == f"Hi!{EOS}Hi again!{EOS}"


def test_r1_turns_are_separate_examples(toks):
    # R1's history shows "<｜Assistant｜>Hi!" where the first turn trained "<｜Assistant｜><think>\n...Hi!":
    # one sequence cannot hold both, so the second turn starts its own example.
    tok = toks["r1"]
    first, second = D.encode_chat(MULTI_TURN, tok)
    assert tok.decode(second.ids[~second.mask]).endswith(f"{ASSISTANT}Hi!{EOS}{USER}Again{ASSISTANT}<think>\n")
    assert first.mask.sum() and second.mask.sum()


def test_load_dataset_splits_whole_conversations(toks):
    tok = toks["r1"]
    records = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "a"},
                             {"role": "user", "content": "again"},
                             {"role": "assistant", "content": "b", "reasoning_content": "r"}]} for i in range(8)]
    ds = D.load_dataset(records, tok, seq_len=256, eval_fraction=0.25, seed=0, keep_reasoning=True)
    # R1: two examples per conversation, two conversations held out.
    assert (len(ds.train), len(ds.eval)) == (12, 4)
    train_text, eval_text = ("".join(tok.decode(ex.ids) for ex in exs) for exs in (ds.train, ds.eval))
    assert not any(f"question {i}{ASSISTANT}" in train_text and f"question {i}{ASSISTANT}" in eval_text
                   for i in range(8))
    assert f"r\n</think>\n\nb{EOS}" in [tok.decode(ex.ids[ex.mask]) for ex in ds.train + ds.eval]
    # thinking reaches the template as chat inference passes it: no "<think>\n" opening with False.
    ds = D.load_dataset(records, tok, seq_len=256, thinking=False)
    assert all(not tok.decode(ex.ids[~ex.mask]).endswith("<think>\n") for ex in ds.train)


def test_split_reasoning():
    assert split_reasoning({"role": "assistant", "content": "4", "reasoning_content": "r"}) == (
        "r", {"role": "assistant", "content": "4"})
    assert split_reasoning({"role": "assistant", "content": "<think>\nr\n</think>\n\n4"}) == (
        "r", {"role": "assistant", "content": "4"})
    assert split_reasoning({"role": "assistant", "content": "a <think> b"}) == (
        None, {"role": "assistant", "content": "a <think> b"})


def test_reply_after_splits_at_the_generation_prompt():
    assert reply_after("<A>", "<A><b>x</b><E>") == "<b>x</b><E>"
    assert reply_after("<A><think>\n", "<A><b>x</b><E>") == "\n</think>\n\n<b>x</b><E>"
    assert reply_after("<A><think>\n", "<A>x<E>", "r") == "r\n</think>\n\nx<E>"
    assert reply_after("<A>", "<A>x<E>", "r") == "<think>\nr\n</think>\n\nx<E>"
    with pytest.raises(ValueError, match="does not start with its generation prompt"):
        reply_after("<Bot>", "<A>x<E>")


def test_template_that_renders_reasoning_itself(tmp_path):
    # A template that writes reasoning_content itself: the reply is its rendering, not a second block.
    d = write_tokenizer(tmp_path, template="v3")
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
        "{% else %}<｜Assistant｜>{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n"
        "{% endif %}{{ m.content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}", encoding="utf-8")
    tok = Tokenizer.from_dir(d)
    messages = WITH_REASONING[:2]
    [kept] = assistant_turns(tok, messages, keep_reasoning=True)
    [dropped] = assistant_turns(tok, messages)
    assert kept.reply == f"<think>\nadd them\n</think>\n\n4{EOS}" and dropped.reply == f"4{EOS}"


def test_unsplittable_template_names_the_message(tmp_path):
    d = write_tokenizer(tmp_path, template="v3")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[bot] {% endif %}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^data\[0\]: message 1: .*does not start with its generation prompt"):
        D.encode_record({"messages": ANSWER_LIKE_PROMPT_TAIL}, Tokenizer.from_dir(d), "data[0]")
