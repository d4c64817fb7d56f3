"""Tokenizer and chat template for checkpoint directories in the transformers layout.

Reads `tokenizer.json` with the `tokenizers` library, the special tokens from `tokenizer_config.json`
and `generation_config.json`, and renders the checkpoint's own Jinja chat template the way
transformers' `apply_chat_template` renders it (ktjax.text.chat_template), so a prompt built here
is the prompt the model was trained on.

A checkpoint without `tokenizer.json` still loads: `load_tokenizer` returns None, the token-id APIs
work, and the text APIs call `require_tokenizer`, which raises `TokenizerMissingError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ktjax.text.chat_template import compile_template, plain, render_template
from ktjax.text.reasoning import THINK_OPEN, THINK_TAG
from ktjax.text.stream import StreamDecoder

__all__ = ["Tokenizer", "TokenizerError", "TokenizerMissingError", "load_tokenizer", "require_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here; it wins over the config's
# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer file ktjax cannot use; the one-line message names the file."""


class TokenizerMissingError(TokenizerError):
    """A text API was called on a checkpoint without the file it needs; the message names the file.

    Build it with `TokenizerMissingError.for_file(path)` (or pass a finished message)."""

    @classmethod
    def for_file(cls, path: str | os.PathLike, detail: str | None = None) -> TokenizerMissingError:
        detail = detail or "missing; text APIs need a tokenizer (token-id APIs work without one)"
        return cls(f"{os.fspath(path)}: {detail}")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as plain strings or as serialised AddedTokens.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special token ids and its chat template.

    Build it with `Tokenizer.from_dir(path)` (or `load_tokenizer(path)`, which returns None when the
    directory has no tokenizer).
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        chat_template: str | None = None,
        template_source: str = "chat template",
        template_problem: str | None = None,
        path: str | None = None,
    ):
        self._tok = tokenizer
        self.path = path
        # Named special tokens (bos_token, eos_token, ...) as strings; also template variables.
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self._template_source = template_source
        self._template_problem = template_problem  # why there is no usable template, for the error
        self._template: jinja2.Template | None = None
        if chat_template is not None:
            try:
                self._template = compile_template(chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(
                    f"{template_source}: bad chat template: {e.message} (template line {e.lineno})"
                ) from None

        bos = self.special_tokens.get("bos_token")
        bos_id = self.token_to_id(bos) if bos else None
        self.bos_token_id: int | None = bos_id if bos_id is not None else bos_token_id
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id: int | None = self.token_to_id(pad) if pad else None
        ids = [int(i) for i in eos_token_ids]
        eos = self.special_tokens.get("eos_token")
        eos_id = self.token_to_id(eos) if eos else None
        if eos_id is not None and eos_id not in ids:
            ids.append(eos_id)
        # Every id here ends generation: DeepSeek lists several in generation_config.json.
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read the tokenizer files of a checkpoint directory.

        Raises TokenizerMissingError if `tokenizer.json` is absent and TokenizerError for a file
        that cannot be used; both messages are one line naming the file.
        """
        root = Path(path)
        tok_file = root / TOKENIZER_FILE
        if not tok_file.is_file():
            raise TokenizerMissingError.for_file(tok_file)
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{tok_file}: cannot read tokenizer ({_one_line(e)})") from None

        config_file = root / CONFIG_FILE
        config = _read_json(config_file)
        generation = _read_json(root / GENERATION_CONFIG_FILE)

        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(name))
            if content is not None:
                special[name] = content
        _add_config_tokens(tok, config, special)

        eos = generation.get("eos_token_id")
        eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if not all(isinstance(i, int) for i in eos_ids):
            raise TokenizerError(
                f"{root / GENERATION_CONFIG_FILE}: eos_token_id must be an int or a list of ints, got {eos!r}"
            )
        bos_id = generation.get("bos_token_id")

        template, source, problem = _find_template(root, config)
        return cls(
            tok,
            special_tokens=special,
            eos_token_ids=eos_ids,
            bos_token_id=bos_id if isinstance(bos_id, int) else None,
            chat_template=template,
            template_source=source,
            template_problem=problem,
            path=str(root),
        )

    # -- tokens --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, tokenizer.json's post-processor adds its
        tokens (DeepSeek: BOS first); like transformers 5, `add_bos_token` in the config is not read."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints, numpy arrays included). Defaults as transformers:
        special tokens are kept unless skip_special_tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        thinking: bool | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template.

        The text is what transformers' `apply_chat_template` renders from the same files and
        arguments (note our add_generation_prompt defaults to True: a prompt is what we generate from).
        Extra keyword arguments become template variables, as there; so do bos_token, eos_token, ...

        thinking: None renders the template unchanged. True makes sure a generation prompt ends
        with DeepSeek-R1's "<think>\\n" (appended if the template did not open the block), which
        forces R1 to reason. False removes a trailing "<think>\\n" that the template added, so the
        prompt ends at the assistant tag as in DeepSeek-V3 (an R1 model may still start reasoning
        itself). Either way `thinking` is also passed to the template, which is how templates with
        a built-in switch (DeepSeek-V3.1's) select their mode.

        tokenize: return token ids (without adding special tokens: the template writes them).
        """
        if self._template is None:
            root = Path(self.path) if self.path else Path(".")
            raise TokenizerMissingError.for_file(
                root / CONFIG_FILE,
                self._template_problem
                or f"no chat_template (nor {TEMPLATE_FILE}); chat needs one (plain-text prompts work without it)",
            )
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of message dicts, got {type(messages).__name__}")
        if len(messages) == 0:
            raise ValueError("cannot apply a chat template to an empty conversation; give at least one message")
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise TypeError(f"tools must be JSON schemas (dicts), got {tool!r}")
        if thinking is not None:
            kwargs["thinking"] = thinking
        variables = {**self.special_tokens, **plain(kwargs)}  # caller's kwargs override the special tokens
        try:
            text = render_template(self._template, messages, add_generation_prompt=add_generation_prompt,
                                   tools=tools, documents=documents, variables=variables)
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as e:
            raise TokenizerError(f"{self._template_source}: chat template failed: {_one_line(e)}") from None
        if add_generation_prompt and thinking is True:
            if not text.endswith((THINK_TAG, THINK_OPEN)):
                text += THINK_OPEN
        elif add_generation_prompt and thinking is False and text.endswith(THINK_OPEN):
            text = text[: -len(THINK_OPEN)]
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, chat_template={self._template is not None})")


def _add_config_tokens(tok: HFTokenizer, config: Mapping[str, Any], special: Mapping[str, str]) -> None:
    # transformers adds the special and extra tokens named in tokenizer_config.json when
    # tokenizer.json lacks them; do the same so both tokenize alike.
    wanted: list[tuple[str, bool]] = [(t, True) for t in special.values()]
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for value in decoder.values():
            content = _token_content(value)
            if content is not None:
                wanted.append((content, bool(value.get("special", True)) if isinstance(value, Mapping) else True))
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, list):
            wanted.extend((c, True) for c in map(_token_content, extra) if c is not None)
    missing = [(t, s) for t, s in dict(wanted).items() if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True) for t, s in missing if s])
        tok.add_tokens([AddedToken(t, special=False) for t, s in missing if not s])


def _find_template(root: Path, config: Mapping[str, Any]) -> tuple[str | None, str, str | None]:
    """(template, where it came from, why there is none). The sibling chat_template.jinja wins,
    as in transformers 5; the config's entry may be a string or a list of {name, template}."""
    jinja_file = root / TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file), None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read ({_one_line(e)})") from None
    config_file = root / CONFIG_FILE
    entry = config.get("chat_template")
    if entry is None:
        return None, str(config_file), None
    if isinstance(entry, str):
        return entry, str(config_file), None
    if isinstance(entry, Mapping):  # {name: template}
        entry = [{"name": k, "template": v} for k, v in entry.items()]
    if isinstance(entry, list) and all(isinstance(e, Mapping) for e in entry):
        named = {e.get("name"): e.get("template") for e in entry}
        if isinstance(named.get("default"), str):
            return named["default"], str(config_file), None
        return None, str(config_file), f"chat_template has no 'default' entry (has {sorted(map(str, named))})"
    raise TokenizerError(f"{config_file}: chat_template must be a string or a list of {{name, template}}, "
                         f"got {type(entry).__name__}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of checkpoint directory `path`, or None if it has no tokenizer.json.

    Bad tokenizer files still raise TokenizerError: a checkpoint without a tokenizer is fine, a
    broken one is a mistake worth stopping for."""
    if not (Path(path) / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer.from_dir(path)


def require_tokenizer(tokenizer: Tokenizer | None, path: str | os.PathLike | None) -> Tokenizer:
    """`tokenizer`, or the TokenizerMissingError a text API raises when the checkpoint at `path` has none."""
    if tokenizer is None:
        raise TokenizerMissingError.for_file(Path(path or ".") / TOKENIZER_FILE)
    return tokenizer
