"""`ktjax quantize`: a checkpoint rewritten with its routed experts stored in an integer format
(int8 or int4, exactly the arrays of `ktjax.experts.quant`), so that loading it runs no quantizer.
The layout is docs/quantized_checkpoints.md.

Streamed, as `ktjax merge` is: layer by layer, one tensor or one expert at a time, into shards of
bounded size (`ktjax.io.merge.ShardWriter`); the output directory appears only once complete.
Every tensor but the routed experts' is copied as the source stores it (FP8 weights keep their
block scales). Experts are quantized by the code `ktjax.load(path, experts=fmt)` runs, so loading the
written checkpoint gives the very model that quantizing while loading gives.
"""

from __future__ import annotations

import os
import re
import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ktjax.config import ModelConfig
from ktjax.quantization_config import EXPERT_QUANT_FORMATS, quantization_config
from ktjax.experts.weights import ExpertFormat
from ktjax.io.checkpoint import Checkpoint, check_unexpected, quantized_names
from ktjax.io.experts import expert_tensors, read_expert, stored_nbytes
from ktjax.io.load import abstract_params, is_routed_expert, plan_leaves, show_progress
from ktjax.io.merge import SHARD_BYTES, ShardWriter, finish_checkpoint, read_config, staged_output


def stored_form(a: np.ndarray) -> np.ndarray:
    """As the file holds it: float16 scales (kept as uint16 bits in memory) as float16."""
    return a.view(np.float16) if a.dtype == np.uint16 else a


def _layer(name: str) -> int:
    """The decoder layer a tensor belongs to; -1 before the layers (embedding), a large number after."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    return -1 if name.startswith("model.embed_tokens") else 1 << 30


def quantize_checkpoint(model_dir: str, output: str, experts: str, *, shard_bytes: int = SHARD_BYTES,
                        progress: bool | None = None) -> str:
    """Write model_dir's checkpoint to `output` with its routed experts stored as `experts` ("int8" or
    "int4"); returns `output`. The source is checked from its headers before anything is written."""
    if experts not in EXPERT_QUANT_FORMATS:
        raise ValueError(f"experts={experts!r}: a quantized checkpoint stores its experts as one of "
                         f"{', '.join(EXPERT_QUANT_FORMATS)}")
    model_dir, output = os.path.expanduser(model_dir), os.path.expanduser(output)
    cfg = ModelConfig.from_json(model_dir)
    ckpt = Checkpoint(model_dir)
    _, abstract = abstract_params(cfg, jnp.float32)  # names and shapes only
    sources, consumed = plan_leaves(ckpt, cfg, abstract)
    check_unexpected(ckpt, cfg, consumed)
    expert_sources = {p: src for p, src in sources if is_routed_expert(p)}
    if not expert_sources:
        raise ValueError(f"{model_dir}: the model has no routed experts to quantize")
    block = next(iter(expert_sources.values())).block
    fmt = ExpertFormat(experts, cfg.moe_intermediate_size, cfg.hidden_size)
    by_expert = expert_tensors(cfg, expert_sources)
    expert_names = {n for src in expert_sources.values() for n in src.names}
    copied: dict[int, list[str]] = {}
    for name in ckpt.tensors:
        if name not in expert_names:
            copied.setdefault(_layer(name), []).append(name)
    experts_of: dict[int, list] = {}
    for (i, _), mats in sorted(by_expert.items()):
        experts_of.setdefault(i, []).append(mats)
    bar = tqdm(total=sum(t.nbytes for t in ckpt.tensors.values()), unit="B", unit_scale=True, unit_divisor=1000,
               desc=f"quantizing {os.path.basename(model_dir.rstrip('/'))} to {experts}", file=sys.stderr,
               dynamic_ncols=True, disable=not show_progress(progress))
    with bar, staged_output(output, ".quantize-") as staging:
        writer = ShardWriter(staging, shard_bytes)
        for layer in sorted(copied.keys() | experts_of.keys()):
            for name in copied.get(layer, []):
                writer.add(name, ckpt.read(name))
                bar.update(ckpt.info(name).nbytes)
            for mats in experts_of.get(layer, []):
                write_expert(writer, ckpt, mats, fmt, block, cfg.expert_quant)
                bar.update(stored_nbytes(ckpt, mats, cfg.expert_quant))
        writer.close()
        config = read_config(model_dir)  # every published field kept; only the quantization is new
        config["quantization_config"] = quantization_config(experts, cfg.fp8_block_size)
        finish_checkpoint(model_dir, staging, config)
    return output


def write_expert(writer: ShardWriter, ckpt: Checkpoint, mats, fmt: ExpertFormat, block: tuple[int, int],
                 stored: str | None) -> None:
    """One expert's gate, up and down as `fmt`'s arrays, quantized as loading quantizes them."""
    buf = np.asarray(read_expert(ckpt, mats, fmt, block, stored=stored).w)
    gate_up, down = fmt.packed.arrays(buf, "gate_up"), fmt.packed.arrays(buf, "down")
    F = fmt.F
    gate = {a: v[:F] for a, v in gate_up.items()}
    up = {a: v[F:] for a, v in gate_up.items()}
    for (name, _), arrays in zip(mats, (gate, up, down)):
        for a, tensor in quantized_names(name, fmt.name).items():
            writer.add(tensor, stored_form(arrays[a]))
