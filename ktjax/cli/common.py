"""What the `ktjax` commands share: model and sampling options, checked before anything loads."""

from __future__ import annotations

import argparse
import os
import sys

from ktjax.api import load
from ktjax.experts.host import ACTIVATIONS
from ktjax.experts.weights import FORMATS
from ktjax.runtime.offload.scheduler import MODES
from ktjax.runtime.placement import parse_size
from ktjax.train import distributed


def model_args(p: argparse.ArgumentParser, *, adapter: bool = True) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory in transformers format (config.json, *.safetensors, tokenizer "
                        "files); default: the embedded tiny Python model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the loaded weights (default: the checkpoint's; FP8 loads as bfloat16)")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None,
                   help="device memory budget, e.g. 24GiB: core parameters, KV cache and workspace stay on the "
                        "device, routed experts that do not fit live in pinned host memory (default: the GPU's own "
                        "limit; no limit on the CPU)")
    p.add_argument("--experts", choices=FORMATS, default=None,
                   help="format the routed experts are kept in (default: the checkpoint's own: fp8 for DeepSeek's "
                        "published weights); int8/int4 quantize while loading and can run on the host CPU")
    p.add_argument("--expert-compute", choices=MODES, default="auto",
                   help="where experts in host memory are computed: on the host CPU where they live (int8/int4), on "
                        "the GPU after streaming them over the link, or auto: per step, whichever the measured "
                        "rates favour (default auto)")
    p.add_argument("--host-activations", choices=ACTIVATIONS, default="int8",
                   help="what the host CPU multiplies int8/int4 experts by: int8, quantized per group of 32 as "
                        "llama.cpp's CPU kernels do (integer dot products: int4 experts 2-3x faster on the host, ~0.5%% "
                        "error per expert output; the default), or float32 (exact: the output then does not depend on "
                        "which path computed an expert)")
    p.add_argument("--max-context", type=int, default=4096, metavar="N",
                   help="the longest sequence (prompt plus new tokens) the KV cache is sized for (default 4096)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="the most sequences generated together (default: %(default)s)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="split the routed experts over the first N devices (expert parallelism; core parameters "
                        "and KV cache replicated on each; --gpu-memory is per device; default 1)")
    if adapter:
        p.add_argument("--adapter", metavar="DIR", default=None,
                       help="a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to apply")


def distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several hosts", "one process per host, each started with the same options but its "
                             "own --process-id (see docs/distributed.md)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="address where process 0 listens for the others (default: $JAX_COORDINATOR_ADDRESS; "
                        "neither: one process)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="how many processes (hosts) take part (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's number, 0..N-1; process 0 writes the output (default: $JAX_PROCESS_ID)")


def join_cluster(args) -> None:
    """Join the other processes (jax.distributed) when the options or the environment name a
    coordinator; before anything touches a device, which fixes the set of devices JAX sees."""
    distributed.initialize(distributed.cluster_from(args.coordinator, args.num_processes, args.process_id))


def sampling_args(p: argparse.ArgumentParser) -> None:
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


def check_model_args(args) -> None:
    """Bad options fail in one line before any weight is read."""
    model = None if args.model is None else os.path.expanduser(args.model)
    if model is not None and not os.path.isdir(model) and not (model.endswith(".gguf") and os.path.isfile(model)):
        raise ValueError(f"--model {args.model}: no such checkpoint directory (or .gguf file)")
    if args.gpu_memory is not None:
        parse_size(args.gpu_memory)
    for name in ("max_context", "max_batch", "devices"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_sampling_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")


def load_model(args):
    model = load(args.model, dtype=args.dtype, experts=args.experts, expert_compute=args.expert_compute,
                 gpu_memory=args.gpu_memory, max_context=args.max_context, max_batch=args.max_batch,
                 adapter=getattr(args, "adapter", None), devices=args.devices, host_activations=args.host_activations)
    if model.placement.offloaded:
        print(model.placement.table(), file=sys.stderr)
    return model


def sampling(args, model) -> dict:
    """Options given on the command line, else the checkpoint's recommended ones, else greedy."""
    chosen = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    defaults = model.generation_defaults
    settings = {k: v if v is not None else defaults.get(k, d) for (k, v), d in zip(chosen.items(), (0.0, 1.0, 0))}
    return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, **settings)


def new_output_dir(path: str, option: str = "--output") -> str:
    """An output directory that may exist as a directory, never as a file."""
    path = os.path.expanduser(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: exists and is not a directory")
    return path
