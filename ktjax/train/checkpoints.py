"""Checkpoints of a fine-tuning run (orbax): the adapters, the optimizer state, the step and the
data position. Batch k and the dropout key of step k are pure functions of (data, seed, k), so a
resumed run continues exactly as an uninterrupted one.

The state is read back as numpy arrays, so a checkpoint does not depend on the devices that wrote
it: a run resumes on another number of devices. With several processes only process 0 opens the
checkpoints (orbax's `active_processes`) and writes its own replica of the state, as numpy; no other
process waits on it."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ktjax.train.distributed import host_copy


class Checkpoints:
    """Orbax checkpoints of a run under DIR/checkpoints: {adapters, opt_state} and JSON metadata."""

    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        # One process writes: the others hold replicas of the same state.
        only_this = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                       active_processes={jax.process_index()})
        os.makedirs(self.directory, exist_ok=True)  # orbax creates it only when every process takes part
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=False, enable_async_checkpointing=False,
                **({"multiprocessing_options": only_this} if jax.process_count() > 1 else {})))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, adapters, opt_state, meta: dict) -> None:
        state = {"adapters": adapters, "opt_state": opt_state}
        if jax.process_count() > 1:  # arrays over other processes' devices too: this one's replica, as numpy
            state = host_copy(state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, adapters, opt_state):
        """(adapters, opt_state, meta) of `step`: the arrays as numpy, shaped like the given ones."""
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), {"adapters": adapters, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state["adapters"], out.state["opt_state"], out.meta

    def close(self) -> None:
        self.manager.close()
