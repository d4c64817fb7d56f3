"""`ktjax chat`: talk to the model in the terminal, with the model's chat template. When the
conversation outgrows the context the model was loaded for, the oldest turns are dropped (and the
chat says so)."""

from __future__ import annotations

import argparse
import sys

from ktjax.cli.common import check_model_args, check_sampling_args, load_model, model_args, sampling, sampling_args
from ktjax.runtime.generation import chat_prompt, stream


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="talk to the model in the terminal",
                       description="Interactive chat with the model's chat template. Type /reset to forget the "
                       "conversation, /quit (or Ctrl-D) to leave. When the conversation no longer fits "
                       "--max-context, the oldest turns are dropped.")
    model_args(c)
    sampling_args(c)
    c.add_argument("--system", default=None, help="a system message placed before the conversation")
    c.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="force (--thinking) or suppress (--no-thinking) DeepSeek-R1's <think> opening; "
                        "default: as the chat template does")
    c.set_defaults(func=run)


def fitting_prompt(model, system: list[dict], history: list[dict], budget: int, thinking) -> list[int]:
    """The prompt of the conversation, its oldest turns dropped (in place) until it fits `budget`
    tokens; ValueError if the last message alone does not fit."""
    while True:
        prompt = chat_prompt(model, system + history, thinking=thinking)
        if len(prompt) <= budget:
            return prompt
        if len(history) <= 1:
            raise ValueError(f"the message is {len(prompt)} tokens with the template; the model was loaded for "
                             f"{budget} plus the reply (--max-context, --max-new-tokens)")
        dropped = 2 if history[0]["role"] == "user" and len(history) > 2 else 1
        del history[:dropped]
        print(f"(the conversation outgrew the context: dropped its oldest turn{'s' if dropped > 1 else ''})",
              file=sys.stderr)


def run(args) -> int:
    check_model_args(args)
    check_sampling_args(args)
    model = load_model(args)
    budget = min(model.placement.max_context, model.config.max_position_embeddings) - args.max_new_tokens
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
        try:
            prompt = fitting_prompt(model, system, history, budget, args.thinking)
        except ValueError as e:
            history.pop()
            print(f"ktjax: error: {e}", file=sys.stderr)
            continue
        reply = []
        for piece in stream(model, prompt, **sampling(args, model)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
