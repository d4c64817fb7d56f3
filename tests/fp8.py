"""Writing DeepSeek-style FP8 checkpoints from float ones, and their dequantised float32 twins.

FP8 layout as published: `float8_e4m3fn` weights with a float32 `<name>_scale_inv` per block
(config's quantization_config.weight_block_size; edge blocks partial); value = block * scale.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# As in DeepSeek-V3's release: linear weights are FP8; embeddings, lm_head, norms and the router are not.
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\..*(proj|proj_with_mqa)\.weight$")


def quantize_fp8(w_RC: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise e4m3 quantisation: (values [R, C] float8_e4m3fn, scales [ceil(R/b0), ceil(C/b1)] float32)."""
    R, C = w_RC.shape
    b0, b1 = block
    q_RC = np.empty((R, C), ml_dtypes.float8_e4m3fn)
    scale_rc = np.empty((-(-R // b0), -(-C // b1)), np.float32)
    for i in range(scale_rc.shape[0]):
        for j in range(scale_rc.shape[1]):
            blk = w_RC[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].astype(np.float32)
            s = np.float32(np.abs(blk).max() / E4M3_MAX) or np.float32(1.0)
            scale_rc[i, j] = s
            q_RC[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = np.clip(blk / s, -E4M3_MAX, E4M3_MAX).astype(q_RC.dtype)
    return q_RC, scale_rc


def dequantize_reference(q_RC: np.ndarray, scale_rc: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """The formula, block by block: float32(fp8 block) * its float32 scale."""
    b0, b1 = block
    out = np.empty(q_RC.shape, np.float32)
    for i in range(scale_rc.shape[0]):
        for j in range(scale_rc.shape[1]):
            rows, cols = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[rows, cols] = q_RC[rows, cols].astype(np.float32) * scale_rc[i, j]
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory as numpy (torch reads float8, safetensors' numpy backend does not)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            for name, t in safetensors.torch.load_file(os.path.join(path, f)).items():
                if t.dtype == torch.float8_e4m3fn:
                    out[name] = t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
                elif t.dtype == torch.bfloat16:
                    out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                else:
                    out[name] = t.numpy()
    return out


def _write(path: str, config: dict, tensors: dict[str, np.ndarray], src: str | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    if src is not None:  # tokenizer and generation files travel along
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and f not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(os.path.join(src, f), path)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def write_fp8_checkpoint(src: str, dst: str, block: tuple[int, int] = (128, 128), quantized: re.Pattern = QUANTIZED) -> str:
    """Copy a float checkpoint with the tensors matching `quantized` stored as FP8 + `_scale_inv`."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    tensors = {}
    for name, w in read_tensors(src).items():
        if quantized.search(name) and w.ndim == 2:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(w.astype(np.float32), block)
        else:
            tensors[name] = w
    return _write(dst, config, tensors, src)


def write_dequantized_twin(src: str, dst: str) -> str:
    """The FP8 checkpoint `src` with every FP8 tensor replaced by its float32 dequantisation (numpy reference)."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    config["torch_dtype"] = "float32"
    tensors = read_tensors(src)
    out = {}
    for name, w in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        out[name] = dequantize_reference(w, tensors[name + "_scale_inv"], block) if w.dtype == ml_dtypes.float8_e4m3fn else w
    return _write(dst, config, out, src)
