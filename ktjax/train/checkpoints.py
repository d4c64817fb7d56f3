"""Checkpoints of a fine-tuning run (orbax): the adapters, the optimizer state, the step and the
data position. Batch k and the dropout key of step k are pure functions of (data, seed, k), so a
resumed run continues exactly as an uninterrupted one."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Orbax checkpoints of a run under DIR/checkpoints: {adapters, opt_state} and JSON metadata."""

    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, adapters, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"adapters": adapters, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, adapters, opt_state):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"adapters": adapters, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state["adapters"], out.state["opt_state"], out.meta

    def close(self) -> None:
        self.manager.close()
