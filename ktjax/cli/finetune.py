"""`ktjax finetune`: LoRA fine-tuning from the command line."""

from __future__ import annotations

import argparse
import os
import sys

from ktjax.api import finetune
from ktjax.cli.common import distributed_args, join_cluster, new_output_dir
from ktjax.experts.weights import FORMATS
from ktjax.lora.config import DEFAULT_TARGETS
from ktjax.runtime.placement import parse_size
from ktjax.train import distributed


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="LoRA-fine-tune a model on a JSONL file and write a PEFT adapter",
        description="LoRA fine-tuning with Optax. Data: one JSON object per line, {\"messages\": [...]} (chat "
        "template; loss on the assistant turns), {\"prompt\": ..., \"completion\": ...} or {\"text\": ...}. Writes "
        "adapter_model.safetensors + adapter_config.json (PEFT format) to --output, with resumable checkpoints "
        "under OUTPUT/checkpoints.")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="base checkpoint directory (transformers format); default: the embedded tiny model")
    p.add_argument("--data", metavar="FILE", required=True, help="training data (JSONL)")
    p.add_argument("--output", metavar="DIR", required=True, help="adapter and checkpoint directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the base weights (default: the checkpoint's)")
    p.add_argument("--experts", choices=FORMATS, default=None,
                   help="the format routed experts are kept in (default: the checkpoint's); training streams "
                        "them to the GPU and computes them there, whatever the format (the host-CPU path has "
                        "no backward)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated modules to adapt: attention projection names, gate_proj/up_proj/down_proj, "
                        "dense_mlp, shared_experts, experts (routed), attention, all (default: the attention "
                        "projections)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="sequences per micro-batch, over all devices (default 4; a multiple of --devices)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1); with experts in host memory they share "
                   "each expert transfer, so more tokens per step cost little extra time")
    p.add_argument("--seq-len", type=int, default=1024, help="longest sequence; longer examples are cut (default 1024)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 10%% of steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this global norm; 0: off")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and dropout (default 0)")
    p.add_argument("--eval-data", metavar="FILE", default=None, help="held-out data (JSONL)")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of --data when --eval-data is not given (default 0)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default steps/5)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--log-every", type=int, default=10,
                   help="when standard error is not a terminal (no progress bar), a log line every N steps (default 10)")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="device memory budget, e.g. 24GiB")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="train data-parallel on N devices, each micro-batch's rows split over them: the same "
                        "updates as one device (default: 1; with --coordinator, every device of every process); "
                        "needs every parameter on the device")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if OUTPUT/checkpoints has a checkpoint")
    p.add_argument("--keep-reasoning", action="store_true",
                   help="train on the reasoning (reasoning_content) of assistant messages too")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="the chat template's thinking setting, as you will chat with the model (see ktjax chat)")
    distributed_args(p)
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Bad options fail in one line naming the option, before the model loads."""
    if args.model is not None and not os.path.isdir(os.path.expanduser(args.model)):
        raise ValueError(f"--model {args.model}: no such checkpoint directory")
    for option, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise ValueError(f"{option} {path}: no such file")
    at_least = {"rank": 1, "steps": 1, "devices": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 2, "save_every": 1, "log_every": 1,
                "eval_every": 1, "warmup": 0, "weight_decay": 0, "max_grad_norm": 0}
    for name, low in at_least.items():
        v = getattr(args, name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not args.alpha > 0:
        raise ValueError(f"--alpha must be positive, got {args.alpha}")
    for name in ("dropout", "eval_fraction"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.gpu_memory is not None:
        parse_size(args.gpu_memory)


def run(args) -> int:
    check_args(args)
    output = new_output_dir(args.output)
    join_cluster(args)
    r = finetune(args.model, args.data, output=output, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                 lr=args.lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                 grad_accum=args.grad_accum, warmup=args.warmup, targets=args.targets, seed=args.seed,
                 gpu_memory=args.gpu_memory, experts=args.experts, resume=args.resume, dtype=args.dtype, eval_data=args.eval_data,
                 eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every,
                 max_grad_norm=args.max_grad_norm or None, weight_decay=args.weight_decay,
                 keep_reasoning=args.keep_reasoning, thinking=args.thinking, log_every=args.log_every,
                 devices=args.devices)
    if not distributed.is_primary():  # process 0 speaks for the run
        return 0
    msg = f"adapter written to {r.output} ({r.steps} steps"
    if r.train_loss is not None:
        msg += f", train loss {r.train_loss:.4f}"
    if r.eval_loss is not None:
        msg += f", held-out loss {r.eval_loss:.4f}"
    print(msg + f", {r.seconds:.0f} s)", file=sys.stderr)
    return 0
