"""Generate completions for a JSONL file of prompts, a batch at a time, with a progress bar.

Each input line is {"prompt": "..."} (continued as text) or {"messages": [...]} (a conversation,
rendered with the model's chat template); other keys are copied to the output. Each output line
adds "completion", "completion_tokens" and "finish_reason" ("eos", "stop" or "length").

The model's compiled programs have static shapes (batch and prompt lengths in a few buckets), so
after the first batch of each shape every batch reuses them.

    python examples/batch_generate.py prompts.jsonl completions.jsonl                 # the embedded model
    python examples/batch_generate.py prompts.jsonl out.jsonl --model ~/DeepSeek-V2-Lite --batch-size 8 \\
        --max-new-tokens 256 --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

import ktjax
from ktjax.runtime.generation import chat_prompt


def read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
                raise ValueError(f'{path}:{n}: expected an object with "prompt" or "messages"')
            records.append(record)
    return records


def prompt_ids(model, record: dict) -> list[int]:
    if "messages" in record:
        return chat_prompt(model, record["messages"])
    return list(model.tokenizer.encode(record["prompt"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="JSONL file of prompts")
    p.add_argument("output", help="JSONL file to write the completions to")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--gpu-memory", default=None, help="device memory budget, e.g. 24GiB")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (may be given several times)")
    args = p.parse_args(argv)

    try:
        records = read_jsonl(args.input)
        model = ktjax.load(args.model, gpu_memory=args.gpu_memory, max_batch=args.batch_size,
                           max_context=args.max_context)
        with open(args.output, "w", encoding="utf-8") as out, tqdm(total=len(records), unit="prompt") as bar:
            for start in range(0, len(records), args.batch_size):
                batch = records[start:start + args.batch_size]
                prompts = [prompt_ids(model, r) for r in batch]
                # A short last batch is padded with copies, so it runs at the compiled batch size.
                prompts += prompts[-1:] * (args.batch_size - len(prompts))
                results = ktjax.generate(model, prompts,
                                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, seed=args.seed + start, stop=args.stop)
                for record, r in zip(batch, results):
                    out.write(json.dumps({**record, "completion": r.text, "completion_tokens": len(r.token_ids),
                                          "finish_reason": r.stats.finish_reason}, ensure_ascii=False) + "\n")
                bar.update(len(batch))
    except (ValueError, OSError) as e:
        print(f"batch_generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
