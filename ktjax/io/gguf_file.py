"""A GGUF file set: finding its files, opening them with `gguf.GGUFReader`, its metadata, the
transformers-style config that llama.cpp's deepseek2 fields describe, and where each tensor's bytes are."""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as GGML

from ktjax.io import gguf_decode
from ktjax.io.checkpoint import CheckpointError

ARCH = "deepseek2"
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def is_gguf(path: str | os.PathLike) -> bool:
    """A .gguf file, or a directory of .gguf files without safetensors beside them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = os.listdir(path)
        return any(n.endswith(".gguf") for n in names) and not any(n.endswith(".safetensors") for n in names)
    return path.endswith(".gguf")


def gguf_files(path: str | os.PathLike) -> list[str]:
    """Every file of the model at `path`: one .gguf, the first (or any) of a split set
    (`name-00001-of-00009.gguf`), or a directory holding one model's .gguf files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
        if not names:
            raise CheckpointError(f"{path}: no *.gguf files")
        firsts = [n for n in names if not SPLIT_RE.search(n) or SPLIT_RE.search(n).group(1) == "00001"]
        if len(firsts) != 1:
            raise CheckpointError(f"{path}: holds {len(firsts)} GGUF models ({', '.join(firsts)}); name one file")
        path = os.path.join(path, firsts[0])
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    m = SPLIT_RE.search(path)
    if m is None:
        return [path]
    count = int(m.group(2))
    files = [path[:m.start()] + f"-{k:05d}-of-{count:05d}.gguf" for k in range(1, count + 1)]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (part of the split GGUF set {files[0]})")
    return files


def open_reader(file: str) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(file)
    except ValueError as e:
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if m:
            raise CheckpointError(f"{file}: unknown GGML tensor type {m.group(1)} (not a type gguf "
                                  f"{gguf_version()} knows)") from None
        if "cannot reshape array" in str(e):  # the reader maps each tensor's extent: one ran past the end
            raise CheckpointError(f"{file}: file is truncated ({os.path.getsize(file)} bytes; tensor data runs "
                                  "past its end)") from None
        raise CheckpointError(f"{file}: corrupt or truncated GGUF ({e})") from None
    except (IndexError, OverflowError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    size = os.path.getsize(file)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{file}: tensor {t.name}: file is truncated ({size} bytes, tensor ends at "
                                  f"{t.data_offset + t.n_bytes})")
    return reader


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # noqa: BLE001 - only decorates a message
        return "(unknown version)"


class Metadata:
    """The key/value fields of a GGUF file, read as plain Python values."""

    def __init__(self, reader: gguf.GGUFReader, file: str):
        self.reader, self.file = reader, file

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    def require(self, key: str):
        if key not in self:
            raise CheckpointError(f"{self.file}: metadata key {key} is missing")
        return self.get(key)


def config_dict(meta: Metadata, tensors: dict[str, gguf.ReaderTensor]) -> dict:
    """A transformers-style config.json dict from llama.cpp's deepseek2 metadata."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{meta.file}: architecture {arch!r} is not supported (ktjax reads {ARCH!r}: "
                              "DeepSeek-V2/V3/R1 as llama.cpp converts them)")
    k = lambda name: f"{ARCH}.{name}"  # noqa: E731
    get, req = meta.get, meta.require
    rope_dim = req(k("rope.dimension_count"))
    if k("attention.key_length_mla") in meta:  # the MLA converter: key/value_length describe the latent MQA view
        nope = req(k("attention.key_length_mla")) - rope_dim
        v_dim = req(k("attention.value_length_mla"))
    else:  # older files: key_length = nope + rope, value_length = v_head_dim (per head)
        nope = req(k("attention.key_length")) - rope_dim
        v_dim = req(k("attention.value_length"))
    # The converter writes the gating function only where config.json names it; without it a
    # score-correction bias still means DeepSeek-V3's sigmoid routing (noaux_tc), else V2's softmax.
    gating = get(k("expert_gating_func"))
    has_bias = any(re.fullmatch(r"blk\.\d+\.exp_probs_b\.bias", n) for n in tensors)
    sigmoid = gating == int(gguf.ExpertGatingFuncType.SIGMOID) or (gating is None and has_bias)
    n_group = get(k("expert_group_count"), 1) or 1
    topk_group = get(k("expert_group_used_count"), 1) or 1
    n_layers = req(k("block_count"))
    v3 = sigmoid or has_bias
    d = dict(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        vocab_size=get(k("vocab_size")) or int(tensors["token_embd.weight"].shape[1]),
        hidden_size=req(k("embedding_length")),
        intermediate_size=req(k("feed_forward_length")),
        moe_intermediate_size=req(k("expert_feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=req(k("attention.head_count")),
        q_lora_rank=get(k("attention.q_lora_rank")),
        kv_lora_rank=req(k("attention.kv_lora_rank")),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
        n_routed_experts=get(k("expert_count"), 0), num_experts_per_tok=get(k("expert_used_count"), 1),
        n_shared_experts=get(k("expert_shared_count"), 0),
        first_k_dense_replace=get(k("leading_dense_block_count"), 0), moe_layer_freq=1,
        n_group=n_group, topk_group=topk_group,
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
        scoring_func="sigmoid" if sigmoid else "softmax",
        norm_topk_prob=bool(get(k("expert_weights_norm"), False)),
        routed_scaling_factor=float(get(k("expert_weights_scale"), 1.0)),
        rope_theta=float(get(k("rope.freq_base"), 10000.0)),
        rope_interleave=True,
        rms_norm_eps=float(get(k("attention.layer_norm_rms_epsilon"), 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=get(k("context_length"), 4096),
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
        torch_dtype="float32" if all(t.tensor_type == GGML.F32 for t in tensors.values()) else "bfloat16",
    )
    if get(k("rope.scaling.type")) == "yarn":
        # The converter writes mscale_all_dim as yarn_log_multiplier = 0.1 * mscale_all_dim and not
        # mscale at all: llama.cpp's deepseek2 takes them equal (as every DeepSeek config has them).
        mscale = round(float(get(k("rope.scaling.yarn_log_multiplier"), 0.0)) / 0.1, 6)
        scaling = dict(rope_type="yarn", factor=float(req(k("rope.scaling.factor"))),
                       original_max_position_embeddings=req(k("rope.scaling.original_context_length")),
                       mscale=mscale, mscale_all_dim=mscale)
        for key, name in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"),
                          ("attention_factor", "yarn_attn_factor")):
            if k(f"rope.scaling.{name}") in meta:
                scaling[key] = float(get(k(f"rope.scaling.{name}")))
        d["rope_scaling"] = scaling
    return d


# ---- tensors' bytes ----------------------------------------------------------------------

DEQUANTIZE_CHUNK = 64 << 20  # stored bytes dequantized at a time


@dataclass(frozen=True)
class Piece:
    """Where one of ktjax's tensors comes from: a GGUF tensor, or one expert of a stack."""

    file: str
    tensor: gguf.ReaderTensor
    expert: int | None = None
    mm: mmap.mmap | None = None  # the file's mapping (the reader's), to release pages once read

    @property
    def type_name(self) -> str:
        return self.tensor.tensor_type.name

    @property
    def raw(self) -> np.ndarray:
        return self.tensor.data if self.expert is None else self.tensor.data[self.expert]

    @property
    def start(self) -> int:
        """Where this piece's bytes begin in its file."""
        return self.tensor.data_offset + (0 if self.expert is None else self.expert * self.nbytes)

    @property
    def nbytes(self) -> int:
        return self.tensor.n_bytes // (1 if self.expert is None else int(self.tensor.shape[-1]))

    def release(self) -> None:
        """Drop this piece's pages from the process (touched again, they are read from the file again):
        the reader maps whole files, and every page read would otherwise stay counted in the process's
        memory until the model is closed."""
        if self.mm is None:
            return
        start = self.tensor.data_offset + (0 if self.expert is None else self.expert * self.nbytes)
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + self.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def dequantize(self) -> np.ndarray:
        """float32, in the checkpoint's shape order."""
        qtype, raw = self.tensor.tensor_type, self.raw
        if self.type_name in gguf_decode.DECODED:  # ~30 times faster than gguf's decoders, the same bits
            return gguf_decode.dequantize(raw, self.type_name)
        try:
            if raw.ndim < 2 or raw.nbytes <= DEQUANTIZE_CHUNK:
                return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32)
            # In runs of rows into the result: gguf's dequantize holds its pieces and the result at once,
            # twice a large tensor's float32 size (an embedding of DeepSeek-V3: 7.4 GB).
            rows = raw.reshape(-1, raw.shape[-1])
            step = max(1, DEQUANTIZE_CHUNK // rows.shape[1])
            first = np.asarray(gguf.quants.dequantize(rows[:step], qtype), np.float32)
            out = np.empty((rows.shape[0], first.shape[-1]), np.float32)
            out[:step] = first
            for start in range(step, rows.shape[0], step):
                out[start:start + step] = gguf.quants.dequantize(rows[start:start + step], qtype)
            return out.reshape(*raw.shape[:-1], first.shape[-1])
        except NotImplementedError:
            raise CheckpointError(f"{self.file}: tensor {self.tensor.name}: GGML type {self.type_name} cannot be "
                                  f"dequantized by gguf {gguf_version()}") from None
