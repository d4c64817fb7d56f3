"""`ktjax merge`: a PEFT LoRA adapter merged into a checkpoint, written as a new checkpoint."""

from __future__ import annotations

import os
import sys

from ktjax.api import resolve_path
from ktjax.cli.common import new_output_dir
from ktjax.io.merge import merge_checkpoint
from ktjax.runtime.placement import parse_size


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge a LoRA adapter into a model's weights and save the result",
        description="Add a PEFT LoRA adapter's updates to the base weights (W + alpha/r B A) and write a "
        "transformers-format checkpoint, tokenizer files included. Streams: one tensor at a time, shards of "
        "at most --shard-size, so it works at DeepSeek-V3/R1 size. An FP8 checkpoint stays FP8 (merged weights are "
        "re-quantized to its blocks, with fresh scales) unless --dtype asks for float weights.")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="base checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--adapter", metavar="DIR", required=True, help="PEFT adapter directory")
    p.add_argument("--output", metavar="DIR", required=True, help="where to write the merged checkpoint (new or empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="write every weight in this dtype (FP8 dequantized; default: keep the checkpoint's)")
    p.add_argument("--shard-size", metavar="SIZE", default="4GiB",
                   help="largest output file, e.g. 2GiB (default 4GiB); memory use is about one shard")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError:
        raise ValueError(f"--shard-size {args.shard_size!r} is not a size (examples: 4GiB, 500MB)") from None
    out = merge_checkpoint(resolve_path(args.model), os.path.expanduser(args.adapter), new_output_dir(args.output),
                           dtype=args.dtype, shard_bytes=shard_bytes)
    print(f"merged checkpoint written to {out}", file=sys.stderr)
    return 0
