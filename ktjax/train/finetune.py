"""LoRA fine-tuning: `ktjax.finetune(...)`, read top to bottom like a training script: set up
(model, data, adapters, optimizer, resume), loop (step, log, evaluate, checkpoint), export.

The step itself belongs to the executor (`model.executor.trainer`): one jitted program for a
resident model (`ktjax.train.resident`), per-layer segments with experts streamed twice for an
offloaded one (`ktjax.train.offloaded`). Compute runs in the model's dtype, adapters and optimizer
state in float32. Checkpoints hold adapters, optimizer state, step and data position, and a
resumed run continues exactly as an uninterrupted one. Ctrl-C finishes the step under way (or the
checkpoint being written) and saves it; a second Ctrl-C stops at once, leaving the latest checkpoint
as it was (a step's inputs are donated to it, so the state before it is gone once it starts).

Several devices and hosts (`devices`, `mesh`; `ktjax.train.distributed`): data parallelism, each
micro-batch's rows split over the devices, the same updates as on one device with the same global
batch. Every process runs this function; process 0 writes the checkpoints and the adapter and speaks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.io.peft import save_adapter
from ktjax.lora.config import DEFAULT_TARGETS, LoRAConfig, resolve_sites
from ktjax.lora.modules import init_adapters
from ktjax.runtime.model import LoadedModel
from ktjax.runtime.placement import fmt_bytes, training_nbytes
from ktjax.train import data as data_lib
from ktjax.train import distributed
from ktjax.train.checkpoints import Checkpoints
from ktjax.train.config import TrainConfig, optimizer_init
from ktjax.train.progress import Reporter, StepBoundary

CHECKPOINTS = "checkpoints"
SUMMARY = "finetune_summary.json"


@dataclasses.dataclass
class FinetuneResult:
    output: str  # the PEFT adapter directory (adapter_model.safetensors, adapter_config.json)
    steps: int  # steps done in total
    start_step: int  # where this call started (non-zero when it resumed)
    train_loss: float | None  # mean loss over the last logged steps of this call
    eval_loss: float | None  # held-out loss at the end (None without a held-out set)
    tokens: int  # non-padding tokens trained on in total
    seconds: float  # wall time of this call
    history: list[dict]  # per-step metrics of the whole run
    adapters: dict = dataclasses.field(repr=False)
    lora: LoRAConfig | None = None


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a checkpoint holds: the state after `step` optimizer steps (replaced as a whole, so it
    is never half updated)."""

    adapters: Any
    opt_state: Any
    step: int
    tokens: int
    history: tuple


def finetune(model: LoadedModel | str | os.PathLike | None, data, *, output: str | os.PathLike, rank: int = 8,
             alpha: float = 16.0, dropout: float = 0.0, lr: float = 2e-4, steps: int = 1000, batch_size: int = 4,
             seq_len: int = 1024, grad_accum: int = 1, warmup: int | None = None,
             targets: Sequence[str] | str = DEFAULT_TARGETS, seed: int = 0, gpu_memory: str | int | None = None,
             experts: str | None = None, resume: bool = True, progress: bool | None = None, dtype: Any = None, eval_data=None,
             eval_fraction: float = 0.0, eval_every: int | None = None, save_every: int = 100,
             max_grad_norm: float | None = 1.0, weight_decay: float = 0.0, min_lr_ratio: float = 0.0,
             remat: bool = True, keep_reasoning: bool = False, log_every: int = 10,
             thinking: bool | None = None, callback: Callable[[dict], None] | None = None,
             load: Callable | None = None, devices: int | None = None,
             mesh: jax.sharding.Mesh | None = None) -> FinetuneResult:
    """LoRA-fine-tune a DeepSeek model on JSONL conversations and write a PEFT adapter to `output`.

    model: a loaded model, a checkpoint directory (loaded with dtype, gpu_memory, experts (their
        format, as `ktjax.load` takes it) and room for the training steps), or None for the embedded model.
    data: JSONL file ({"messages": [...]}, {"prompt", "completion"} or {"text"} per line; see
        ktjax.train.data) or a list of such dicts. eval_data / eval_fraction: the held-out set.
        keep_reasoning: train on the reasoning (`reasoning_content`) of assistant messages too;
        thinking: the chat template's thinking setting, as you will chat with it (`ktjax.chat`).
    rank, alpha, dropout, targets: the adapters (see ktjax.lora.config.resolve_sites for targets).
    steps, batch_size (rows per micro-batch), grad_accum (micro-batches per step), seq_len (longest
        example; longer ones are cut), lr (peak; linear warmup over `warmup` steps, then cosine).
    output: the adapter directory; checkpoints go to output/checkpoints every `save_every` steps,
        at the end and on Ctrl-C, and resume=True continues from the latest one.
    progress: a progress bar (default: when stderr is a terminal; else a log line every `log_every` steps).
    callback(metrics): called after every step (step, loss, grad_norm, lr, tokens, seconds, ...).
    load: the loader for a model given by path (`ktjax.load`).
    devices, mesh: data parallelism over the first `devices` devices, or over a mesh's `data` axis
        (default: one device; every device of every process once `jax.distributed` joined several).
        batch_size stays the global micro-batch (a multiple of the devices): the run makes the
        updates a one-device run makes. A resident model only (experts in host memory train on one device).
    """
    t_start = time.perf_counter()
    output = os.path.expanduser(os.fspath(output))
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"{output}: exists and is not a directory (the adapter and checkpoints go in a directory)")
    lcfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr, warmup=warmup,
                     min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                     remat=remat)
    for name, v in (("save_every", save_every), ("log_every", log_every), ("eval_every", eval_every or 1)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if devices is not None and mesh is not None:
        raise ValueError("give devices or mesh, not both")
    mesh = distributed.data_mesh(mesh if mesh is not None else devices)
    distributed.check_batch(batch_size, mesh)
    primary = distributed.is_primary()  # writes files and speaks for the run

    ckpt_dir = os.path.join(output, CHECKPOINTS)
    if primary and resume and os.path.isdir(ckpt_dir):  # settings a checkpoint cannot take fail before the model loads
        check_resumable(ckpt_dir, {"lora": lcfg.to_dict(), "train": dataclasses.asdict(tc)})

    # -- set-up: model, data, adapters, optimizer ---------------------------------------------------
    if not isinstance(model, LoadedModel):
        model = load(model, dtype=dtype, gpu_memory=gpu_memory, experts=experts, max_batch=batch_size,
                     max_context=seq_len, training=grad_accum)
    cfg = model.config
    ds = data_lib.load_dataset(data, model.tokenizer, seq_len=seq_len, eval_fraction=eval_fraction, eval_data=eval_data,
                               seed=seed, vocab_size=cfg.vocab_size, keep_reasoning=keep_reasoning,
                               thinking=thinking)
    report = Reporter(steps, 0, progress, every=log_every, speaks=primary)
    if ds.truncated or ds.dropped:
        report.say(f"finetune: {ds.source}: {ds.truncated} examples cut to seq_len={seq_len}, {ds.dropped} dropped "
                   "(no target token left)")
    check_training_room(model.placement, model.dtype, batch_size, seq_len, grad_accum, report.say)
    pad_id = data_lib.pad_id_of(model.tokenizer)
    loader = data_lib.Loader(ds.train, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, seed=seed,
                             pad_id=pad_id)
    trainer = data_parallel(model.executor.trainer(lcfg, resolve_sites(cfg, lcfg.targets), tc), mesh)
    root_key = jax.random.key(seed)
    # Adapters and optimizer state replicated where the step's outputs live: one compile.
    adapters = distributed.replicate(init_adapters(cfg, lcfg, jax.random.fold_in(root_key, 0x10A)), mesh)
    state = TrainState(adapters, distributed.replicate(optimizer_init(tc)(adapters), mesh), 0, 0, ())

    # -- resume ---------------------------------------------------------------------------------------
    ckpts = None  # process 0's alone
    if primary:
        os.makedirs(output, exist_ok=True)
        if not resume and os.path.isdir(ckpt_dir):
            shutil.rmtree(ckpt_dir)
        ckpts = Checkpoints(ckpt_dir)
    run_meta = {"lora": lcfg.to_dict(), "train": dataclasses.asdict(tc), "data": ds.fingerprint(), "model": model.path}
    latest = ckpts.latest_step() if ckpts is not None and resume else None
    latest = int(distributed.from_primary(np.int32(-1 if latest is None else latest)))  # every process resumes there
    if latest >= 0:
        if primary:
            changed = resume_changes(ckpts.meta(latest), run_meta, ckpt_dir)
            adapters, opt_state, meta = ckpts.restore(latest, state.adapters, state.opt_state)
        else:  # placeholders of the right shapes, for process 0's values to arrive in
            (adapters, opt_state), meta = distributed.host_copy((state.adapters, state.opt_state)), {}
        adapters, opt_state, tokens = distributed.from_primary((adapters, opt_state, np.int32(meta.get("tokens", 0))))
        state = TrainState(*distributed.replicate((adapters, opt_state), mesh), latest, int(tokens),
                           tuple(meta.get("history", [])))
        report.say(f"finetune: resuming {ckpt_dir} at step {state.step} of {steps}"
                   + (f" with changed settings ({', '.join(changed)}): the run will differ from an uninterrupted one"
                      if primary and changed else ""))
    start = state.step
    report.start_at(start)

    def save(s: TrainState) -> None:
        if ckpts is not None:
            meta = dict(run_meta, step=s.step, position=loader.position(s.step), tokens=s.tokens,
                        history=list(s.history))
            ckpts.save(s.step, s.adapters, s.opt_state, meta)

    def latest_saved() -> int | None:
        return ckpts.latest_step() if ckpts is not None else None

    # -- the loop ---------------------------------------------------------------------------------------
    eval_every = eval_every or max(1, steps // 5)
    schedule = tc.schedule()
    boundary = StepBoundary(report.say)
    writing = False
    try:
        for step in range(start, steps):
            batch = loader.batch(step)
            with boundary.deferred():  # Ctrl-C lands after the state below is committed
                t0 = time.perf_counter()
                adapters, opt_state, m = trainer.step(state.adapters, state.opt_state, *split_rows(batch, mesh),
                                                      jax.random.fold_in(root_key, step))
                loss = float(m["loss"])  # waits for the step
                dt = time.perf_counter() - t0
                rec = {"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step)),
                       "tokens": batch.real_tokens, "targets": batch.targets, "seq_len": int(batch.tokens.shape[-1]),
                       "seconds": dt, "tokens_per_s": batch.real_tokens / dt if dt else 0.0}
                if "host_bytes" in m:
                    rec["host_bytes"] = int(m["host_bytes"])
                state = TrainState(adapters, opt_state, step + 1, state.tokens + batch.real_tokens,
                                   state.history + (rec,))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower the learning rate (--lr)")
            if ds.eval and (state.step % eval_every == 0 or state.step == steps):
                rec["eval_loss"] = evaluate_loss(trainer, state.adapters, ds.eval, batch_size, seq_len, pad_id, mesh)
            report.step(rec)
            if state.step % save_every == 0 or state.step == steps:
                with boundary.deferred():  # Ctrl-C lands after the checkpoint is complete
                    writing = True
                    save(state)
                    writing = False
            if callback is not None:
                callback(dict(rec))
    except KeyboardInterrupt:
        # A second Ctrl-C stops at once: inside a step whose inputs are already donated to it (the
        # committed state's arrays are gone), or inside a checkpoint being written. Then the step is
        # not saved: the latest checkpoint still names exactly the state it holds.
        if state.step > start and latest_saved() != state.step and not writing and intact(state):
            save(state)
        report.say(stop_note(state.step, latest_saved(), ckpt_dir))
        raise
    finally:
        if ckpts is not None:
            ckpts.close()
        report.close()

    # -- export -----------------------------------------------------------------------------------------
    adapters = distributed.host_copy(state.adapters)
    if primary:
        save_adapter(output, cfg, adapters, lcfg, base_model_name_or_path=model.path)
    history = list(state.history)
    new = history[len(history) - (state.step - start):]
    eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
    if ds.eval and (not history or "eval_loss" not in history[-1]):
        eval_loss = evaluate_loss(trainer, state.adapters, ds.eval, batch_size, seq_len, pad_id, mesh)
    result = FinetuneResult(output=output, steps=state.step, start_step=start,
                            train_loss=float(np.mean([h["loss"] for h in new[-10:]])) if new else None,
                            eval_loss=eval_loss, tokens=state.tokens, seconds=time.perf_counter() - t_start,
                            history=history, adapters=adapters, lora=lcfg)
    if primary:
        with open(os.path.join(output, SUMMARY), "w", encoding="utf-8") as f:
            json.dump({f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                       if f.name not in ("adapters", "lora")} | {"lora": lcfg.to_dict(), "train": dataclasses.asdict(tc)},
                      f, indent=1)
    return result


def data_parallel(trainer, mesh: jax.sharding.Mesh):
    """The trainer over the mesh: data-parallel where it can be (a resident model's one-program step);
    an offloaded model's step, Python driving per-layer segments on one device, only on one device."""
    if hasattr(trainer, "on_mesh"):
        return trainer.on_mesh(mesh)
    if mesh.size > 1:
        raise ValueError(f"data-parallel fine-tuning over {mesh.size} devices needs every parameter on the device "
                         "(a resident model); this model keeps routed experts in host memory: train it on one "
                         "device (devices=1, --devices 1)")
    return trainer


def split_rows(batch: data_lib.Batch, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    """A step's tokens and mask [micro-batch, row, token], rows split over the mesh's data axis (each
    process places the rows of its own devices)."""
    rows = distributed.micro_batches(mesh)
    return distributed.put_global(batch.tokens, rows), distributed.put_global(batch.mask, rows)


def stop_note(step: int, latest: int | None, ckpt_dir: str) -> str:
    if latest == step:
        return f"finetune: stopped after step {step}; checkpoint saved in {ckpt_dir}"
    if step == 0:
        return "finetune: stopped before the first step finished; nothing saved"
    return (f"finetune: stopped at once, step {step} unsaved; "
            + (f"the latest checkpoint in {ckpt_dir} is step {latest}" if latest is not None else "no checkpoint saved"))


def intact(state: TrainState) -> bool:
    """Whether the state's arrays still exist: a step's inputs are donated to it (deleted) when it
    is dispatched, until its outputs are committed as the next state."""
    return not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves((state.adapters,
                                                                                         state.opt_state)))


def evaluate_loss(trainer, adapters, examples, batch_size: int, seq_len: int, pad_id: int,
                  mesh: jax.sharding.Mesh | None = None) -> float | None:
    """Mean NLL per target token over the held-out examples (rows split over the mesh's data axis)."""
    s_tot, n_tot = 0.0, 0.0
    place = jnp.asarray if mesh is None else functools.partial(distributed.put_global, sharding=distributed.batch(mesh))
    for tokens, mask in data_lib.eval_batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id):
        s, n = trainer.eval_nll(adapters, place(tokens), place(mask))
        s_tot += float(s)
        n_tot += float(n)
    return s_tot / max(n_tot, 1.0)


def check_resumable(ckpt_dir: str, run: dict) -> None:
    ckpts = Checkpoints(ckpt_dir)
    try:
        latest = ckpts.latest_step()
        if latest is not None:
            fixed_settings(ckpts.meta(latest), run, ckpt_dir)
    finally:
        ckpts.close()


def fixed_settings(meta: dict, run: dict, where: str) -> None:
    """Raises for the settings that shape the saved state, which a resumed run cannot change."""
    for part, k in [("lora", "rank"), ("lora", "targets"), ("train", "max_grad_norm")]:
        a, b = meta[part].get(k), run[part].get(k)
        if a != b and not (k == "max_grad_norm" and bool(a) == bool(b)):
            raise ValueError(f"{where}: the checkpoint has {k}={a!r}, this run {b!r}; use another output "
                             "directory or resume=False (--no-resume)")


def resume_changes(meta: dict, run: dict, where: str) -> list[str]:
    """The settings a resumed run changes (it then differs from an uninterrupted one); raises for
    those that shape the saved state, which cannot change."""
    fixed_settings(meta, run, where)
    changed = [k for k in ("batch_size", "grad_accum", "seq_len", "seed", "steps", "lr", "warmup", "min_lr_ratio",
                           "weight_decay", "max_grad_norm") if meta["train"].get(k) != run["train"].get(k)]
    changed += [k for k in ("alpha", "dropout") if meta["lora"].get(k) != run["lora"].get(k)]
    if meta.get("data") != run["data"]:
        changed.append("data")
    return changed


def check_training_room(plan, dtype, batch_size: int, seq_len: int, grad_accum: int, say) -> None:
    """Say so when an offloaded model's plan did not reserve a step's activations (it was loaded for
    serving, or for smaller steps): the step may then run out of device memory mid-run."""
    need = training_nbytes(plan.config, batch_size, seq_len, dtype, grad_accum)
    if plan.offloaded and plan.budget is not None and plan.training_bytes < need:
        say(f"finetune: the model's placement reserves {fmt_bytes(plan.training_bytes)} for training, but a step of "
            f"{grad_accum} x {batch_size} x {seq_len} tokens needs {fmt_bytes(need)}: load it with "
            f"ktjax.load(..., training={grad_accum}, max_batch={batch_size}, max_context={seq_len}) "
            f"(or pass its path) to keep experts out of that room")
