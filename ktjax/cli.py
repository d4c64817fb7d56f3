"""The `ktjax` command line: generate, chat, info."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ktjax import __version__

EPILOG = """examples:
  ktjax generate --prompt "def fibonacci(n):"            # the embedded tiny model
  ktjax generate --model ~/DeepSeek-V2-Lite --prompt "Hi" --max-new-tokens 64 --temperature 0.7
  echo "Once upon a time" | ktjax generate --model DIR --json
  ktjax chat --model ~/DeepSeek-R1 --thinking
  ktjax info --model ~/DeepSeek-R1 --gpu-memory 24GiB
  ktjax finetune --model DIR --data chat.jsonl --output adapter/
  ktjax merge --model DIR --adapter adapter/ --output merged/
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory in transformers format (config.json, *.safetensors, tokenizer "
                        "files); default: the embedded tiny Python model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the loaded weights (default: the checkpoint's; FP8 loads as bfloat16)")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None,
                   help="device memory budget, e.g. 24GiB: core parameters, KV cache and workspace stay on the "
                        "device, routed experts that do not fit live in pinned host memory and are streamed in "
                        "(default: the GPU's own limit; no limit on the CPU)")
    p.add_argument("--max-context", type=int, default=4096, metavar="N",
                   help="tokens of KV cache the budget reserves per sequence (default 4096)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 picks the most likely token every time (default: the checkpoint's "
                        "generation_config.json, else 0)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: keep the most likely tokens whose probabilities sum to P (default: the "
                        "checkpoint's, else 1: off)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep only the K most likely tokens (default: the checkpoint's, else 0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (may be given several times)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktjax", description="Run DeepSeek-V3/R1-class MoE models in JAX, with the routed experts in host "
        "memory when the GPU is too small.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ktjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt and print the text",
                       description="Continue a prompt (from --prompt or standard input) and print the new text.")
    _model_args(g)
    g.add_argument("--prompt", default=None, help="the prompt text; read from standard input when omitted")
    _sampling_args(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids (new tokens only) and stats instead of streaming")
    g.add_argument("--profile", action="store_true",
                   help="time every segment (waits after each one, so it runs slower) and print the time per "
                        "segment, bytes moved from host memory per step, achieved GB/s and device memory in use")
    g.add_argument("--trace", metavar="DIR", default=None,
                   help="write a jax.profiler trace of the generation to DIR (view it with TensorBoard or Perfetto)")

    c = sub.add_parser("chat", help="talk to the model in the terminal",
                       description="Interactive chat with the model's chat template. Type /reset to forget the "
                       "conversation, /quit (or Ctrl-D) to leave.")
    _model_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="a system message placed before the conversation")
    c.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="force (--thinking) or suppress (--no-thinking) DeepSeek-R1's <think> opening; "
                        "default: as the chat template does")

    i = sub.add_parser("info", help="describe a checkpoint: config and parameter counts",
                       description="Print the config summary and parameter counts and bytes by group, without "
                       "loading the weights; with --gpu-memory, the placement plan too.")
    _model_args(i)

    from ktjax.finetune import add_finetune_parser, add_merge_parser
    add_finetune_parser(sub)
    add_merge_parser(sub)
    return parser


def _load(args):
    import ktjax
    model = ktjax.load(args.model, dtype=args.dtype, gpu_memory=args.gpu_memory, max_context=args.max_context,
                       adapter=args.adapter)
    if getattr(model.placement, "offloaded", False):
        print(model.placement.table(), file=sys.stderr)
    return model


def _print_profile(stats) -> None:
    from ktjax.placement import fmt_bytes
    lines = [f"prefill: {fmt_bytes(stats.prefill_host_bytes)} from host memory",
             f"decode: {fmt_bytes(stats.decode_host_bytes_per_step)} from host memory per step, "
             f"{stats.decode_host_gb_per_s:.1f} GB/s achieved"]
    if stats.device_memory_bytes is not None:
        lines.append(f"device memory: {fmt_bytes(stats.device_memory_bytes)} in use, "
                     f"{fmt_bytes(stats.peak_device_memory_bytes or 0)} peak")
    total = sum(stats.segment_seconds.values())
    for name, sec in sorted(stats.segment_seconds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<16}{sec * 1e3:10.1f} ms {100 * sec / total:6.1f}%")
    print("\n".join(lines), file=sys.stderr)


def _sampling(args, model) -> dict:
    """Options given on the command line, else the checkpoint's recommended ones, else greedy."""
    chosen = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    defaults = getattr(model, "generation_defaults", {})
    settings = {k: v if v is not None else defaults.get(k, d) for (k, v), d in zip(chosen.items(), (0.0, 1.0, 0))}
    return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, **settings)


def cmd_generate(args) -> int:
    import ktjax
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on standard input")
    model = _load(args)
    from ktjax.tokenizer import require_tokenizer
    require_tokenizer(model.tokenizer, model.path)
    if args.profile:
        model.profile = True  # offloaded models time each segment
    with contextlib.ExitStack() as stack:
        if args.trace:
            import jax
            stack.enter_context(jax.profiler.trace(args.trace))
        if args.json:
            r = ktjax.generate(model, prompt, **_sampling(args, model))
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "stats": r.stats.as_dict()}))
            stats = r.stats
        else:
            stats = ktjax.GenerationStats(prompt_tokens=0)
            sys.stdout.write(prompt)
            for piece in ktjax.stream(model, prompt, stats=stats, **_sampling(args, model)):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new, first token after "
                  f"{stats.time_to_first_token_s:.2f} s, {stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    if args.profile:
        _print_profile(stats)
    return 0


def cmd_chat(args) -> int:
    import ktjax
    from ktjax.generation import chat_prompt
    model = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("ktjax chat: /reset clears the conversation, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = chat_prompt(model, system + history, thinking=args.thinking)
        reply = []
        for piece in ktjax.stream(model, prompt, **_sampling(args, model)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args) -> int:
    from ktjax.api import default_model_path, plan_placement
    from ktjax.inspection import describe
    path = args.model or default_model_path()
    print(describe(path, dtype=args.dtype))
    if args.gpu_memory is not None:
        print(f"\nplacement under gpu_memory={args.gpu_memory} (KV cache for {args.max_context} tokens):")
        print(plan_placement(path, dtype=args.dtype, gpu_memory=args.gpu_memory, max_context=args.max_context).table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from ktjax.engine import enable_compilation_cache
        enable_compilation_cache()
        from ktjax.finetune import cmd_finetune, cmd_merge
        commands = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "finetune": cmd_finetune,
                    "merge": cmd_merge}
        return commands[args.command](args)
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"ktjax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
