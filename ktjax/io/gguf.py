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
of `ktjax.io.checkpoint.Checkpoint`: non-expert tensors are decoded to float32 as
`gguf.quants.dequantize` decodes them (`ktjax.io.gguf_decode`'s kernels, gguf's where it has none)
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
import os
import re
from collections import Counter
from collections.abc import Callable

import gguf
import numpy as np

from ktjax.config import ConfigError, ModelConfig
from ktjax.experts.weights import FLOAT_FORMATS, ExpertFormat, ExpertWeights, packed_expert
from ktjax.io.checkpoint import Checkpoint, CheckpointError, TensorInfo, prefetch_range
from ktjax.io.gguf_blocks import EXACT, FLOAT_TYPES, exact_format, expert_arrays, expert_buffer, write_blocks
from ktjax.io.gguf_file import ARCH, Metadata, Piece, config_dict, gguf_files, gguf_version, is_gguf, open_reader

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ---- tensors -------------------------------------------------------------------------------

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
        readers = [(f, open_reader(f)) for f in self.files]
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
    __contains__ = Checkpoint.__contains__
    info = Checkpoint.info

    def stored_name(self, name: str) -> str:
        return f"{self._gguf_name_of(name)} (ktjax's {name})"

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

    def prefetch(self, names) -> None:
        """Start reading these tensors' bytes into the page cache (`prefetch_range`); others are skipped."""
        for name in names:
            piece = self.pieces.get(name)
            if piece is not None:
                prefetch_range(piece.file, piece.start, piece.nbytes)

    def read(self, name: str) -> np.ndarray:
        """float32, decoded as gguf.quants.dequantize decodes it, in the transformers shape."""
        self.info(name)
        try:
            value = self._sources[name]()
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.tensors[name].file}: tensor {name}: cannot read ({e})") from None
        piece = self.pieces.get(name)
        if piece is not None and not np.may_share_memory(value, piece.raw):  # dequantized: the pages can go
            piece.release()
        return value

    def read_blocks(self, name: str) -> tuple[str, dict[str, np.ndarray]] | None:
        """A 2-D tensor whose GGML blocks an integer format holds exactly (Q8_0, Q4_K, ...) as that
        format's arrays, the blocks' bytes copied: the loader moves ~1 byte per value to the device and
        dequantizes there, rather than 4 bytes per value of float32 decoded on the host (with gguf's
        numpy decoders, most of a load's time: benchmarks/gguf.md). None for other tensors (read them with `read`)."""
        shape = self.info(name).shape
        piece = self.pieces.get(name)
        if (piece is None or piece.expert is not None or piece.type_name not in EXACT or len(shape) != 2
                or piece.raw.ndim != 2 or piece.raw.shape[0] != shape[0]):
            return None
        arrays = expert_arrays(piece.raw, piece.type_name, shape[1])
        piece.release()
        return EXACT[piece.type_name], arrays

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
                                  f"{pieces[0].tensor.name}: not dequantized by gguf {gguf_version()}") from None
        for p in pieces:
            p.release()
        return packed_expert(buf, fmt)


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


__all__ = ["ARCH", "EXACT", "GGUFCheckpoint", "exact_format", "expert_arrays", "expert_buffer", "gguf_files", "is_gguf",
           "open_gguf", "write_blocks"]
