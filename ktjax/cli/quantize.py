"""`ktjax quantize`: a checkpoint rewritten with its routed experts stored as int8 or int4."""

from __future__ import annotations

import os
import sys

from ktjax.api import quantize
from ktjax.cli.common import new_output_dir
from ktjax.quantization_config import EXPERT_QUANT_FORMATS
from ktjax.runtime.placement import fmt_bytes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write a checkpoint with its routed experts stored as int8 or int4",
        description="Quantize a checkpoint's routed experts once and write the result as a new checkpoint "
        "(safetensors shards with an index, config.json, tokenizer and generation files), so that loading it "
        "(ktjax generate/chat/info --model OUTPUT, or ktjax.load) keeps the experts in that format without "
        "quantizing again. int8: symmetric, one float16 scale per group of 32 inputs (GGUF Q8_0's blocks); "
        "int4: 4-bit values with a scale and minimum per group of 32 and per super-block of 256 (GGUF Q4_K's). "
        "Everything but the routed experts is copied as the source stores it (FP8 weights keep their scales). "
        "Streams one tensor or expert at a time into shards of at most 4 GiB, so it works at DeepSeek-V3/R1 "
        "size; the output directory appears only once it is complete. Layout: docs/quantized_checkpoints.md.")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="source checkpoint directory in transformers format (default: the embedded tiny model)")
    p.add_argument("--experts", metavar="{" + ",".join(EXPERT_QUANT_FORMATS) + "}", required=True,
                   help="the format the routed experts are stored in: int8 (about half of bf16's bytes; each "
                        "weight within about 1/254 of its group's largest magnitude) or int4 (under a third of "
                        "bf16's bytes; within 1/15 of its group's range)")
    p.add_argument("--output", metavar="DIR", required=True,
                   help="where to write the quantized checkpoint (must not exist, or be an empty directory)")
    p.set_defaults(func=run)


def run(args) -> int:
    output = new_output_dir(args.output)
    if args.model is not None and not os.path.isdir(os.path.expanduser(args.model)):
        raise ValueError(f"--model {args.model}: no such checkpoint directory")
    if args.experts not in EXPERT_QUANT_FORMATS:
        raise ValueError(f"--experts {args.experts}: use one of {', '.join(EXPERT_QUANT_FORMATS)}")
    out = quantize(args.model, experts=args.experts, output=output)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"quantized checkpoint ({args.experts} experts, {fmt_bytes(size)} of weights) written to {out}",
          file=sys.stderr)
    return 0
