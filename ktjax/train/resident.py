"""LoRA training of a resident model: one training step is one jitted program.

Gradient accumulation over micro-batches (lax.scan), the forward rematerialised per layer
(jax.checkpoint), the LM head and cross-entropy in chunks of tokens, Optax AdamW on the adapter
parameters only. The base weights are an input the step never differentiates nor changes: no
gradients and no optimizer state for them. Attention is the pure-JAX reference (the Pallas kernels
have no backward pass).

On a mesh (`ResidentTrainer.on_mesh`) the same program is data-parallel: the rows of each
micro-batch are split over the mesh's `data` axis, everything else is replicated, and XLA's SPMD
partitioner adds the gradients' all-reduce (see `ktjax.train.distributed`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ktjax.lora.config import LoRAConfig
from ktjax.lora.modules import lora_graph
from ktjax.train import distributed
from ktjax.train.config import TrainConfig, tree_norm
from ktjax.train.loss import head_nll


def adapter_nll(graphdef: nnx.GraphDef, base: nnx.State, adapters: Mapping, tokens_BT: jax.Array,
                mask_BT: jax.Array, dropout_key: jax.Array | None = None, *, remat: bool = True,
                loss_chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """(NLL sum, target count) of the LoRA model (graphdef from `lora_graph`) on one batch."""
    module = nnx.merge(graphdef, base, nnx.State(dict(adapters)))
    B = tokens_BT.shape[0]
    x_BTD, _ = module.hidden(tokens_BT, jnp.zeros((B,), jnp.int32), None, remat=remat, dropout_key=dropout_key)
    return head_nll(module.head, x_BTD, tokens_BT, mask_BT, loss_chunk)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, remat: bool = True,
                    loss_chunk: int = 1024, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """step(adapters, opt_state, base, tokens [M,B,T], mask [M,B,T], key) -> (adapters, opt_state, metrics).

    The M micro-batches' gradients are summed and divided by the total number of targets, so the
    update equals the one of a single batch of M*B rows. adapters and opt_state are donated.
    mesh: the outputs stay replicated over it (the inputs bring their own shardings: rows split over
    its data axis), so every step runs the one program the first step compiled."""

    def step(adapters, opt_state, base, tokens_MBT, mask_MBT, key):
        def micro(carry, xs):
            g_acc, s_acc, n_acc = carry
            tokens, mask, i = xs
            (s, n), g = jax.value_and_grad(
                lambda ad: adapter_nll(graphdef, base, ad, tokens, mask, jax.random.fold_in(key, i), remat=remat,
                                       loss_chunk=loss_chunk), has_aux=True)(adapters)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, adapters)
        M = tokens_MBT.shape[0]
        (g, s, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                    (tokens_MBT, mask_MBT, jnp.arange(M)))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / n, g)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        return adapters, opt_state, {"loss": s / n, "grad_norm": tree_norm(grads), "targets": n}

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=distributed.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _compiled_step(graphdef: nnx.GraphDef, tc: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> Callable:
    # Cached: a resumed or repeated run in the same process reuses the compiled programs.
    return make_train_step(graphdef, tc.optimizer(), remat=tc.remat, loss_chunk=tc.loss_chunk, mesh=mesh)


@functools.lru_cache(maxsize=8)
def _compiled_eval(graphdef: nnx.GraphDef, loss_chunk: int, mesh: jax.sharding.Mesh | None = None) -> Callable:
    def nll(adapters, base, tokens_BT, mask_BT):
        return adapter_nll(graphdef, base, adapters, tokens_BT, mask_BT, None, remat=False, loss_chunk=loss_chunk)

    return jax.jit(nll) if mesh is None else jax.jit(nll, out_shardings=distributed.replicated(mesh))


class ResidentTrainer:
    """The training step and held-out loss of a resident model's LoRA adapters."""

    def __init__(self, executor, lcfg: LoRAConfig, sites, tc: TrainConfig):
        self.graphdef, _ = lora_graph(executor.config, executor.dtype, lcfg, sites, attention="reference")
        self.base = executor.base_params
        self.tc = tc
        self.mesh = None
        self._step = _compiled_step(self.graphdef, tc)
        self._eval = _compiled_eval(self.graphdef, tc.loss_chunk)

    def on_mesh(self, mesh: jax.sharding.Mesh) -> ResidentTrainer:
        """This trainer data-parallel over `mesh`: the base weights replicated on its devices (kept
        where they already are when the model was loaded over exactly those devices); the caller
        splits each batch's rows over the data axis and replicates adapters and optimizer state."""
        out = copy.copy(self)
        out.mesh = mesh
        out.base = distributed.replicate(self.base, mesh, keep_spread=True)
        out._step = _compiled_step(self.graphdef, self.tc, mesh)
        out._eval = _compiled_eval(self.graphdef, self.tc.loss_chunk, mesh)
        return out

    def step(self, adapters, opt_state, tokens_MBT, mask_MBT, key):
        return self._step(adapters, opt_state, self.base, tokens_MBT, mask_MBT, key)

    def eval_nll(self, adapters, tokens_BT, mask_BT):
        return self._eval(adapters, self.base, tokens_BT, mask_BT)
