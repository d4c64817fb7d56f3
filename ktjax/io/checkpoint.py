"""Reading transformers-format checkpoints: safetensors shards, published DeepSeek tensor names, FP8.

`Checkpoint` parses the safetensors headers of a directory (one file or shards with an index) and
memory-maps one tensor at a time. `leaf_source` maps a parameter leaf of the model to the tensors
that fill it and checks them from the headers alone, so every bad input is found before any data
is read. `check_unexpected` finds tensors no leaf consumes. Reading the data into arrays is
`ktjax.io.load.read_leaf`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ktjax.config import ModelConfig
from ktjax.experts.quant import QuantMatrix

# safetensors dtype codes -> numpy dtypes (ml_dtypes supplies bfloat16 and float8).
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# What a parameter may be stored as: floats, converted to the leaf's dtype on reading.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"  # DeepSeek's name; the stored value *multiplies* the FP8 block
DEFAULT_FP8_BLOCK = (128, 128)  # DeepSeek-V3's, when config.json has no quantization_config
_MAX_HEADER = 100 << 20  # safetensors' own limit


class CheckpointError(ValueError):
    """Bad checkpoint input; the one-line message names the file and tensor at fault."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header, checking that every tensor lies inside the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{file}: corrupt or truncated safetensors header (length {n} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    infos = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: corrupt header entry {h!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {dtype} (supported: {', '.join(DTYPES)})")
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise CheckpointError(f"{file}: tensor {name}: corrupt header entry {h!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: tensor {name}: {end - begin} bytes stored for shape {list(shape)} {dtype}")
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name}: file is truncated ({size} bytes, tensor ends at {8 + n + end})")
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + n + begin, nbytes)
    return infos


def prefetch_range(file: str, offset: int, nbytes: int) -> None:
    """Ask the kernel to read file[offset:offset + nbytes] into the page cache in the background (a hint:
    the data read later is the same either way). The loader asks for the next expert's bytes before it
    converts the current one, so the disk works while the CPU or GPU converts."""
    if nbytes <= 0 or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return  # the read that follows names the file at fault
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpoint:
    """All tensors of a checkpoint directory (one file or shards), read one memory-mapped tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        index = os.path.join(self.path, "model.safetensors.index.json")
        weight_map = None
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = os.path.join(self.path, name)
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: missing (listed in model.safetensors.index.json)")
            for t in read_header(file).values():
                if t.name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {t.name} is also in {self.tensors[t.name].file}")
                self.tensors[t.name] = t
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{os.path.join(self.path, file)}: tensor {name} listed in the index is not in the file")
        # Where a missing tensor should have been: the index if there is one, else the directory.
        self.where = index if weight_map is not None else self.path

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.where}: tensor {self.stored_name(name)} is missing")
        return self.tensors[name]

    def stored_name(self, name: str) -> str:
        """How the files name one of ktjax's tensors (for messages)."""
        return name

    def read(self, name: str) -> np.ndarray:
        """A read-only view of the tensor in its file, memory-mapped for this tensor alone.

        The mapping lives as long as the returned array: mapping whole files would leave every
        page read so far resident (and counted in the process's memory) until the load ends.
        """
        t = self.info(name)
        dtype = DTYPES[t.dtype]
        if t.nbytes == 0:
            return np.empty(t.shape, dtype)
        start = t.offset - t.offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(t.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), t.offset + t.nbytes - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError) as e:  # e.g. the file shrank since its header was read
            raise CheckpointError(f"{t.file}: tensor {name}: cannot read ({e})") from None
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_WILLNEED)  # read ahead the whole tensor rather than page by page
        return np.frombuffer(mm, dtype, math.prod(t.shape), t.offset - start).reshape(t.shape)

    def prefetch(self, names) -> None:
        """Start reading these tensors into the page cache (`prefetch_range`); unknown names are skipped."""
        for name in names:
            t = self.tensors.get(name)
            if t is not None:
                prefetch_range(t.file, t.offset, t.nbytes)

    def read_blocks(self, name: str) -> tuple[str, dict[str, np.ndarray]] | None:
        """A tensor stored in integer blocks ("int8"/"int4", the arrays of `ktjax.experts.quant`) that
        the loader dequantizes on the target: only GGUF files have these (`GGUFCheckpoint.read_blocks`)."""
        return None


# ---- names ---------------------------------------------------------------------------------

def tensor_names(cfg: ModelConfig, path: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensors that fill one parameter leaf, each with its index inside the leaf.

    Leaf paths mirror the checkpoint names: ('moe_layers', 'self_attn', 'q_a_proj', 'weight') is
    model.layers.{i}.self_attn.q_a_proj.weight stacked over the MoE layers, and the stacked
    experts ('moe_layers', 'mlp', 'experts', 'gate_proj') are model.layers.{i}.mlp.experts.{e}.gate_proj.weight.
    """
    if path == ("embed_tokens",):
        return [("model.embed_tokens.weight", ())]
    if path[0] == "norm":
        return [("model.norm." + ".".join(path[1:]), ())]
    if path[0] == "lm_head":
        return [("lm_head." + ".".join(path[1:]), ())]
    group = {"dense_layers": "dense", "moe_layers": "moe"}[path[0]]
    rest = path[1:]
    out = []
    for j, i in enumerate(cfg.layer_groups[group]):
        if rest[:2] == ("mlp", "experts"):
            out += [(f"model.layers.{i}.mlp.experts.{e}.{rest[2]}.weight", (j, e)) for e in range(cfg.n_routed_experts)]
        else:
            out.append((f"model.layers.{i}." + ".".join(rest), (j,)))
    return out


def is_mtp(cfg: ModelConfig, name: str) -> bool:
    """A tensor of the multi-token-prediction layers (model.layers.{N..N+k-1}), not part of the main forward."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and cfg.num_hidden_layers <= int(m.group(1)) < cfg.num_hidden_layers + cfg.num_nextn_predict_layers


# ---- FP8 -----------------------------------------------------------------------------------

def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the per-block scales of an FP8 array [..., R, C]: one per block, edge blocks partial."""
    *lead, R, C = shape
    return (*lead, -(-R // block[0]), -(-C // block[1]))


def dequantize_fp8(w_RC, scale_rc, block: tuple[int, int], dtype=jnp.float32):
    """FP8 values [..., R, C] times their block's scale [..., ceil(R/b0), ceil(C/b1)], in float32, rounded once to dtype.

    Takes numpy or jax arrays (numpy in, numpy out). float8 -> float32 is exact and the product is
    one float32 rounding, so the float32 result is bit-exact against any implementation of the formula.
    """
    xp = np if isinstance(w_RC, np.ndarray) else jnp
    R, C = w_RC.shape[-2:]
    s_RC = xp.repeat(xp.repeat(scale_rc.astype(xp.float32), block[0], axis=-2), block[1], axis=-1)[..., :R, :C]
    return (w_RC.astype(xp.float32) * s_RC).astype(dtype)


# ---- int8/int4 routed experts (`ktjax quantize`) ------------------------------------------

# float16 scales are kept as their bits (uint16) in memory and stored as F16, so files read as floats.
STORED_DTYPE = {np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "F16",
                np.dtype(np.float32): "F32"}


def quantized_names(name: str, fmt: str) -> dict[str, str]:
    """Array -> tensor name of a weight stored in an integer format: `...gate_proj.weight` is
    `...gate_proj.q`, `...gate_proj.scale` (int8) or `.q`, `.sc`, `.mn`, `.d`, `.dmin` (int4)."""
    base = name.removesuffix(".weight")
    return {a: f"{base}.{a}" for a in QuantMatrix(fmt, 1, 1).arrays()}


def check_quantized(ckpt: Checkpoint, name: str, fmt: str, shape: tuple[int, int]) -> int:
    """Check from the headers that weight `name` [rows, cols] is stored as `fmt`'s arrays; their bytes."""
    stored = 0
    for a, (dtype, want) in QuantMatrix(fmt, *shape).arrays().items():
        t = ckpt.info(quantized_names(name, fmt)[a])
        if t.dtype != STORED_DTYPE[dtype] or t.shape != want:
            raise CheckpointError(f"{t.file}: tensor {t.name} is {t.dtype} {list(t.shape)}, expected "
                                  f"{STORED_DTYPE[dtype]} {list(want)} ({fmt} experts of {list(shape)} weights)")
        stored += t.nbytes
    return stored


def read_quantized(ckpt: Checkpoint, name: str, fmt: str) -> dict[str, np.ndarray]:
    """The arrays of weight `name` stored in `fmt`, as `ktjax.experts.quant` holds them (read-only views)."""
    out = {}
    for a, tensor in quantized_names(name, fmt).items():
        arr = ckpt.read(tensor)
        out[a] = arr.view(np.uint16) if arr.dtype == np.float16 else arr
    return out


# ---- leaves --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeafSource:
    """The checked plan for one parameter leaf: its tensors, where each goes in the leaf, and how each is stored."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: jnp.dtype  # the leaf's dtype in the model
    tensors: tuple[tuple[str, tuple[int, ...], str | None], ...]  # (name, index in the leaf, FP8 scale name or None)
    block: tuple[int, int]  # FP8 block size (rows, columns)
    stored_nbytes: int  # bytes read from the files, scales included
    # "int8"/"int4": each tensor is stored as that format's arrays (`quantized_names`), not as `name`.
    quant: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    @property
    def names(self) -> list[str]:
        """Every checkpoint tensor this leaf consumes, scales included."""
        if self.quant is not None:
            return [n for name, _, _ in self.tensors for n in quantized_names(name, self.quant).values()]
        return [name for name, _, _ in self.tensors] + [scale for _, _, scale in self.tensors if scale]


def leaf_source(ckpt: Checkpoint, cfg: ModelConfig, leaf_path: tuple[str, ...], shape: tuple[int, ...],
                dtype) -> LeafSource:
    """Map a leaf to its tensors and check them from the headers: present, right shape, float, FP8 with
    scales; routed experts of a `ktjax quantize` checkpoint (cfg.expert_quant) as their integer arrays."""
    block = cfg.fp8_block_size or DEFAULT_FP8_BLOCK
    quant = cfg.expert_quant if leaf_path[1:3] == ("mlp", "experts") else None
    tensors = []
    stored = 0
    for name, index in tensor_names(cfg, leaf_path):
        want = tuple(shape[len(index):])
        if quant is not None:
            stored += check_quantized(ckpt, name, quant, want)
            tensors.append((name, index, None))
            continue
        t = ckpt.info(name)
        if t.shape != want:
            raise CheckpointError(f"{t.file}: tensor {name} has shape {list(t.shape)}, expected {list(want)}")
        stored += t.nbytes
        scale_name = None
        if t.dtype == FP8_DTYPE:  # which tensors are FP8 is the file's say, not assumed
            if len(want) != 2:
                raise CheckpointError(f"{t.file}: tensor {name}: FP8 is supported for 2-D weights only, got shape {list(want)}")
            scale_name = name + SCALE_SUFFIX
            if scale_name not in ckpt:
                raise CheckpointError(f"{ckpt.where}: tensor {scale_name} is missing (the scales of FP8 tensor {name} in {t.file})")
            s = ckpt.info(scale_name)
            if s.shape != fp8_scale_shape(want, block):
                raise CheckpointError(f"{s.file}: tensor {scale_name} has shape {list(s.shape)}, expected "
                                      f"{list(fp8_scale_shape(want, block))} ({block[0]}x{block[1]} blocks of {list(want)})")
            if s.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{s.file}: tensor {scale_name}: unsupported dtype {s.dtype} for FP8 scales")
            stored += s.nbytes
        elif t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {name}: unsupported dtype {t.dtype} for a parameter "
                                  f"(use one of {', '.join(FLOAT_DTYPES + (FP8_DTYPE,))})")
        tensors.append((name, index, scale_name))
    return LeafSource(tuple(leaf_path), tuple(shape), jnp.dtype(dtype), tuple(tensors), block, stored, quant)


def check_unexpected(ckpt: Checkpoint, cfg: ModelConfig, consumed: Iterable[str]) -> None:
    """Every tensor in the checkpoint is consumed by a leaf (scales included) or skipped on purpose (MTP)."""
    consumed = set(consumed)
    for name, t in ckpt.tensors.items():
        if name in consumed or is_mtp(cfg, name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice; the embedding is what is used
        raise CheckpointError(f"{t.file}: unexpected tensor {name} (not a parameter of this {cfg.model_type} config)")
