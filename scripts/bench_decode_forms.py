"""What `ktjax generate` gives a user in each decode form of an offloaded model: the embedded tiny model (or --model)
with its routed experts in host memory (--experts, under --gpu-memory), `ktjax.generate` of --tokens new tokens from
--batch prompts at once, greedy, twice per form and expert_compute mode: the first call (which compiles the decode
step's programs) and a second, warm one. The forms: "handoff" (a decode step launched whole, `handoff_step`), "fused"
and "streamed" (each MoE layer driven from Python, `moe_block`). Prints a table: first-token time, decode tokens/s
of each call (summed over the prompts), and whether each form's tokens are the first form's. The persistent
compilation cache is on, as `ktjax`'s commands have it (KTJAX_CACHE_DIR): a second run shows a user's first call once
the cache holds the programs.

    python3 scripts/bench_decode_forms.py [--experts int4] [--gpu-memory 160MiB] [--tokens 100]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

import ktjax
from ktjax.runtime.compilation_cache import enable_compilation_cache
from ktjax.runtime.offload.handoff_step import WITHOUT_GRAPHS

PROMPTS = ["The capital of France", "Once upon a time", "def main():", "The quick brown fox"]


def decode_rate(results) -> float:
    """Decode tokens/s of prompts generated together: the sum of theirs (their rows decode in the same steps)."""
    return sum(r.stats.decode_tokens_per_s for r in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--experts", default="int4", choices=("int8", "int4"))
    p.add_argument("--gpu-memory", default="160MiB", help="the budget: the embedded model's experts stay in host "
                                                          "memory under 160MiB")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--forms", nargs="+", default=["handoff", "fused", "streamed"])
    p.add_argument("--modes", nargs="+", default=["auto", "cpu"], help="expert_compute modes")
    p.add_argument("--batch", type=int, default=1, choices=range(1, len(PROMPTS) + 1),
                   help="prompts decoded together (rows of each step; the handoff form takes up to 4)")
    p.add_argument("--handoff-graphs", choices=("on", "off"), default=None,
                   help="XLA's CUDA graphs in the handoff form's programs (default: the executor's choice)")
    args = p.parse_args()
    enable_compilation_cache()
    model = ktjax.load(args.model, experts=args.experts, gpu_memory=args.gpu_memory, max_batch=args.batch,
                       max_context=512)
    if args.handoff_graphs is not None:  # made here, so that every form's executor shares these programs' settings
        model.executor.handoff_layers.compiler_options = None if args.handoff_graphs == "on" else WITHOUT_GRAPHS
    assert model.executor.plan.host_experts, "no routed expert in host memory: lower --gpu-memory"
    print(f"ktjax on {jax.devices()[0].device_kind}: {len(model.executor.plan.host_experts)} "
          f"{args.experts} experts in host memory, {args.batch} prompt(s), {args.tokens} new tokens each, greedy")
    print("| form | expert_compute | first token, first call | decode tok/s, first call | decode tok/s, warm "
          "| tokens as the first row's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    first_ids = None
    for mode in args.modes:
        for form in args.forms:
            ex = model.executor.with_expert_compute(mode).with_decode_form(form)
            m = dataclasses.replace(model, executor=ex)
            cold = ktjax.generate(m, PROMPTS[:args.batch], max_new_tokens=args.tokens)
            warm = ktjax.generate(m, PROMPTS[:args.batch], max_new_tokens=args.tokens)
            ids = [t for r in warm for t in r.token_ids]
            first_ids = first_ids or ids
            same = sum(a == b for a, b in zip(ids, first_ids)) / max(1, len(first_ids))
            print(f"| {form} | {mode} | {cold[0].stats.time_to_first_token_s:.2f} s | {decode_rate(cold):.1f} | "
                  f"{decode_rate(warm):.1f} | {100 * same:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
