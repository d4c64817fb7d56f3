"""The `ktjax` command line: one module per command (generate, chat, info, finetune, merge, quantize, serve)."""

from __future__ import annotations

import argparse
import sys

from ktjax import __version__
from ktjax.cli import chat, finetune, generate, info, merge, quantize, serve
from ktjax.runtime.compilation_cache import enable_compilation_cache

EPILOG = """examples:
  ktjax generate --prompt "def fibonacci(n):"            # the embedded tiny model
  ktjax generate --model ~/DeepSeek-V2-Lite --prompt "Hi" --max-new-tokens 64 --temperature 0.7
  echo "Once upon a time" | ktjax generate --model DIR --json
  ktjax generate --model ~/DeepSeek-R1 --gpu-memory 24GiB --experts int4   # experts quantized, on the CPU and link
  ktjax chat --model ~/DeepSeek-R1 --thinking
  ktjax info --model ~/DeepSeek-R1 --gpu-memory 24GiB --experts int8
  ktjax finetune --data chat.jsonl --output adapter/      # the embedded model
  ktjax merge --model DIR --adapter adapter/ --output merged/
  ktjax quantize --model ~/DeepSeek-R1 --experts int4 --output ~/DeepSeek-R1-int4   # loads without quantizing
  ktjax serve --model ~/DeepSeek-R1 --gpu-memory 24GiB --max-batch 16 --port 8000   # OpenAI-compatible API
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktjax", description="Run and fine-tune DeepSeek-V3/R1-class MoE models in JAX, with the routed experts "
        "in host memory (computed there or streamed to the GPU) when the GPU is too small.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ktjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (generate, chat, info, finetune, merge, quantize, serve):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        enable_compilation_cache()
        return args.func(args)
    except (ValueError, OSError, NotImplementedError, FloatingPointError) as e:  # bad input: one line, no traceback
        print(f"ktjax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
