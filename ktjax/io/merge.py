"""`ktjax merge`: a checkpoint plus a PEFT LoRA adapter written as a new checkpoint, streamed: one
tensor read, merged and written at a time, straight into shards of bounded size, never the whole
model (nor a whole shard) in memory, so a DeepSeek-V3/R1 merge needs about one tensor's worth.

Tensors the adapter targets get W + s B A (float32, as PEFT merges). An FP8 checkpoint stays FP8
by default: merged weights are quantized back to the config's blocks with fresh scales, so the files
match the config's quantization. dtype="bfloat16"/"float32" instead writes every weight in that
dtype (the router stays float32, as the model keeps it) and drops the quantization from the
config. Everything the merge needs from the source is checked from its headers before anything is
written; the output appears only once complete, and not at all when the merge fails or is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from ktjax.config import ModelConfig
from ktjax.io.checkpoint import DTYPES, FP8_DTYPE, SCALE_SUFFIX, Checkpoint, CheckpointError, dequantize_fp8, fp8_scale_shape
from ktjax.io.peft import peft_names, read_adapter
from ktjax.lora.config import get_path, sites_of

SHARD_BYTES = 4 << 30
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                "special_tokens_map.json")
OUTPUT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def lora_deltas(cfg: ModelConfig, adapters, lcfg) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Checkpoint tensor name -> (A [r, in], B [out, r], scale) for every weight the adapter changes."""
    out = {}
    for s in sites_of(adapters):
        a_all, b_all = np.asarray(get_path(adapters, s.a_path)), np.asarray(get_path(adapters, s.b_path))
        for peft_name, idx in peft_names(cfg, s):
            name = peft_name.removeprefix("base_model.model.") + ".weight"
            out[name] = (a_all[idx], b_all[idx], float(lcfg.scale))
    return out


class ShardWriter:
    """Writes tensors into safetensors shards of at most `limit` bytes of data each (one larger
    tensor gets a shard of its own), then renames them model-0000k-of-0000n and writes the index.

    Each tensor goes to disk as it is added: its shard's header is written when the shard is full,
    into room reserved ahead of the data (the safetensors format allows a header padded with
    spaces), so memory holds one tensor, never a shard."""

    def __init__(self, directory: str, limit: int):
        self.directory, self.limit = directory, limit
        self.reserve = max(8192, min(limit // 64, 1 << 20)) // 8 * 8  # header room: ~130 bytes a tensor
        self.files: list[list[str]] = []
        self.entries: dict[str, dict] = {}
        self.file = None
        self.size = 0

    def _part(self, k: int) -> str:
        return os.path.join(self.directory, f"part-{k:05d}.safetensors")

    def add(self, name: str, value: np.ndarray) -> None:
        if self.file is not None and self.size and self.size + value.nbytes > self.limit:
            self._flush()
        if self.file is None:
            self.file = open(self._part(len(self.files)), "wb")
            self.file.seek(8 + self.reserve)
        value = np.ascontiguousarray(value)
        if value.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name}: dtype {value.dtype} has no safetensors code here "
                             f"({', '.join(map(str, _DTYPE_CODES))})")
        self.entries[name] = {"dtype": _DTYPE_CODES[value.dtype], "shape": list(value.shape),
                              "data_offsets": [self.size, self.size + value.nbytes]}
        self.file.write(value.reshape(-1).view(np.uint8))
        self.size += value.nbytes

    def _flush(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        part = self._part(len(self.files))
        if len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
            self.file.close()
        else:  # more tensors than the room reserved: the data moves behind an exact header
            self.file.close()
            header = header.ljust(-(-len(header) // 8) * 8, b" ")
            with open(part, "rb") as src, open(part + ".tmp", "wb") as dst:
                dst.write(struct.pack("<Q", len(header)) + header)
                dst.flush()
                copy_bytes(src, dst, 8 + self.reserve, self.size)
            os.replace(part + ".tmp", part)
        self.files.append(list(self.entries))
        self.file, self.entries, self.size = None, {}, 0

    def close(self) -> None:
        if self.file is not None:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._part(k), os.path.join(self.directory, final))
            os.chmod(os.path.join(self.directory, final), 0o644)
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def copy_bytes(src, dst, offset: int, length: int) -> None:
    """src's bytes [offset, offset + length) appended to dst, in the kernel where it can (no buffer)."""
    try:
        while length > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length, offset)
            if n == 0:
                raise OSError(f"{src.name}: shorter than expected")
            offset, length = offset + n, length - n
    except (AttributeError, OSError):  # no copy_file_range here (or not between these files)
        src.seek(offset)
        while length > 0:
            chunk = src.read(min(length, 1 << 20))
            if not chunk:
                raise OSError(f"{src.name}: shorter than expected") from None
            dst.write(chunk)
            length -= len(chunk)


_DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
# The MoE router's weight and bias: float32 in the model whatever its dtype, and in published checkpoints.
ROUTER = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")


def quantize_fp8(w_RC: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float -> (float8_e4m3fn values, float32 scales per block [ceil(R/b0), ceil(C/b1)]): each block's
    largest |value| maps to e4m3's largest (448), as DeepSeek's FP8 checkpoints store weights (the
    inverse of `dequantize_fp8`)."""
    (R, C), (b0, b1) = w_RC.shape, block
    rb, cb = -(-R // b0), -(-C // b1)
    blocks = np.pad(w_RC.astype(np.float32), ((0, rb * b0 - R), (0, cb * b1 - C))).reshape(rb, b0, cb, b1)
    scale = np.abs(blocks).max(axis=(1, 3)) / np.float32(448.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(blocks / scale[:, None, :, None], -448.0, 448.0).reshape(rb * b0, cb * b1)[:R, :C]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def check_sources(ckpt: Checkpoint, deltas: dict, block: tuple[int, int], adapter_dir: str) -> None:
    """Everything the merge reads, checked from the headers before anything is written: targeted
    tensors exist with the adapter's shape, every FP8 weight has its scales in the config's blocks."""
    for name, (a, b, _) in sorted(deltas.items()):
        info = ckpt.info(name)
        if info.shape != (b.shape[0], a.shape[1]):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, but the adapter "
                                  f"{adapter_dir} changes a {[b.shape[0], a.shape[1]]} weight")
    for name, info in ckpt.tensors.items():
        if info.dtype != FP8_DTYPE:
            continue
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: tensor {name}: FP8 weights must be 2-D, got shape {list(info.shape)}")
        scale = ckpt.info(name + SCALE_SUFFIX)
        want = fp8_scale_shape(info.shape, block)
        if scale.shape != want or scale.dtype not in ("F32", "BF16"):
            raise CheckpointError(f"{scale.file}: tensor {scale.name} is {scale.dtype} {list(scale.shape)}, but "
                                  f"{name} {list(info.shape)} in blocks of {list(block)} needs F32 {list(want)}")


def merged_float(ckpt: Checkpoint, name: str, deltas: dict, block: tuple[int, int]) -> np.ndarray:
    """The tensor dequantized to float32, plus the adapter's delta where it has one."""
    w = ckpt.read(name)
    if ckpt.info(name).dtype == FP8_DTYPE:
        w32 = dequantize_fp8(w, ckpt.read(name + SCALE_SUFFIX), block, np.float32)
    else:
        w32 = w.astype(np.float32)
    if name in deltas:
        a, b, s = deltas[name]
        w32 = w32 + np.float32(s) * (b.astype(np.float32) @ a.astype(np.float32))
    if not np.isfinite(w32).all():
        raise CheckpointError(f"{ckpt.info(name).file}: tensor {name} has non-finite values"
                              + (" after merging the adapter" if name in deltas else ""))
    return w32


def merge_checkpoint(model_dir: str, adapter_dir: str, output: str, *, dtype: str | None = None,
                     shard_bytes: int = SHARD_BYTES) -> str:
    """Write model_dir's checkpoint with the adapter merged into `output` (see the module docstring)."""
    model_dir, adapter_dir, output = (os.path.expanduser(os.fspath(p)) for p in (model_dir, adapter_dir, output))
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(OUTPUT_DTYPES)} (or none to keep the checkpoint's)")
    if shard_bytes < 1:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    cfg = ModelConfig.from_json(model_dir)
    if dtype is not None and cfg.expert_quant is not None:
        raise ValueError(f"{model_dir}: its routed experts are stored {cfg.expert_quant}; merging into it keeps them "
                         "so (leave dtype unset)")
    ckpt = Checkpoint(model_dir)
    adapters, lcfg = read_adapter(adapter_dir, cfg)
    deltas = lora_deltas(cfg, adapters, lcfg)
    missing = sorted(set(deltas) - set(ckpt.tensors))
    if missing:
        raise ValueError(f"{ckpt.where}: tensor {missing[0]} is missing (the adapter {adapter_dir} changes it)")
    block = cfg.fp8_block_size or (128, 128)
    check_sources(ckpt, deltas, block, adapter_dir)
    keep_fp8 = dtype is None
    with staged_output(output, ".merge-") as staging:
        writer = ShardWriter(staging, shard_bytes)
        for name, info in ckpt.tensors.items():
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in ckpt.tensors:
                continue  # written with its weight
            fp8 = info.dtype == FP8_DTYPE
            if name not in deltas and (keep_fp8 or ROUTER.search(name) or not fp8 and
                                       DTYPES[info.dtype] == OUTPUT_DTYPES[dtype]):
                writer.add(name, ckpt.read(name))  # as stored, bytes untouched
                if fp8:
                    writer.add(name + SCALE_SUFFIX, ckpt.read(name + SCALE_SUFFIX))
                continue
            w32 = merged_float(ckpt, name, deltas, block)
            if fp8 and keep_fp8:
                q, scale = quantize_fp8(w32, block)
                writer.add(name, q)
                writer.add(name + SCALE_SUFFIX, scale)
            else:
                writer.add(name, w32.astype(OUTPUT_DTYPES[dtype] if dtype else DTYPES[info.dtype]))
            del w32
        writer.close()
        config = read_config(model_dir)  # the published config, every field kept
        if not keep_fp8:
            config.pop("quantization_config", None)
            config["torch_dtype"] = dtype
        finish_checkpoint(model_dir, staging, config)
    return output


def read_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def finish_checkpoint(model_dir: str, directory: str, config: dict) -> None:
    """config.json, and the tokenizer and generation files copied from model_dir."""
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for name in COPIED_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(directory, name))


@contextlib.contextmanager
def staged_output(output: str, prefix: str) -> Iterator[str]:
    """A fresh directory beside `output` to write into, renamed to `output` when the block completes and
    removed when it fails or is interrupted: the output appears whole or not at all. `output` must
    not exist, or be an empty directory."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"{output}: exists and is not an empty directory; choose a new output directory")
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the files in it are 0o644
        if os.path.exists(output):
            os.rmdir(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
