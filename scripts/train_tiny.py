#!/usr/bin/env python3
"""Train ktjax's embedded default model: a tiny DeepSeek-V3-architecture MoE on Python source.

The model has DeepSeek-V3's architecture at toy size: MLA attention with a q LoRA, sigmoid
`noaux_tc` group-limited routing with a shared expert and a correction bias balanced the
auxiliary-loss-free way, and one dense layer first. It learns from the `*.py` files of the
running Python's standard library (every machine has them; test folders excluded, files in
sorted order), with its own byte-level BPE tokenizer made with `tokenizers`, and is written in
the on-disk format of real checkpoints (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), so `ktjax.load(out)` reads it.

Examples:
  python scripts/train_tiny.py --state-dir /tmp/tiny_state       # the shipped model, into ktjax/models/tiny/
                                     # (about 75 minutes on 2 CPU cores; about a minute on one H200;
                                     #  rerun the same command to resume a killed run exactly)
  python scripts/train_tiny.py --steps 200 --out /tmp/tiny       # a quick run
  python scripts/train_tiny.py --time-budget 180                 # fit the step count into ~3 minutes
  python scripts/train_tiny.py --smoke --out /tmp/smoke          # a seconds-long check on the CPU

Held-out losses are reported on 2% of the standard-library files (never trained on) and on
ktjax's own source code (not Python's), which the test suite also uses. The best model by the
held-out standard-library loss is what gets saved. The standard library is small (~2.7 M tokens):
past a few epochs the model memorises it, so the defaults stop at ~2.4 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ktjax
import ktjax.kernels
import ktjax.models
from ktjax.config import ModelConfig
from ktjax.io.save import save_params
from ktjax.models import DeepseekForCausalLM
from ktjax.models.deepseek import positions
from ktjax.models.moe import combine
from ktjax.models.rope import cos_sin
from ktjax.runtime.offload.segments import attend_fresh
from ktjax.train.loss import cast_params, float32_leaves, next_token_loss, next_token_loss_from_logits

REPO = Path(__file__).resolve().parent.parent

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4, in this order
THINK_TOKENS = ["<think>", "</think>"]  # added (not special), as in DeepSeek-R1

# A DeepSeek-V3-style chat format: bos, optional system text, <｜User｜>...<｜Assistant｜>...eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ message['content'] }}" + EOS + ""
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)

# Folders of the standard library left out: tests, generated data (pydoc topics, codec tables),
# and installed third-party packages.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "pydoc_data", "encodings", "site-packages", "dist-packages",
                 "__pycache__"}


# ---- data ----------------------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not any(part in EXCLUDED_DIRS for part in p.relative_to(root).parts[:-1])]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass  # the odd Latin-1 or unreadable file: skipped, deterministically
    return texts


def ktjax_source_files() -> list[Path]:
    """ktjax's own Python source (runtime, models, kernels): code the model never trains on."""
    dirs = [Path(ktjax.models.__file__).parent.parent / "ktjax", Path(ktjax.models.__file__).parent,
            Path(ktjax.kernels.__file__).parent]
    return sorted({p for d in dirs if d.is_dir() for p in d.glob("*.py")})


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS), min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    # Like DeepSeek's tokenizers: encoding with special tokens prepends bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """bos + text + eos per file, concatenated."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out += [bos, *enc.ids, eos]
    return np.asarray(out, np.int32)


def windows(stream: np.ndarray, length: int, limit: int) -> np.ndarray:
    n = min(limit, len(stream) // length)
    return stream[: n * length].reshape(n, length)


def write_tokenizer_files(tok, out: Path, cfg: ModelConfig) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        added[str(tok.token_to_id(t))] = dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                              single_word=False, special=t in SPECIAL_TOKENS)
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(PAD),
        # A model this small repeats itself under greedy decoding: sample by default.
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 40,
    }
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")


# ---- model ---------------------------------------------------------------------------------

def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_shared_experts=1,
        moe_intermediate_size=args.moe_intermediate_size,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        n_group=args.groups,
        topk_group=args.topk_groups,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_theta=10000.0,
        rope_scaling=None,
        rope_interleave=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=args.max_position_embeddings,
        num_nextn_predict_layers=0,
        bos_token_id=0,
        eos_token_id=1,
        hidden_act="silu",
    ))


def sample(model, tok, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> str:
    """A minimal preview sampler over `ktjax.logits` (fixed buffer length: one compilation)."""
    ids = tok.encode(prompt).ids  # bos + prompt
    length = -(-(len(ids) + max_new_tokens) // 64) * 64
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(ids)] = ids
    n, key, eos, new = len(ids), jax.random.key(seed), tok.token_to_id(EOS), []
    for _ in range(max_new_tokens):
        row = np.asarray(ktjax.logits(model, buf)[0, n - 1])
        if temperature <= 0:
            nxt = int(np.argmax(row))
        else:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, jnp.asarray(row) / temperature))
        if nxt == eos:
            break
        buf[0, n] = nxt
        n += 1
        new.append(nxt)
    return prompt + tok.decode(new, skip_special_tokens=False)


# ---- training ------------------------------------------------------------------------------

def forward_with_loads(module: DeepseekForCausalLM, tokens_BT):
    """Logits [B, T, V] of a chunk from position 0 and each MoE layer's expert loads [L, E] (the
    fraction of token-expert assignments each expert got): the model's own forward, run layer by
    layer through the decoder's phases so the routing can be read on the way (DeepSeek-V3's
    auxiliary-loss-free balancing steers the routing bias with it)."""
    cfg = module.cfg
    B, T = tokens_BT.shape
    rope = cos_sin(cfg, positions(jnp.zeros((B,), jnp.int32), T))
    x_BTD = module.embed(tokens_BT)
    loads = []
    for group, first, count in cfg.layer_runs:
        graphdef, state = nnx.split(module.layers(group))
        for j in range(first, first + count):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
            x_BTD = attend_fresh(layer, x_BTD, rope)
            h_ND = layer.mlp_in(x_BTD)
            if group == "moe":
                weights_NK, idx_NK = layer.mlp.route(h_ND)
                loads.append(jnp.zeros((cfg.n_routed_experts,), jnp.float32).at[idx_NK.reshape(-1)].add(1.0)
                             / idx_NK.size)
                y_ND = combine(x_BTD.reshape(h_ND.shape), layer.mlp.shared(h_ND), layer.mlp.routed(h_ND, weights_NK, idx_NK))
            else:
                y_ND = x_BTD.reshape(h_ND.shape) + layer.mlp(h_ND)
            x_BTD = y_ND.reshape(x_BTD.shape)
    return module.head(x_BTD), (jnp.stack(loads) if loads else None)


def save_train_state(file: Path, params, opt_state, rng, step, total, history, best, seconds) -> None:
    """Everything needed to continue a run (float32 weights, AdamW moments, batch RNG, step)."""
    arrays = {"p/" + "/".join(k): np.asarray(v) for k, v in params.items()}
    arrays.update({f"o/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
    meta = dict(step=step, total=total, history=history, best=list(best), rng=rng.bit_generator.state,
                train_seconds=seconds)
    tmp = file.with_suffix(".tmp.npz")
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), **arrays)
    os.replace(tmp, file)


def load_train_state(file: Path, params, opt_state):
    with np.load(file) as z:
        meta = json.loads(str(z["meta"]))
        params = {k: jnp.asarray(z["p/" + "/".join(k)]) for k in params}
        leaves, treedef = jax.tree.flatten(opt_state)
        opt_state = jax.tree.unflatten(treedef, [jnp.asarray(z[f"o/{i}"]) for i in range(len(leaves))])
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    return (params, opt_state, rng, meta["step"], meta["total"], meta["history"], tuple(meta["best"]),
            meta.get("train_seconds", 0.0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=REPO / "ktjax" / "models" / "tiny",
                   help="output directory (default: ktjax/models/tiny/)")
    g.add_argument("--steps", type=int, default=1600, help="optimizer steps (default: 1600)")
    g.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds of training at most: after timing the first steps, the step count (and the "
                        "cosine schedule) is cut to fit; 0 = no limit (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order (default: 0)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    g.add_argument("--eval-every", type=int, default=250,
                   help="steps between held-out evaluations; the best model so far is saved (default: 250)")
    g.add_argument("--state-dir", type=Path, default=None,
                   help="keep a resumable training state here at each evaluation, and resume from it if present")
    g.add_argument("--max-files", type=int, default=0, help="use only the first N stdlib files (0 = all; for tests)")
    g.add_argument("--smoke", action="store_true",
                   help="a seconds-long end-to-end check: tiny model, 60 files, 30 steps (overrides sizes)")
    g = p.add_argument_group("optimizer (AdamW, linear warmup then cosine decay)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default: 0.1)")
    g.add_argument("--warmup", type=int, default=100, help="warmup steps (default: 100)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay of matrices (default: 0.1)")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default: 1.0)")
    g.add_argument("--balance-rate", type=float, default=1e-3,
                   help="step of the routing-bias update (auxiliary-loss-free balancing; default: 1e-3)")
    g.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="activation/matmul dtype; master weights stay float32 (default auto: bfloat16 on "
                        "GPUs, float32 on CPUs, where XLA's bfloat16 matmuls are slow)")
    g.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the saved weights (the router stays float32; default: bfloat16)")
    g.add_argument("--sorted-experts", action="store_true",
                   help="train with the model's sorted (ragged_dot) expert path instead of dense dispatch")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. special tokens (default: 4096)")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4, help="decoder layers; the first is dense (default: 4)")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=512, help="dense MLP width (default: 512)")
    g.add_argument("--q-lora-rank", type=int, default=128)
    g.add_argument("--kv-lora-rank", type=int, default=64)
    g.add_argument("--qk-nope-head-dim", type=int, default=32)
    g.add_argument("--qk-rope-head-dim", type=int, default=16)
    g.add_argument("--v-head-dim", type=int, default=32)
    g.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default: 16)")
    g.add_argument("--top-k", type=int, default=4, help="routed experts per token (default: 4)")
    g.add_argument("--groups", type=int, default=4, help="expert groups, n_group (default: 4)")
    g.add_argument("--topk-groups", type=int, default=2, help="groups kept per token, topk_group (default: 2)")
    g.add_argument("--moe-intermediate-size", type=int, default=96, help="width of each expert (default: 96)")
    g.add_argument("--max-position-embeddings", type=int, default=2048)
    g = p.add_argument_group("preview")
    g.add_argument("--prompt", default="def fibonacci(n):", help="preview prompt (default: 'def fibonacci(n):')")
    g.add_argument("--preview-tokens", type=int, default=80, help="tokens per preview sample (0 = no preview)")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_files, args.steps, args.batch_size, args.seq_len, args.eval_every = 60, 30, 4, 128, 15
        args.vocab_size, args.hidden_size, args.intermediate_size, args.experts = 1024, 64, 128, 8
        args.moe_intermediate_size, args.q_lora_rank, args.kv_lora_rank, args.warmup = 32, 32, 32, 5
        args.preview_tokens = min(args.preview_tokens, 16)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"Python {platform.python_version()}", flush=True)

    # Data: stdlib files in sorted order; every 50th file is held out.
    root, files = stdlib_files()
    if args.max_files:
        files = files[: args.max_files]
    train_files = [f for i, f in enumerate(files) if i % 50 != 25]
    val_files = [f for i, f in enumerate(files) if i % 50 == 25]
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_stream = token_stream(tok, train_texts)
    val_stream = token_stream(tok, val_texts)
    src_stream = token_stream(tok, read_texts(ktjax_source_files()))
    T = args.seq_len
    val_windows = windows(val_stream, T, 64)
    src_windows = windows(src_stream, T, 64)
    n_chars = sum(map(len, train_texts))
    print(f"data: {root}: {len(train_texts)} training files ({n_chars / 1e6:.1f} M chars, {len(train_stream) / 1e6:.2f} M "
          f"tokens, {n_chars / len(train_stream):.2f} chars/token), {len(val_texts)} held-out files "
          f"({len(val_windows)} windows), ktjax source {len(src_stream)} tokens ({len(src_windows)} windows); "
          f"tokenizer {tok.get_vocab_size()} tokens in {time.time() - t_start:.1f} s", flush=True)

    cfg = model_config(args, max(args.vocab_size, tok.get_vocab_size()))
    # Reference attention (the Pallas kernels have no backward pass); dense expert dispatch unless asked.
    module = DeepseekForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed), attention="reference",
                                 dispatch="sorted" if args.sorted_experts else "dense")
    graphdef, state = nnx.split(module)
    template = dict(nnx.to_flat_state(state))
    n_params = sum(int(np.prod(v.shape)) for v in template.values())
    print(f"model: {n_params / 1e6:.2f} M parameters, layers {cfg.layer_kinds}", flush=True)

    def to_state(arrays):
        return nnx.from_flat_state([(p, template[p].replace(a)) for p, a in arrays.items()])

    keep32 = float32_leaves(cfg)
    if args.compute_dtype == "auto":
        args.compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    compute_dtype = jnp.dtype(args.compute_dtype)

    def compute_module(arrays):
        params = to_state(arrays)
        if compute_dtype != jnp.float32:
            params = cast_params(params, compute_dtype, keep32)
        return nnx.merge(graphdef, params)

    params = {p: v[...] for p, v in template.items()}
    bias_key = ("moe_layers", "mlp", "gate", "e_score_correction_bias")
    decay = {p: not any("norm" in part for part in p) and p[-1] not in ("bias", "e_score_correction_bias")
             for p in params}
    # AdamW at unit rate; the scheduled learning rate multiplies its updates (decay included, as in AdamW).
    tx = optax.chain(optax.clip_by_global_norm(args.clip),
                     optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=args.weight_decay, mask=decay))
    opt_state = tx.init(params)

    def loss_fn(params, tokens_BT):
        logits_BTV, loads = forward_with_loads(compute_module(params), tokens_BT)
        return next_token_loss_from_logits(logits_BTV, tokens_BT), loads

    @jax.jit
    def train_step(params, opt_state, tokens_BT, lr):
        (loss, loads), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens_BT)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
        if loads is not None and bias_key in params:
            error = jnp.mean(loads, axis=-1, keepdims=True) - loads
            params[bias_key] = params[bias_key] + args.balance_rate * jnp.sign(error)
        imbalance = jnp.max(loads) * cfg.n_routed_experts if loads is not None else jnp.float32(1)
        return params, opt_state, loss, optax.global_norm(grads), imbalance

    @jax.jit
    def eval_step(params, tokens_BT):
        return next_token_loss(compute_module(params), tokens_BT)

    def evaluate(params, wins) -> float:
        if len(wins) == 0:
            return float("nan")
        bs = max(1, min(len(wins), args.batch_size))
        losses = [float(eval_step(params, wins[i:i + bs])) for i in range(0, len(wins) - bs + 1, bs)]
        return float(np.mean(losses))

    def save_model(params) -> None:
        save_params(cfg, to_state(params), out, dtype=args.save_dtype)
        write_tokenizer_files(tok, out, cfg)

    rng = np.random.default_rng(args.seed)

    def batch() -> np.ndarray:
        starts = rng.integers(0, len(train_stream) - T, size=args.batch_size)
        return train_stream[starts[:, None] + np.arange(T)[None, :]]

    total = args.steps
    history, best, step, compile_s, earlier_s = [], (float("inf"), -1), 0, None, 0.0
    state_file = args.state_dir / "train_state.npz" if args.state_dir else None
    if state_file is not None and state_file.exists():
        params, opt_state, rng, step, total, history, best, earlier_s = load_train_state(state_file, params, opt_state)
        print(f"resumed from {state_file} at step {step} of {total}", flush=True)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(total, args.warmup + 1),
                                                  args.lr * args.min_lr_ratio)
    t_train, timed_from, first = time.time(), None, step
    while step < total:
        params, opt_state, loss, gnorm, imb = train_step(params, opt_state, batch(), jnp.float32(schedule(step)))
        step += 1
        if compile_s is None:
            loss.block_until_ready()
            compile_s = time.time() - t_train
            print(f"compiled the train step in {compile_s:.1f} s; first loss {float(loss):.3f}", flush=True)
        if step == first + 5:
            loss.block_until_ready()
            timed_from = time.time()
        if args.time_budget and step == 25 and first == 0:
            loss.block_until_ready()
            per_step = (time.time() - timed_from) / 20
            fit = int(args.time_budget * 0.92 / per_step)
            if fit < total:
                total = max(fit, args.warmup + 50)
                schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, total,
                                                              args.lr * args.min_lr_ratio)
            print(f"{per_step * 1e3:.1f} ms/step: training {total} steps", flush=True)
        if step % 50 == 0 or step == total:
            print(f"step {step:5d}  loss {float(loss):.3f}  lr {float(schedule(step - 1)):.2e}  gnorm {float(gnorm):.2f}  "
                  f"max expert load {float(imb):.2f}x  {time.time() - t_train:.0f} s", flush=True)
            history.append(dict(step=step, loss=round(float(loss), 4)))
        if step % args.eval_every == 0 or step == total:
            val = evaluate(params, val_windows)
            src = evaluate(params, src_windows)
            if not history or history[-1]["step"] != step:
                history.append(dict(step=step, loss=round(float(loss), 4)))
            history[-1].update(val_loss=round(val, 4), ktjax_src_loss=round(src, 4))
            if not val >= best[0]:  # (a NaN, from too few held-out windows, also saves)
                best = (val, step)
                save_model(params)
            print(f"  held-out stdlib loss {val:.3f}  ktjax source loss {src:.3f}  (best {best[0]:.3f} at step {best[1]})",
                  flush=True)
            if state_file is not None:
                save_train_state(state_file, params, opt_state, rng, step, total, history, best,
                                 earlier_s + time.time() - t_train)
    train_s = earlier_s + time.time() - t_train  # across resumptions
    tokens_seen = step * args.batch_size * T

    # What ships is what was saved: reload it and report its numbers.
    model = ktjax.load(out, max_context=args.seq_len + args.preview_tokens + 64)
    eval_loaded = jax.jit(lambda p, t: next_token_loss(nnx.merge(model.executor.graphdef, p), t))
    final = {}
    for name, wins in (("held_out_stdlib", val_windows), ("ktjax_source", src_windows)):
        bs = max(1, min(len(wins), args.batch_size))
        final[name] = float(np.mean([float(eval_loaded(model.executor.params, wins[i:i + bs]))
                                     for i in range(0, len(wins) - bs + 1, bs)]))
    train_eval = windows(train_stream, T, 64)
    bs = max(1, min(len(train_eval), args.batch_size))
    final["train_stdlib"] = float(np.mean([float(eval_loaded(model.executor.params, train_eval[i:i + bs]))
                                           for i in range(0, len(train_eval) - bs + 1, bs)]))
    print(f"saved model (step {best[1]}, {model.dtype}): losses " +
          ", ".join(f"{k} {v:.3f}" for k, v in final.items()), flush=True)

    samples = {}
    if args.preview_tokens:
        for temp in (0.0, 0.7):
            text = sample(model, tok, args.prompt, args.preview_tokens, temperature=temp, seed=args.seed)
            samples[f"temperature_{temp}"] = text
            print(f"--- preview, temperature {temp} ---\n{text}\n---", flush=True)

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    summary = dict(
        command="python scripts/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
        jax=jax.__version__, device=jax.devices()[0].device_kind, python=platform.python_version(),
        stdlib=str(root), train_files=len(train_texts), held_out_files=len(val_texts),
        train_tokens=int(len(train_stream)), vocab_size=cfg.vocab_size, parameters=n_params,
        steps=step, saved_step=best[1], batch_size=args.batch_size, seq_len=T, tokens_seen=tokens_seen,
        epochs=round(tokens_seen / len(train_stream), 2), compile_seconds=round(compile_s or 0.0, 1),
        train_seconds=round(train_s, 1), final_losses={k: round(v, 4) for k, v in final.items()},
        history=history, samples=samples, args={k: str(v) for k, v in vars(args).items()},
    )
    with open(out / "training.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
