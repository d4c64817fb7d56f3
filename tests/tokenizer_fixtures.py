"""DeepSeek-style tokenizer files for tests, built offline with `tokenizers`.

`write_tokenizer(path)` gives any test checkpoint directory a tokenizer shaped like DeepSeek-V3/R1's:
byte-level BPE with DeepSeek's pre-tokenizer splits, BOS added by the post-processor, the chat
special tokens as added tokens, a `tokenizer_config.json` with the published R1 (or V3) chat
template, and a `generation_config.json`. The vocabulary is small (about 1k) and trained on a fixed
text, so the files are identical on every run.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
)
VOCAB_SIZE = 1024  # before the added tokens

# DeepSeek-R1's published template (tokenizer_config.json of deepseek-ai/DeepSeek-R1): system
# prompts joined, user/assistant turns, tool calls, earlier turns' reasoning cut at </think>, and
# a generation prompt that opens the reasoning block.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# DeepSeek-V3's template differs in the generation prompt (no reasoning block) and keeps the
# assistant turns whole.
V3_TEMPLATE = (
    R1_TEMPLATE
    .replace("{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}", "")
    .replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
)

TEMPLATES = {"r1": R1_TEMPLATE, "v3": V3_TEMPLATE}


def _corpus() -> list[str]:
    # Mixed scripts, so that merges cut multi-byte characters (what the stream decoder must survive).
    base = [
        "The quick brown fox jumps over the lazy dog. Hello, world!",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
        "Café, naïve, héllo, déjà vu, crème brûlée, Straße, señor, über, façade.",
        "世界你好，今天天气很好。我们一起学习语言模型。日本語のテキストもあります。",
        "Emoji: 🙂 😀 🚀 👍🏽 ❤️ 🎉 — and math: ∑ ∫ √ π ≈ 3.14159, 1234567890.",
        "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم",
        "<think>\nLet me think step by step.\n</think>\n\nThe answer is 42.",
        "System: you are a helpful assistant. User: what is 2 + 2? Assistant: 4.",
    ]
    return [f"{line} {i}" for i in range(40) for line in base]


@functools.cache
def _tokenizer_json() -> str:
    # Trained once per process: checkpoints in many tests can each get a tokenizer cheaply.
    return _build_tokenizer().to_str(pretty=True)


def vocab_size() -> int:
    """Number of ids the written tokenizer uses (added tokens included): a model config's
    vocab_size must be at least this."""
    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def _build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # DeepSeek-V3's tokenizer.json: digits in groups of up to 3, CJK runs, a GPT-style word regex,
    # then byte-level mapping without its own regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated"),
        pre_tokenizers.Split(
            Regex(
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            ),
            behavior="isolated",
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2 as in DeepSeek-V3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # The chat markers are added tokens that decode even with skip_special_tokens (as in DeepSeek's files).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (USER, ASSISTANT, THINK, END_THINK, *TOOL_TOKENS)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def _added_token(content: str) -> dict:
    # tokenizer_config.json stores DeepSeek's special tokens in this serialised AddedToken form.
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer(path: str | Path, template: str | None = "r1") -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `path`.

    template: "r1" (DeepSeek-R1's chat template), "v3" (DeepSeek-V3's), or None (no chat template).
    Returns `path`. The BOS id is 0, the EOS id 1, and ids stay below `vocab_size()` (661); the
    files are byte-identical on every run.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": _added_token(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    if template is not None:
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {sorted(TEMPLATES)} or None, got {template!r}")
        config["chat_template"] = TEMPLATES[template]
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    generation = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                  "temperature": 0.6, "top_p": 0.95}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return path
