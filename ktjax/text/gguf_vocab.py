"""The tokenizer and chat template stored in a GGUF file, as a `tokenizers` tokenizer.

llama.cpp's converter writes a byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2") as the
token strings in id order, their types, the merges, the special ids and `add_bos_token`; the
pre-tokenizer is not stored, only its name (`tokenizer.ggml.pre`), which selects regexes in
llama.cpp's llama-vocab.cpp. The same regexes are used here as `tokenizers` Split steps before the
byte-level mapping, which is how DeepSeek's own tokenizer.json spells them.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ktjax.text.tokenizer import Tokenizer, TokenizerError

# gguf.TokenType values (as llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4


def _splits(*patterns: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer(pre: str | None, where: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer `pre` (llama-vocab.cpp's regexes for it)."""
    if pre in ("gpt-2", None):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "deepseek-v3":
        return _splits(
            r"\p{N}{1,3}",
            "[一-龥\u3040-ゟ゠-ヿ]+",
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        )
    if pre == "deepseek-llm":
        return _splits(
            "[\r\n]",
            # llama.cpp's class as DeepSeek-LLM's tokenizer.json has it; the escapes are characters that
            # Unicode normalisation would turn into others (the Kelvin and Ohm signs, Greek with oxia).
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
            r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
            r"\s+$",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}+",
        )
    if pre == "deepseek-coder":
        return _splits("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")
    raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                         "(ktjax reads 'deepseek-v3', 'deepseek-llm', 'deepseek-coder' and 'gpt-2')")


def tokenizer_from_metadata(meta, where: str) -> Tokenizer | None:
    """The tokenizer of a GGUF file's metadata (`ktjax.io.gguf.Metadata`), None without a vocabulary."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise TokenizerError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (ktjax reads byte-level BPE, 'gpt2')")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre"), where)
    tok.decoder = decoders.ByteLevel()
    # Control tokens are the special ones (skipped when decoding with skip_special_tokens); user-defined
    # ones are added tokens matched whole in the text, as tokenizer.json's added_tokens are.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key: str) -> tuple[int | None, str | None]:
        i = meta.get(key)
        return (i, tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else (None, None)

    bos_id, bos = token("tokenizer.ggml.bos_token_id")
    eos_id, eos = token("tokenizer.ggml.eos_token_id")
    eot_id, _ = token("tokenizer.ggml.eot_token_id")
    _, pad = token("tokenizer.ggml.padding_token_id")
    # Files that do not say (converted before the key existed): DeepSeek's tokenizers add BOS.
    pre = meta.get("tokenizer.ggml.pre") or ""
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.startswith("deepseek"))) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first, last = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        special = [(t, i) for t, i, on in ((bos, bos_id, add_bos), (eos, eos_id, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} {first.replace(':0', ':1')}$B:1{last.replace(':0', ':1')}",
            special_tokens=list(dict(special).items()))
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    return Tokenizer(
        tok,
        special_tokens={k: v for k, v in named.items() if v is not None},
        eos_token_ids=[i for i in (eos_id, eot_id) if i is not None],
        bos_token_id=bos_id,
        chat_template=meta.get("tokenizer.chat_template"),
        template_source=f"{where} (tokenizer.chat_template)",
        template_problem=None if meta.get("tokenizer.chat_template") else
        f"{where}: no tokenizer.chat_template; chat needs one (plain-text prompts work without it)",
        path=os.path.dirname(where),
    )


def gguf_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer stored in the GGUF model at `path` (None if it stores none)."""
    from ktjax.io.gguf import open_gguf

    ckpt = open_gguf(path)
    return tokenizer_from_metadata(ckpt.meta, ckpt.where)
