"""`ktjax generate`: continue a prompt and print the text."""

from __future__ import annotations

import contextlib
import json
import sys

import jax

from ktjax.cli.common import check_model_args, check_sampling_args, load_model, model_args, sampling, sampling_args
from ktjax.runtime.generation import GenerationStats, generate, stream
from ktjax.runtime.placement import fmt_bytes
from ktjax.text import require_tokenizer


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt and print the text",
                       description="Continue a prompt (from --prompt or standard input) and print the new text.")
    model_args(g)
    g.add_argument("--prompt", default=None, help="the prompt text; read from standard input when omitted")
    sampling_args(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids (new tokens only) and stats instead of streaming")
    g.add_argument("--profile", action="store_true",
                   help="time every segment (waits after each one, so it runs slower) and print the time per "
                        "segment, bytes moved from host memory per step, achieved GB/s, where the experts ran and "
                        "device memory in use")
    g.add_argument("--trace", metavar="DIR", default=None,
                   help="write a jax.profiler trace of the generation to DIR (view it with TensorBoard or Perfetto)")
    g.set_defaults(func=run)


def print_profile(stats: GenerationStats) -> None:
    lines = [f"prefill: {fmt_bytes(stats.prefill_host_bytes)} from host memory",
             f"decode: {fmt_bytes(stats.decode_host_bytes_per_step)} from host memory per step, "
             f"{stats.decode_host_gb_per_s:.1f} GB/s achieved"]
    if stats.decode_experts_per_step:
        lines.append("decode experts per step: " + ", ".join(f"{v:.1f} {k}" for k, v in
                                                            stats.decode_experts_per_step.items()))
    if stats.device_memory_bytes is not None:
        lines.append(f"device memory: {fmt_bytes(stats.device_memory_bytes)} in use, "
                     f"{fmt_bytes(stats.peak_device_memory_bytes or 0)} peak")
    total = sum(stats.segment_seconds.values()) or 1.0
    for name, sec in sorted(stats.segment_seconds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<16}{sec * 1e3:10.1f} ms {100 * sec / total:6.1f}%")
    print("\n".join(lines), file=sys.stderr)


def run(args) -> int:
    check_model_args(args)
    check_sampling_args(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on standard input")
    model = load_model(args)
    require_tokenizer(model.tokenizer, model.path)
    with contextlib.ExitStack() as stack:
        if args.trace:
            stack.enter_context(jax.profiler.trace(args.trace))
        if args.json:
            r = generate(model, prompt, profile=args.profile, **sampling(args, model))
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "stats": r.stats.as_dict()}))
            stats = r.stats
        else:
            stats = GenerationStats(prompt_tokens=0)
            sys.stdout.write(prompt)
            for piece in stream(model, prompt, stats=stats, profile=args.profile, **sampling(args, model)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new, first token after "
                  f"{stats.time_to_first_token_s:.2f} s, {stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    if args.profile:
        print_profile(stats)
    return 0
