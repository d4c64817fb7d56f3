"""DeepSeek GGUF files (llama.cpp's `deepseek2` architecture) as a checkpoint ktjax loads.

Parsed with the `gguf` package (`gguf.GGUFReader`: memory-mapped, tensors read lazily). The file's
layout is what llama.cpp's converter writes (convert_hf_to_gguf.py, `DeepseekV2Model`; in
conversion/deepseek.py since 2026):

- names: gguf-py's `TensorNameMap` for MODEL_ARCH.DEEPSEEK2 (`blk.{i}.attn_q_a`, `ffn_gate_exps`, ...);
  `e_score_correction_bias` becomes `blk.{i}.exp_probs_b.bias`;
- shapes: GGUF lists dimensions innermost first; the reader reverses them, so every matrix comes back
  [out, in] as the transformers checkpoint stores it. Nothing is transposed or permuted, except:
- `kv_b_proj`: files before llama.cpp's MLA change (spring 2025) hold it whole (`attn_kv_b`); newer
  ones split it per head into `attn_k_b` [H, kv_lora_rank, nope] (k transposed) and `attn_v_b`
  [H, v, kv_lora_rank]; both layouts are read;
- rope dimensions are not permuted: llama.cpp rotates adjacent pairs for deepseek2 (its "NORM" rope),
  which is DeepSeek's interleaved layout (`rope_interleave`);
- routed experts: one stack per projection and layer, `ffn_{gate,up,down}_exps` [E, out, in], quantized
  along `in` like the experts of `ktjax.experts.quant`.

`GGUFCheckpoint` offers the parameters under ktjax's (transformers') tensor names, with the interface
of `ktjax.io.checkpoint.Checkpoint`: non-expert tensors are dequantized with `gguf.quants.dequantize`
and converted to the model dtype on their target. Routed experts are built by `read_expert` in the
expert format chosen by `expert_format`: blocks that an expert format holds exactly are copied into it
(Q8_0, Q4_0, Q5_0, Q3_K -> int8; Q4_K -> int4), float ones take the model dtype. In a mixed file
(Q4_K_M: Q4_K with some Q6_K) the format holding most bytes exactly is kept and the rest requantized
into it; where none does (Q2_K, Q5_K, Q6_K, IQ*, TQ*, ...) experts are dequantized to bf16. Each
conversion that is not exact is one printed line.

Metadata the converter does not write is taken as llama.cpp takes it: no expert_gating_func means
softmax (sigmoid where a score-correction bias is stored), no expert_group_count means no group
limit, and YaRN's mscale equals mscale_all_dim (only 0.1 * mscale_all_dim is stored).
"""

from __future__ import annotations

import functools
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType as GGML

from ktjax.config import ConfigError, ModelConfig
from ktjax.experts.quant import QuantMatrix
from ktjax.experts.weights import FLOAT_FORMATS, ExpertFormat, ExpertWeights, packed_expert
from ktjax.io.checkpoint import CheckpointError, TensorInfo

ARCH = "deepseek2"
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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


def _open(file: str) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(file)
    except ValueError as e:
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if m:
            raise CheckpointError(f"{file}: unknown GGML tensor type {m.group(1)} (not a type gguf "
                                  f"{_gguf_version()} knows)") from None
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


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # noqa: BLE001 - only decorates a message
        return "(unknown version)"


# ---- metadata ------------------------------------------------------------------------------

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


# ---- tensors -------------------------------------------------------------------------------

DEQUANTIZE_CHUNK = 64 << 20  # stored bytes dequantized at a time
# Expert blocks an expert format holds bit for bit (see `write_blocks`).
EXACT = {"Q8_0": "int8", "Q4_0": "int8", "Q5_0": "int8", "Q3_K": "int8", "Q4_K": "int4"}
FLOAT_TYPES = ("F32", "F16", "BF16")


def exact_format(type_name: str, dtype) -> str | None:
    """The expert format that holds tensors of this GGML type exactly (floats: the model dtype's)."""
    if type_name in FLOAT_TYPES:
        return "bf16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else "float32"
    return EXACT.get(type_name)


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
                                  f"dequantized by gguf {_gguf_version()}") from None


def _conversion(type_name: str, fmt: str, dtype) -> str:
    """How routed experts stored as `type_name` become `fmt`."""
    if type_name in FLOAT_TYPES:
        return "as stored" if type_name == {"bf16": "BF16", "float32": "F32"}.get(fmt) else "converted"
    if exact_format(type_name, dtype) == fmt:
        return "blocks copied"
    return "dequantized" if fmt in FLOAT_FORMATS else "requantized"


GROUP_ORDER = ("embedding", "attention", "norms", "dense MLP", "router", "shared experts", "routed experts",
               "lm_head", "other")


def _group(gguf_name: str) -> str:
    """The tensor group of a GGUF tensor name, for `ktjax info`."""
    base = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    if base == "token_embd":
        return "embedding"
    if base == "output":
        return "lm_head"
    if "norm" in base:
        return "norms"
    if base.startswith("attn_"):
        return "attention"
    if base.endswith("_exps"):
        return "routed experts"
    if base.endswith("_shexp"):
        return "shared experts"
    if base in ("ffn_gate_inp", "exp_probs_b"):
        return "router"
    if base in ("ffn_gate", "ffn_up", "ffn_down"):
        return "dense MLP"
    return "other"


def _shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy (checkpoint) order: GGUF lists the innermost dimension first."""
    return tuple(int(s) for s in reversed(t.shape.tolist()))


def _hf_base(name: str) -> str:
    """A transformers tensor name as gguf's name map looks it up (no .weight, the bias spelled .bias)."""
    name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name


class GGUFCheckpoint:
    """A GGUF model (one file or a split set) with the interface of `ktjax.io.checkpoint.Checkpoint`:
    `tensors` (name -> TensorInfo, transformers names, float32 as read), `info`, `read`, plus
    `read_expert` for routed experts in their format."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.files = gguf_files(self.path)
        self.where = self.files[0]
        readers = [(f, _open(f)) for f in self.files]
        self._mmaps = {f: getattr(r.data, "_mmap", None) for f, r in readers}
        self.meta = Metadata(readers[0][1], self.files[0])
        self.raw: dict[str, tuple[str, gguf.ReaderTensor]] = {}
        for f, r in readers:
            for t in r.tensors:
                if t.name in self.raw:
                    raise CheckpointError(f"{f}: tensor {t.name} is also in {self.raw[t.name][0]}")
                self.raw[t.name] = (f, t)
        self.config_dict = config_dict(self.meta, {n: t for n, (_, t) in self.raw.items()})
        try:
            self.config = ModelConfig.from_dict(dict(self.config_dict))
        except ConfigError as e:
            raise ConfigError(f"{self.where}: {e} (from the GGUF metadata)") from None
        self._sources: dict[str, Callable[[], np.ndarray]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.pieces: dict[str, Piece] = {}  # transformers name -> its GGUF piece (the split kv_b has none)
        self._map_names()

    # -- names ---------------------------------------------------------------------------------
    def _gguf_tensor(self, name: str) -> tuple[str, gguf.ReaderTensor]:
        if name not in self.raw:
            raise CheckpointError(f"{self.where}: tensor {name} is missing")
        return self.raw[name]

    def _add(self, name: str, shape: tuple[int, ...], read: Callable[[], np.ndarray], nbytes: int,
             piece: Piece | None) -> None:
        file = piece.file if piece is not None else self.where
        self.tensors[name] = TensorInfo(name, file, "F32", tuple(int(s) for s in shape), 0, nbytes)
        self._sources[name] = read
        if piece is not None:
            self.pieces[name] = piece

    def _map_names(self) -> None:
        cfg = self.config
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
        self.consumed: set[str] = set()

        def gguf_name(hf: str) -> str:
            suffix = ".bias" if hf.endswith("_bias") else ".weight"
            return names.get_name(_hf_base(hf)) + suffix

        for hf in self._expected_names():
            if ".mlp.experts." in hf:
                layer, e, proj = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", hf).groups()
                g = gguf_name(f"model.layers.{layer}.mlp.experts.{proj}.weight")
                if g not in self.raw:
                    continue  # reported as missing when the leaf asks for it
                file, t = self.raw[g]
                stack = _shape(t)
                if len(stack) != 3 or stack[0] != cfg.n_routed_experts:
                    raise CheckpointError(f"{file}: tensor {g} has shape {list(stack)}, expected "
                                          f"[{cfg.n_routed_experts}, out, in] (expert_count stacked experts)")
                p = Piece(file, t, int(e), self._mmaps[file])
                self._add(hf, stack[1:], lambda p=p, shape=stack[1:]: p.dequantize().reshape(shape), p.nbytes, p)
                self.consumed.add(g)
            elif hf.endswith("kv_b_proj.weight") and gguf_name(hf) not in self.raw:
                self._split_kv_b(hf, gguf_name)
            else:
                g = gguf_name(hf)
                if g in self.raw:
                    file, t = self.raw[g]
                    p, shape = Piece(file, t, None, self._mmaps[file]), _shape(t)
                    self._add(hf, shape, lambda p=p, shape=shape: p.dequantize().reshape(shape), t.n_bytes, p)
                    self.consumed.add(g)
        # Tensors the model does not use: multi-token-prediction layers (not in the main forward),
        # llama.cpp's split k_b/v_b where the whole kv_b is there too, rope tables some files carry.
        for g, (file, _) in self.raw.items():
            m = re.match(r"blk\.(\d+)\.", g)
            if g in self.consumed or (m and int(m.group(1)) >= cfg.num_hidden_layers):
                continue
            if re.fullmatch(r"blk\.\d+\.attn_[kv]_b\.weight|rope_freqs\.weight|blk\.\d+\.attn_rot_embd", g):
                continue
            raise CheckpointError(f"{file}: unexpected tensor {g} (not a parameter of this {cfg.model_type} model)")

    def _split_kv_b(self, hf: str, gguf_name) -> None:
        """kv_b_proj [H*(nope+v), kv_lora] from llama.cpp's attn_k_b [H, kv_lora, nope] and attn_v_b [H, v, kv_lora]."""
        cfg = self.config
        kb_name = gguf_name(hf.replace("kv_b_proj", "k_b_proj"))
        vb_name = gguf_name(hf.replace("kv_b_proj", "v_b_proj"))
        if kb_name not in self.raw and vb_name not in self.raw:
            return  # neither layout: the leaf reports kv_b_proj missing
        (kf, kt), (vf, vt) = self._gguf_tensor(kb_name), self._gguf_tensor(vb_name)
        H, C, nope, v = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        k_piece, v_piece = Piece(kf, kt), Piece(vf, vt)
        shape = (H * (nope + v), C)
        for piece, want in ((k_piece, (H, C, nope)), (v_piece, (H, v, C))):
            got = _shape(piece.tensor)
            if got != want:
                raise CheckpointError(f"{piece.file}: tensor {piece.tensor.name} has shape {list(got)}, expected {list(want)}")

        def read() -> np.ndarray:
            k_b = k_piece.dequantize().reshape(H, C, nope).transpose(0, 2, 1)
            v_b = v_piece.dequantize().reshape(H, v, C)
            return np.concatenate([k_b, v_b], axis=1).reshape(shape)

        self._add(hf, shape, read, kt.n_bytes + vt.n_bytes, None)
        self.consumed |= {kb_name, vb_name}

    def _expected_names(self):
        """The transformers name of every tensor a model of this config reads."""
        from flax import nnx

        from ktjax.io.checkpoint import tensor_names
        from ktjax.io.load import abstract_params

        _, abstract = abstract_params(self.config, np.float32)
        for leaf_path, _ in nnx.to_flat_state(abstract):
            for name, _ in tensor_names(self.config, leaf_path):
                yield name

    def generation_defaults(self) -> dict:
        """Recommended sampling settings (general.sampling.*, written from generation_config.json), as
        generate() arguments."""
        out = {}
        for key, name, kind in (("temp", "temperature", float), ("top_p", "top_p", float), ("top_k", "top_k", int)):
            value = self.meta.get(f"general.sampling.{key}")
            if value is not None:
                out[name] = round(float(value), 6) if kind is float else int(value)
        return out

    # -- the Checkpoint interface ----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.where}: tensor {self._gguf_name_of(name)} is missing "
                                  f"(ktjax's {name})") from None

    def _gguf_name_of(self, name: str) -> str:
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.(\w+)\.weight", name)
        if m:
            name = f"model.layers.{m.group(1)}.mlp.experts.{m.group(2)}.weight"
        try:
            names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, self.config.num_hidden_layers)
            g = names.get_name(_hf_base(name))
        except Exception:  # noqa: BLE001 - only names the missing tensor
            g = None
        return name if g is None else g + (".bias" if name.endswith("_bias") else ".weight")

    def read(self, name: str) -> np.ndarray:
        """float32, dequantized with gguf.quants.dequantize, in the transformers shape."""
        self.info(name)
        try:
            value = self._sources[name]()
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.tensors[name].file}: tensor {name}: cannot read ({e})") from None
        piece = self.pieces.get(name)
        if piece is not None and not np.may_share_memory(value, piece.raw):  # dequantized: the pages can go
            piece.release()
        return value

    # -- routed experts -----------------------------------------------------------------------------
    def expert_types(self) -> Counter:
        """GGML type name -> bytes of the routed-expert stacks stored in it."""
        stacks = {p.tensor.name: p.tensor for p in self.pieces.values() if p.expert is not None}
        out: Counter = Counter()
        for t in stacks.values():
            out[t.tensor_type.name] += int(t.n_bytes)
        return out

    def expert_format(self, experts: str | None, dtype) -> tuple[str, list[str]]:
        """(the format routed experts are kept in, lines saying how stored types become it).

        Default: the one format every stored type maps into exactly; else, when an integer format
        holds most of the bytes exactly (a Q4_K_M file: Q4_K with some Q6_K), that format with the
        rest requantized into it; else bf16, dequantized."""
        types = self.expert_types()
        exact = {t: exact_format(t, dtype) for t in types}
        if experts is None:
            share = Counter()
            for t, n in types.items():
                share[exact[t]] += n
            best, n = share.most_common(1)[0] if share else ("bf16", 0)
            if len(share) == 1 and best is not None:
                experts = best
            elif best in ("int8", "int4") and 2 * n >= sum(types.values()):
                experts = best
            else:
                experts = "bf16"
        if experts in FLOAT_FORMATS and set(types) - set(FLOAT_TYPES):
            self._check_fits(experts, types)
        notes = []
        for t in sorted(types):
            if exact[t] == experts or (t in FLOAT_TYPES and experts in FLOAT_FORMATS):
                continue
            how = "dequantized" if experts in FLOAT_FORMATS else "requantized (not exact)"
            why = "no expert format holds it exactly" if exact[t] is None else f"it maps exactly into {exact[t]}"
            hint = {"int4": "; experts='int8' keeps more of it, 'bf16' all of it", "int8": "; experts='bf16' keeps all of it"
                    }.get(experts, "")
            notes.append(f"{self.where}: routed experts stored in {t} ({types[t] / 1e9:.2f} GB): {how} to "
                         f"{experts} ({why}{hint})")
        return experts, notes

    def _check_fits(self, experts: str, types: Counter) -> None:
        """Dequantized experts must fit this machine's memory: refuse in one line rather than run out."""
        cfg = self.config
        need = len(cfg.moe_layers) * cfg.n_routed_experts * ExpertFormat(experts, cfg.moe_intermediate_size,
                                                                          cfg.hidden_size).nbytes
        have = host_memory_bytes()
        if need > have:
            stored = ", ".join(sorted(types))
            raise CheckpointError(f"{self.where}: routed experts stored in {stored} have no integer format that holds "
                                  f"them; as {experts} they need {need / 1e9:.0f} GB, more than this machine's "
                                  f"{have / 1e9:.0f} GB of memory (a Q4_K or Q8_0 file loads quantized)")

    def type_table(self, dtype, experts: str | None = None) -> list[str]:
        """Lines: the GGML types of each tensor group and the format each becomes when loaded."""
        fmt, _ = self.expert_format(experts, dtype)
        groups: dict[str, Counter] = {}
        for name, (_, t) in self.raw.items():
            groups.setdefault(_group(name), Counter())[t.tensor_type.name] += 1
        dtype_name = np.dtype(dtype).name
        lines = [f"{'GGUF tensors':<16}{'stored as':<34}becomes"]
        for group in GROUP_ORDER:
            if group not in groups:
                continue
            stored = ", ".join(f"{t} x{n}" for t, n in sorted(groups[group].items()))
            if group == "routed experts":
                ways = {_conversion(t, fmt, dtype) for t in groups[group]}
                becomes = f"{fmt} ({', '.join(sorted(ways))})"
            else:
                becomes = f"{dtype_name} (dequantized)" if set(groups[group]) - {"F32"} else dtype_name
            lines.append(f"{group:<16}{stored:<34}{becomes}")
        return lines

    def read_expert(self, mats: list[tuple[str, str | None]], fmt: ExpertFormat) -> ExpertWeights | None:
        """One expert (its gate, up and down tensors) in an int8/int4 `fmt`: the blocks copied where the
        format holds them exactly, else requantized from their values; None for the other formats
        (the caller converts the float values `read` gives)."""
        pieces = [self.pieces.get(name) for name, _ in mats]
        if fmt.packed is None or any(p is None for p in pieces):
            return None
        try:
            buf = expert_buffer(fmt, [(p.raw, p.type_name) for p in pieces])
        except NotImplementedError:
            raise CheckpointError(f"{pieces[0].file}: GGML types {sorted({p.type_name for p in pieces})} of "
                                  f"{pieces[0].tensor.name}: not dequantized by gguf {_gguf_version()}") from None
        for p in pieces:
            p.release()
        return packed_expert(buf, fmt)


@functools.cache
def _quantizer(fmt: str) -> Callable:
    """`ktjax.experts.quant.quantize` compiled (on a GPU a full-size matrix takes milliseconds, in numpy a second)."""
    import jax

    from ktjax.experts.quant import quantize

    return jax.jit(lambda w: quantize(w, fmt))


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """The GGUF model at `path`, parsed once while its files are unchanged: gguf's reader takes seconds
    over a full vocabulary, and a load asks for the config, the expert format, the tensors and the tokenizer."""
    files = gguf_files(path)
    stamp = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
    return _open_cached(os.fspath(path), stamp)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, stamp: tuple) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


# ---- blocks into the integer expert formats --------------------------------------------------

def _blocks(raw_RB: np.ndarray, type_name: str) -> np.ndarray:
    """uint8 [R, nblocks, bytes per block] of a quantized [R, ...] tensor's rows (a view of the file)."""
    _, type_size = gguf.GGML_QUANT_SIZES[GGML[type_name]]
    return raw_RB.reshape(raw_RB.shape[0], -1, type_size)


def _f16_bits(b: np.ndarray) -> np.ndarray:
    """uint16 [..., nb] from the two little-endian bytes in b's last axis."""
    return b.view(np.uint16)[..., 0]


def write_blocks(out: dict[str, np.ndarray], raw_RB: np.ndarray, type_name: str) -> None:
    """Fill the arrays of an int8/int4 `ktjax.experts.quant.QuantMatrix` (`out`, e.g. views of an
    expert's buffer) from a GGUF tensor's rows, holding the same values: w = scale * q for int8;
    Q4_K's fields as they are for int4. Each byte is copied once, straight from the file's pages."""
    b = _blocks(raw_RB, type_name)
    R, nb = b.shape[:2]
    if type_name in ("Q8_0", "Q4_0", "Q5_0"):  # an f16 d per 32 values, then the values: w = d * q
        out["scale"].reshape(R, nb)[...] = _f16_bits(b[..., :2])
        q = out["q"].reshape(R, nb, 2, 16)
        if type_name == "Q8_0":
            q[...] = b[..., 2:].view(np.int8).reshape(R, nb, 2, 16)
            return
        qs = b[..., -16:]  # low nibbles are values 0-15, high nibbles 16-31
        high = 0 if type_name == "Q4_0" else np.unpackbits(b[..., 2:6], axis=-1, bitorder="little").reshape(R, nb, 2, 16) << 4
        offset = 8 if type_name == "Q4_0" else 16
        q[...] = ((np.stack([qs & 15, qs >> 4], axis=2) | high).astype(np.int16) - offset).astype(np.int8)
        return
    if type_name == "Q4_K":  # f16 d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        out["d"][...] = b[..., 0:2].view(np.float16)[..., 0]
        out["dmin"][...] = b[..., 2:4].view(np.float16)[..., 0]
        # The 6-bit scales and mins (gguf.quants.Q4_K.get_scale_min), four bytes at a time.
        w = b[..., 4:16].view(np.uint32)
        sc, mn = out["sc"].reshape(R, nb, 8).view(np.uint32), out["mn"].reshape(R, nb, 8).view(np.uint32)
        sc[..., 0] = w[..., 0] & 0x3F3F3F3F
        sc[..., 1] = (w[..., 2] & 0x0F0F0F0F) | ((w[..., 0] >> 2) & 0x30303030)
        mn[..., 0] = w[..., 1] & 0x3F3F3F3F
        mn[..., 1] = ((w[..., 2] >> 4) & 0x0F0F0F0F) | ((w[..., 1] >> 2) & 0x30303030)
        out["q"].reshape(R, nb, 128)[...] = b[..., 16:]  # Q4_K's qs is the int4 format's nibble order
        return
    if type_name == "Q3_K":
        _q3_k_int8(out, b)
        return
    raise ValueError(f"GGML type {type_name} has no exact integer expert format")


def _q3_k_int8(out: dict[str, np.ndarray], b: np.ndarray) -> None:
    """Q3_K: per 256 values an f16 d, per 16 a 6-bit signed scale s, 3-bit q in [-4, 3]: w = d * s * q.
    As int8, per group of 32: scale d and q' = s * q in [-124, 128]; a group reaching 128 stores
    -d and -q' instead (in [-128, 124]). Every product is exact in float32, so the values match."""
    R, nb = b.shape[:2]
    hmask, qs, scales, d = b[..., :32], b[..., 32:96], b[..., 96:108], b[..., 108:110]
    low = (scales[..., None, :8] >> np.array([[0], [4]], np.uint8)).reshape(R, nb, 16) & 15
    high = (scales[..., 8:, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 1, 3, 2).reshape(R, nb, 16) & 3
    s_raw = low | (high << 4)  # s + 32, in 0..63, per 16 values
    ql = (qs.reshape(R, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    qh = (hmask.reshape(R, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q_raw = ql.reshape(R, nb, 16, 16) | (qh.reshape(R, nb, 16, 16) << 2)  # q + 4, in 0..7
    # s * q through a table of all 64 x 8 products; only s = -32 with q = -4 reaches 128.
    q8 = _Q3_PRODUCTS[(s_raw[..., None].astype(np.uint16) << 3) | q_raw].reshape(R, nb, 8, 32)
    flip = ((s_raw == 0)[..., None] & (q_raw == 0)).reshape(R, nb, 8, 32).any(-1)  # [R, nb, 8]
    out["q"].reshape(R, nb, 8, 32)[...] = np.where(flip[..., None], -q8, q8)
    d_bits = np.repeat(_f16_bits(d)[..., None], 8, axis=-1)
    out["scale"].reshape(R, nb, 8)[...] = np.where(flip, d_bits ^ np.uint16(0x8000), d_bits)


_Q3_PRODUCTS = ((np.arange(64)[:, None] - 32) * (np.arange(8)[None, :] - 4)).astype(np.int16).ravel()


def expert_arrays(raw_RB: np.ndarray, type_name: str, cols: int) -> dict[str, np.ndarray]:
    """The arrays of `ktjax.experts.quant.QuantMatrix` for a GGUF tensor's rows (`write_blocks`)."""
    m = QuantMatrix(EXACT[type_name], raw_RB.shape[0], cols)
    out = {name: np.empty(shape, dtype) for name, (dtype, shape) in m.arrays().items()}
    write_blocks(out, raw_RB, type_name)
    return out


def expert_buffer(fmt: ExpertFormat, mats: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """One int8/int4 expert's buffer (`ktjax.experts.packed.PackedLayout`) from its gate, up and down
    GGUF rows (raw, GGML type name): blocks the format holds exactly are copied into it, others are
    dequantized and requantized."""
    layout = fmt.packed
    buf = np.zeros(layout.nbytes, np.uint8)
    gate_up, down = layout.arrays(buf, "gate_up"), layout.arrays(buf, "down")
    targets = [{k: v[:fmt.F] for k, v in gate_up.items()}, {k: v[fmt.F:] for k, v in gate_up.items()}, down]
    for (raw, type_name), out in zip(mats, targets):
        if EXACT.get(type_name) == fmt.name:
            write_blocks(out, raw, type_name)
        else:
            values = np.asarray(gguf.quants.dequantize(raw, GGML[type_name]), np.float32)
            for k, v in _quantizer(fmt.name)(values).items():
                out[k][...] = np.asarray(v)
    return buf


__all__ = ["GGUFCheckpoint", "exact_format", "expert_arrays", "expert_buffer", "gguf_files", "is_gguf", "open_gguf",
           "write_blocks"]
