"""`ktjax merge`: a checkpoint plus a PEFT LoRA adapter written as a new checkpoint, streamed: one
tensor read at a time, shards of bounded size written as they fill, never the whole model in
memory (a DeepSeek-V3/R1 merge fits a machine that can hold one shard).

Tensors the adapter targets get W + s B A (float32, as PEFT merges). An FP8 checkpoint stays FP8
by default: merged weights are quantized back to 128x128 blocks with fresh scales, so the files
match the config's quantization. dtype="bfloat16"/"float32" instead writes every weight in that
dtype and drops the quantization from the config. The output appears only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ktjax.config import ModelConfig
from ktjax.io.checkpoint import FP8_DTYPE, SCALE_SUFFIX, Checkpoint, dequantize_fp8
from ktjax.io.experts import fp8_blocks
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
    """Writes tensors into shards of at most `limit` bytes, then the index."""

    def __init__(self, directory: str, limit: int):
        self.directory, self.limit = directory, limit
        self.pending: dict[str, np.ndarray] = {}
        self.files: list[list[str]] = []
        self.size = 0

    def add(self, name: str, value: np.ndarray) -> None:
        if self.pending and self.size + value.nbytes > self.limit:
            self._flush()
        self.pending[name] = np.ascontiguousarray(value)
        self.size += value.nbytes

    def _flush(self) -> None:
        file = os.path.join(self.directory, f"part-{len(self.files):05d}.safetensors")
        save_file(self.pending, file, metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"part-{k:05d}.safetensors"), os.path.join(self.directory, final))
            os.chmod(os.path.join(self.directory, final), 0o644)
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def merge_checkpoint(model_dir: str, adapter_dir: str, output: str, *, dtype: str | None = None,
                     shard_bytes: int = SHARD_BYTES) -> str:
    """Write model_dir's checkpoint with the adapter merged into `output` (see the module docstring)."""
    model_dir, output = os.path.expanduser(model_dir), os.path.expanduser(output)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(OUTPUT_DTYPES)} (or none to keep the checkpoint's)")
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
    with staged_output(output, ".merge-") as staging:
        writer = ShardWriter(staging, shard_bytes)
        keep_fp8 = dtype is None
        for name, info in ckpt.tensors.items():
            if name.endswith(SCALE_SUFFIX):
                continue  # written with its weight
            w = ckpt.read(name)
            scale_name = name + SCALE_SUFFIX if info.dtype == FP8_DTYPE else None
            block = (cfg.fp8_block_size or (128, 128))
            if name not in deltas and (scale_name is None or keep_fp8):
                writer.add(name, w if dtype is None else w.astype(OUTPUT_DTYPES[dtype]))
                if scale_name is not None:
                    writer.add(scale_name, ckpt.read(scale_name))
                continue
            w32 = dequantize_fp8(w, ckpt.read(scale_name), block, np.float32) if scale_name else w.astype(np.float32)
            if name in deltas:
                a, b, s = deltas[name]
                w32 = w32 + s * (b.astype(np.float32) @ a.astype(np.float32))
            if scale_name is not None and keep_fp8:
                q, scale = fp8_blocks(w32, block[0])
                writer.add(name, q)
                writer.add(scale_name, scale)
            else:
                writer.add(name, w32.astype(OUTPUT_DTYPES[dtype] if dtype else w.dtype))
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
