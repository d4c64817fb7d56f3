#!/usr/bin/env python3
"""Fidelity of int8/int4 routed experts against the bf16 model, on both expert paths.

What it measures (issue 12, item 7):

1. Tiny random DeepSeek-V3 and V2 checkpoints written by transformers (tests/reference.py, on the
   CPU). Each is loaded by ktjax in bf16 (the baseline) and with its routed experts in int8 and
   int4, every expert in host memory and computed either on the device after the transfer
   (expert_compute="gpu": the device dequantizes) or on the host CPU (expert_compute="cpu": the
   numba kernels read the quantized bytes): two different pieces of code, both measured.
   Sequences: bf16's own greedy continuations (ktjax.generate) of random prompts. On them, every
   model runs one teacher-forced forward, and we report
     - logits error relative to the largest |logit| of the bf16 model, max and mean over every
       position and vocabulary entry;
     - greedy agreement: the fraction of generated positions where the model's argmax equals bf16's
       argmax of the same forward (teacher-forced on bf16's tokens, so one divergence does not
       cascade; positions after an end-of-sequence token are not counted).
   For scale, the same numbers for bf16 itself against transformers' float32 logits.
2. The embedded model (ktjax/models/tiny): held-out loss (mean next-token cross-entropy) of bf16, int8
   and int4 on the standard-library files scripts/train_tiny.py held out (every 50th file of the
   sorted list, never trained on; the same windows its training.json reports), and the relative
   increase over bf16 (with its standard error over windows, the loss differences paired on the
   same windows), against the targets: int8 within +0.5%, int4 within +3%. Beside it, per
   prediction, the mean KL divergence from bf16's distribution and top-1 agreement with bf16
   (teacher-forced on the text), which see changes a mean loss can average away. float32 is
   listed for scale: how far bf16 itself sits from full precision.

Writes a JSON file (default benchmarks/fidelity.json) and prints the tables as markdown.
CPU only; a few minutes on one core.

Examples:
  python scripts/fidelity.py                      # everything, the defaults benchmarks/fidelity.md reports
  python scripts/fidelity.py --windows 16         # a quicker held-out loss (4096 tokens)
  python scripts/fidelity.py --skip-embedded      # only the tiny transformers-built configs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # reference.py: the tiny transformers-built checkpoints
sys.path.insert(0, str(REPO / "scripts"))  # train_tiny.py: the embedded model's held-out split

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ktjax  # noqa: E402
from ktjax.api import default_model_path  # noqa: E402
from ktjax.experts import quant  # noqa: E402
from ktjax.train.loss import next_token_loss_from_logits  # noqa: E402

QUANTIZED = ("int8", "int4")
PATHS = ("gpu", "cpu")  # device dequantization after the transfer / host numba kernels
ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}  # every routed expert in host memory
TARGETS = {"int8": 0.005, "int4": 0.03}  # held-out loss increase over bf16, relative


# ---- measures -------------------------------------------------------------------------------

def logits_error(logits, reference) -> dict[str, float]:
    """Max and mean |logits - reference| relative to the reference's largest |logit|."""
    err = np.abs(np.asarray(logits, np.float64) - np.asarray(reference, np.float64))
    scale = float(np.abs(reference).max())
    return {"max_rel": float(err.max() / scale), "mean_rel": float(err.mean() / scale)}


def greedy_agreement(logits_BTV, reference_BTV, counted_BT) -> float:
    """Fraction of counted positions where both argmaxes agree."""
    same = np.argmax(logits_BTV, -1) == np.argmax(reference_BTV, -1)
    return float(same[counted_BT].mean())


def quantized_load(path, fmt: str, compute: str, host_activations: str = "float32", **kwargs):
    """A model whose routed experts are all in host memory in `fmt`, computed on `compute`'s path (the
    host CPU's exactly, unless host_activations says otherwise)."""
    return ktjax.load(path, experts=fmt, expert_compute=compute, placement=ALL_HOST,
                      host_activations=host_activations, **kwargs)


# ---- 1. tiny transformers-built configs ------------------------------------------------------

def greedy_sequences(model, prompts_BP: np.ndarray, new_tokens: int, eos: int | None):
    """bf16's greedy continuations as one [B, P + new_tokens] array, and the mask of positions whose
    *next* token was generated (the predictions that count); rows that stopped at eos are padded."""
    B, P = prompts_BP.shape
    results = ktjax.generate(model, prompts_BP.tolist(), max_new_tokens=new_tokens)
    tokens = np.zeros((B, P + new_tokens), np.int32)
    counted = np.zeros((B, P + new_tokens), bool)
    tokens[:, :P] = prompts_BP
    for b, r in enumerate(results):
        ids = list(r.token_ids)[:new_tokens]
        tokens[b, P:P + len(ids)] = ids
        counted[b, P - 1:P - 1 + len(ids)] = True  # logits at t predict token t + 1
        if len(ids) < new_tokens and eos is not None:
            tokens[b, P + len(ids):] = eos
    return tokens, counted


def routing_changes(torch_model, tokens_BT: np.ndarray, fmt: str) -> dict:
    """Where the quantization error comes from, seen in the reference implementation alone: transformers
    (float32) with its routed experts quantized and dequantized by ktjax's numpy quantizer (tests/
    test_fidelity.py checks ktjax computes exactly that model) against the original weights. Which
    positions choose a different expert set in some MoE layer, and the logits error (per position,
    max over the vocabulary, relative to the largest |logit|) on positions whose routing held and
    on those where it changed."""
    import torch
    from reference import reference_logits

    def run(model):
        chosen = {}
        hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out, k=k: chosen.__setitem__(k, out[-1]))
                 for k, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
        logits = reference_logits(model, tokens_BT)
        for h in hooks:
            h.remove()
        sets_LBTK = np.stack([np.sort(chosen[k].numpy().reshape(*tokens_BT.shape, -1), -1) for k in sorted(chosen)])
        return logits, sets_LBTK

    ref, ref_sets = run(torch_model)
    quantized = copy.deepcopy(torch_model)
    with torch.no_grad():
        for layer in quantized.model.layers:
            if hasattr(layer.mlp, "gate"):
                for stacked in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    for e in range(stacked.shape[0]):
                        w = stacked[e].numpy()
                        stacked[e] = torch.from_numpy(quant.dequantize(quant.quantize(w, fmt), fmt, w.shape[1]))
    logits, sets = run(quantized)
    changed_BT = (sets != ref_sets).any(-1).any(0)
    err_BT = np.abs(logits - ref).max(-1) / np.abs(ref).max()
    held = err_BT[~changed_BT]
    moved = err_BT[changed_BT]
    return dict(positions_with_routing_change=float(changed_BT.mean()),
                err_where_routing_held_mean=float(held.mean()), err_where_routing_held_max=float(held.max()),
                err_where_routing_changed_mean=float(moved.mean()) if moved.size else None,
                err_where_routing_changed_max=float(moved.max()) if moved.size else None)


def tiny_config_rows(kind: str, args, workdir: str) -> list[dict]:
    from reference import make_reference, reference_logits, save_reference

    torch_model = make_reference(kind, seed=args.seed)
    path = save_reference(torch_model, os.path.join(workdir, kind))
    vocab = torch_model.config.vocab_size
    eos = torch_model.config.eos_token_id
    sizes = dict(max_batch=args.prompts, max_context=args.prompt_len + args.new_tokens + 8)

    bf16 = ktjax.load(path, dtype="bfloat16", **sizes)
    # Prompts avoid the special ids 0 and 1 (bos/eos of these configs).
    prompts = np.random.default_rng(args.seed).integers(2, vocab, (args.prompts, args.prompt_len))
    tokens, counted = greedy_sequences(bf16, prompts, args.new_tokens, eos)
    ref = np.asarray(ktjax.logits(bf16, tokens))
    del bf16
    common = dict(config=f"tiny {kind.upper()}", tokens=int(tokens.size), counted_positions=int(counted.sum()))

    float32 = reference_logits(torch_model, tokens)
    rows = [dict(common, experts="bf16 vs float32 (transformers)", path="-", **logits_error(ref, float32),
                 greedy_agreement=greedy_agreement(ref, float32, counted))]
    for fmt in QUANTIZED:
        for compute in PATHS:
            t = time.time()
            model = quantized_load(path, fmt, compute, dtype="bfloat16", **sizes)
            out = np.asarray(ktjax.logits(model, tokens))
            rows.append(dict(common, experts=fmt, path=compute, **logits_error(out, ref),
                             greedy_agreement=greedy_agreement(out, ref, counted),
                             seconds=round(time.time() - t, 1)))
            print(f"  {kind} {fmt} {compute}: max {rows[-1]['max_rel']:.2e} mean {rows[-1]['mean_rel']:.2e} "
                  f"agreement {rows[-1]['greedy_agreement']:.4f}", flush=True)
        rows.append(dict(common, experts=fmt, path="routing (transformers, float32)",
                         **routing_changes(torch_model, tokens, fmt)))
    return rows


# ---- 2. the embedded model's held-out loss ------------------------------------------------

def held_out_windows(model_dir: Path, n_windows: int, seq_len: int) -> tuple[np.ndarray, dict]:
    """The held-out standard-library windows of scripts/train_tiny.py (its split, its tokenizer)."""
    from tokenizers import Tokenizer
    from train_tiny import read_texts, stdlib_files, token_stream, windows

    root, files = stdlib_files()
    held_out = [f for i, f in enumerate(files) if i % 50 == 25]  # train_tiny.py's split
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = token_stream(tok, read_texts(held_out))
    wins = windows(stream, seq_len, n_windows)
    info = dict(source=f"{root}: every 50th *.py file (i % 50 == 25), as scripts/train_tiny.py holds out",
                python=platform.python_version(), held_out_files=len(held_out), windows=len(wins),
                seq_len=seq_len, predicted_tokens=int(len(wins) * (seq_len - 1)))
    trained = model_dir / "training.json"
    if trained.exists():
        record = json.loads(trained.read_text())
        info["training_python"] = record.get("python")
        info["training_reported_bf16_loss"] = record.get("final_losses", {}).get("held_out_stdlib")
    return wins, info


def window_losses(logits_BTV, tokens_BT) -> np.ndarray:
    """Mean next-token cross-entropy (nats) of each window."""
    per_window = jax.vmap(lambda lg, t: next_token_loss_from_logits(lg[None], t[None]))
    return np.asarray(per_window(jnp.asarray(logits_BTV), jnp.asarray(tokens_BT)))


def divergence(logits_BTV, reference_BTV) -> tuple[float, float]:
    """Mean KL(reference || model) per prediction (nats), and top-1 agreement with the reference."""
    logp, ref_logp = (jax.nn.log_softmax(jnp.asarray(a[:, :-1], jnp.float32), -1) for a in (logits_BTV, reference_BTV))
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), -1)
    agree = jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1)
    return float(jnp.mean(kl)), float(jnp.mean(agree))


def embedded_rows(args) -> tuple[list[dict], dict]:
    model_dir = Path(default_model_path())
    wins, info = held_out_windows(model_dir, args.windows, args.seq_len)
    batch = min(args.batch, len(wins))
    sizes = dict(max_batch=batch, max_context=args.seq_len)
    batches = [wins[i:i + batch] for i in range(0, len(wins), batch)]
    rows, reference = [], None  # reference: bf16's logits per batch, once measured

    def measure(label: str, compute: str, model) -> None:
        nonlocal reference
        t = time.time()
        logits = [np.asarray(ktjax.logits(model, b)) for b in batches]
        losses = np.concatenate([window_losses(lg, b) for lg, b in zip(logits, batches)])
        row = dict(experts=label, path=compute, loss=float(losses.mean()), window_losses=losses.round(6).tolist())
        if label == "bf16":
            reference = logits
        if reference is not None and label != "bf16":
            kl, agree = zip(*(divergence(lg, ref) for lg, ref in zip(logits, reference)))
            per_batch = [len(b) for b in batches]
            row.update(kl_from_bf16=float(np.average(kl, weights=per_batch)),
                       top1_agreement_with_bf16=float(np.average(agree, weights=per_batch)))
        row["seconds"] = round(time.time() - t, 1)
        rows.append(row)
        print(f"  embedded {label} {compute}: held-out loss {row['loss']:.4f}", flush=True)

    measure("bf16", "-", ktjax.load(None, dtype="bfloat16", **sizes))
    measure("float32", "-", ktjax.load(None, dtype="float32", **sizes))
    for fmt in QUANTIZED:
        for compute in PATHS:
            measure(fmt, compute, quantized_load(None, fmt, compute, dtype="bfloat16", **sizes))
    # On the host CPU with int8 activations (host_activations="int8", the default: integer dot products)
    for fmt in QUANTIZED:
        measure(fmt, "cpu, int8 activations",
                quantized_load(None, fmt, "cpu", dtype="bfloat16", host_activations="int8", **sizes))
    base = np.asarray(rows[0]["window_losses"])
    for r in rows:
        diff = np.asarray(r["window_losses"]) - base  # paired: the same windows
        r["increase_over_bf16"] = r["loss"] / rows[0]["loss"] - 1
        # Windows are the independent units (tokens within one are correlated).
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        r["increase_standard_error"] = float(se / rows[0]["loss"])
        if r["experts"] in TARGETS:
            r["target"] = TARGETS[r["experts"]]
            r["meets_target"] = bool(r["increase_over_bf16"] <= TARGETS[r["experts"]])
    return rows, info


# ---- report -------------------------------------------------------------------------------

def markdown(tiny: list[dict], embedded: list[dict], info: dict | None) -> str:
    lines = []
    if tiny:
        lines += ["| config | experts | path | max logits error | mean logits error | greedy agreement |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in tiny if "max_rel" in r):
            lines.append(f"| {r['config']} | {r['experts']} | {r['path']} | {r['max_rel']:.2e} | {r['mean_rel']:.2e} "
                         f"| {r['greedy_agreement']:.4f} ({r['counted_positions']} positions) |")
        lines += ["", "Where the error comes from (transformers, float32, experts quantized by ktjax.experts.quant; "
                  "per-position max logits error relative to the largest |logit|):", "",
                  "| config | experts | positions whose routing changed | error where routing held: mean / max "
                  "| where it changed: mean / max |", "| --- | --- | --- | --- | --- |"]
        for r in (r for r in tiny if "positions_with_routing_change" in r):
            moved = (f"{r['err_where_routing_changed_mean']:.2e} / {r['err_where_routing_changed_max']:.2e}"
                     if r["err_where_routing_changed_mean"] is not None else "-")
            lines.append(f"| {r['config']} | {r['experts']} | {r['positions_with_routing_change']:.4f} "
                         f"| {r['err_where_routing_held_mean']:.2e} / {r['err_where_routing_held_max']:.2e} | {moved} |")
        lines.append("")
    if embedded:
        lines += [f"Held-out loss, embedded model, {info['windows']} windows x {info['seq_len']} tokens "
                  f"({info['predicted_tokens']} predictions):", "",
                  "| experts | path | held-out loss (nats) | vs bf16 (± s.e.) | target | met | KL from bf16 (nats) "
                  "| top-1 = bf16's |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in embedded:
            target = f"<= +{100 * r['target']:.1f}%" if "target" in r else "-"
            met = ("yes" if r["meets_target"] else "**no**") if "target" in r else "-"
            se = f" ± {100 * r['increase_standard_error']:.3f}%" if r["increase_standard_error"] > 0 else ""
            kl = f"{r['kl_from_bf16']:.2e}" if "kl_from_bf16" in r else "-"
            top1 = f"{r['top1_agreement_with_bf16']:.4f}" if "top1_agreement_with_bf16" in r else "-"
            lines.append(f"| {r['experts']} | {r['path']} | {r['loss']:.4f} | {100 * r['increase_over_bf16']:+.3f}%{se} "
                         f"| {target} | {met} | {kl} | {top1} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "fidelity.json",
                   help="where the JSON results go (default: benchmarks/fidelity.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny configs' weights and prompts (default: 0)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per tiny config (default: 32)")
    p.add_argument("--prompt-len", type=int, default=8, help="tokens per random prompt (default: 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens bf16 generates per prompt (default: 32)")
    p.add_argument("--windows", type=int, default=64,
                   help="held-out windows for the embedded model's loss (default: 64, train_tiny.py's count)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out window (default: 256)")
    p.add_argument("--batch", type=int, default=16, help="windows per forward (default: 16)")
    p.add_argument("--skip-tiny", action="store_true", help="skip the transformers-built configs")
    p.add_argument("--skip-embedded", action="store_true", help="skip the embedded model's held-out loss")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Python {platform.python_version()}", flush=True)
    tiny, embedded, info = [], [], None
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory(prefix="ktjax_fidelity_") as workdir:
            for kind in ("v3", "v2"):
                tiny += tiny_config_rows(kind, args, workdir)
    if not args.skip_embedded:
        embedded, info = embedded_rows(args)
    result = dict(command="python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
                  jax=jax.__version__, device=jax.devices()[0].platform, python=platform.python_version(),
                  seconds=round(time.time() - t0, 1), targets=TARGETS, args={k: str(v) for k, v in vars(args).items()},
                  tiny_configs=tiny, embedded=dict(held_out=info, rows=embedded) if embedded else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{markdown(tiny, embedded, info)}\n\nwrote {args.out} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
