"""Reading transformers-format checkpoints: safetensors shards, published DeepSeek tensor names."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ktjax.config import ModelConfig

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


class CheckpointError(ValueError):
    """Bad checkpoint input; the message names the file and tensor at fault."""


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
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{file}: corrupt safetensors header (length {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    infos = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: corrupt header entry {h!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name}: unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{file}: tensor {name}: {end - begin} bytes stored for shape {list(shape)} {dtype}")
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: tensor {name}: file is truncated ({size} bytes, tensor ends at {8 + n + end})")
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + n + begin, nbytes)
    return infos


class Checkpoint:
    """All tensors of a checkpoint directory (one file or shards), memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: corrupt index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = os.path.join(self.path, name)
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: missing (listed in model.safetensors.index.json)")
            self.tensors.update(read_header(file))
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{os.path.join(self.path, file)}: tensor {name} listed in the index is not in the file")
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing") from None

    def read(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the file (no copy until used)."""
        t = self.info(name)
        if t.file not in self._maps:
            self._maps[t.file] = np.memmap(t.file, dtype=np.uint8, mode="r")
        raw = self._maps[t.file][t.offset:t.offset + t.nbytes]
        return raw.view(DTYPES[t.dtype]).reshape(t.shape)


# ---- names ---------------------------------------------------------------------------------

def tensor_names(cfg: ModelConfig, path: tuple[str, ...], group_layers: dict[str, list[int]]) -> list[tuple[str, tuple[int, ...]]]:
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
    for j, i in enumerate(group_layers[group]):
        if rest[:2] == ("mlp", "experts"):
            out += [(f"model.layers.{i}.mlp.experts.{e}.{rest[2]}.weight", (j, e)) for e in range(cfg.n_routed_experts)]
        else:
            out.append((f"model.layers.{i}." + ".".join(rest), (j,)))
    return out
