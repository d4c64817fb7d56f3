"""How well does a MoE layer's router, applied one layer early, name the experts that layer will choose? The
executor's lookahead (`moe_block.Lookahead`) fetches the next MoE layer's likeliest host experts from that
guess: the next layer's router on this layer's residual after attention.

Measured with transformers' implementation (torch, CPU) on a trained checkpoint (default: the embedded model,
ktjax/models/tiny) over held-out text (`fidelity.held_out_windows`): per pair of consecutive MoE layers and per
token, the share of the P likeliest guessed experts (by routing weight) that the next layer then chose.

    python scripts/probe_lookahead.py [--model DIR] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="a transformers-format DeepSeek checkpoint (default: the embedded model)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from fidelity import held_out_windows
    from ktjax.api import resolve_path

    model_dir = Path(resolve_path(args.model))
    windows, info = held_out_windows(model_dir, args.windows, 256)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    K, E = model.config.num_experts_per_tok, model.config.n_routed_experts
    moe = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
    residual, chosen, recording = {}, {}, [True]

    def keep_residual(i):  # the post-attention norm's input: the residual after attention
        def hook(module, inputs):
            if recording[0]:
                residual[i] = inputs[0].detach().clone()
        return hook

    def keep_choice(i):  # the router returns (logits, weights, expert ids)
        def hook(module, inputs, out):
            if recording[0]:
                chosen[i] = out[2].detach().reshape(-1, K).numpy()
        return hook

    for i in moe:
        layers[i].post_attention_layernorm.register_forward_pre_hook(keep_residual(i))
        layers[i].mlp.gate.register_forward_hook(keep_choice(i))
    hits: dict[tuple[int, int, int], list[float]] = {}
    with torch.no_grad():
        for w in windows:
            recording[0] = True
            model(torch.tensor(np.asarray(w)[None], dtype=torch.long))
            recording[0] = False  # the guesses below call the same modules
            for a, b in zip(moe, moe[1:]):
                nxt = layers[b]
                _, w_NK, idx_NK = nxt.mlp.gate(nxt.post_attention_layernorm(residual[a]))
                w_NK, idx_NK = w_NK.reshape(-1, K).numpy(), idx_NK.reshape(-1, K).numpy()
                likeliest = np.take_along_axis(idx_NK, np.argsort(-w_NK, axis=1), 1)
                for P in range(1, K + 1):
                    share = [len(set(g[:P]) & set(c)) / P for g, c in zip(likeliest, chosen[b])]
                    hits.setdefault((a, b, P), []).extend(share)
    rows = [{"layers": [a, b], "guessed": P, "chosen_share": float(np.mean(v))} for (a, b, P), v in hits.items()]
    print(f"{args.model or 'the embedded model'}: {E} routed experts, {K} chosen per token "
          f"(a random guess: {K / E:.2f}); "
          f"{sum(len(w) for w in windows)} held-out tokens")
    print("| layers | experts guessed | share the next layer chose |")
    print("| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['layers'][0]} -> {r['layers'][1]} | {r['guessed']} | {r['chosen_share']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model or "the embedded model (ktjax/models/tiny)", "held_out": info,
                       "experts": E, "per_token": K, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
