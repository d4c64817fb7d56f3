"""Building an offloaded executor: from a checkpoint (core leaves straight onto the device, each
routed expert read, converted to the model's expert format and moved on its own to where the plan
puts it), or from parameters already in memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ktjax.config import ModelConfig
from ktjax.io.checkpoint import check_unexpected
from ktjax.io.experts import expert_tensors, read_expert, stored_names, stored_nbytes
from ktjax.io.load import abstract_params, is_routed_expert, open_checkpoint, plan_leaves, progress_bar, read_leaves
from ktjax.runtime.mesh import replicated
from ktjax.runtime.offload.executor import OffloadedExecutor
from ktjax.runtime.placement import PlacementPlan


def split_layers(cfg: ModelConfig, params: nnx.State) -> tuple[dict[str, jax.Array | None], list[dict]]:
    """Top-level arrays and one plain dict of arrays per layer (routed experts left out) from a
    stacked model state."""
    flat = dict(nnx.to_flat_state(params))
    top = {"embed_tokens": flat[("embed_tokens",)][...], "norm": flat[("norm", "weight")][...],
           "lm_head": flat[("lm_head", "weight")][...] if ("lm_head", "weight") in flat else None}
    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        j = cfg.stack_index(i)
        prefix = "dense_layers" if kind == "dense" else "moe_layers"
        items = [(p[1:], v.replace(v[...][j])) for p, v in flat.items() if p[0] == prefix and not is_routed_expert(p)]
        layers.append(nnx.to_pure_dict(nnx.from_flat_state(items)))
    return top, layers


def load_offloaded(path: str, cfg: ModelConfig, dtype, plan: PlacementPlan, *, progress: bool | None = None,
                   attention: str = "auto", expert_compute: str = "auto", rates=None,
                   mesh: jax.sharding.Mesh | None = None, host_activations: str = "int8") -> OffloadedExecutor:
    """Every tensor is checked from the headers before any is read; host memory holds one expert
    at a time beyond the loaded parameters. mesh: core arrays replicated over it, each expert on
    (or in pinned host memory behind) the device that owns it."""
    _, abstract = abstract_params(cfg, dtype)
    ckpt = open_checkpoint(path)
    sources, consumed = plan_leaves(ckpt, cfg, abstract)
    check_unexpected(ckpt, cfg, consumed)
    core = [(p, src) for p, src in sources if not is_routed_expert(p)]
    experts_src = {p: src for p, src in sources if is_routed_expert(p)}
    tensors = expert_tensors(cfg, experts_src)
    block = next(iter(experts_src.values())).block if experts_src else (128, 128)
    fmt = plan.expert_format
    devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)

    def target(i: int, e: int) -> jax.sharding.Sharding:
        kind = "pinned_host" if (i, e) in plan.host_experts else "device"
        return jax.sharding.SingleDeviceSharding(devices[plan.owner(e)], memory_kind=kind)

    if fmt.name == "fp8" and block[0] != block[1]:
        raise ValueError(f"{path}: FP8 experts need square scale blocks, got {block}")
    with progress_bar(path, sum(src.stored_nbytes for _, src in sources), progress) as bar:
        flat = read_leaves(ckpt, core, abstract, bar, sharding=None if mesh is None else replicated(mesh))
        # The stacked expert leaves are not materialised: empty placeholders keep the state's structure.
        variables = dict(nnx.to_flat_state(abstract))
        flat += [(p, variables[p].replace(jnp.zeros((0,), dtype))) for p in experts_src]
        top, layers = split_layers(cfg, nnx.from_flat_state(flat))
        del flat
        experts: dict[int, list] = {}
        order = sorted(tensors.items())
        for k, ((i, e), mats) in enumerate(order):
            if k + 1 < len(order):  # the disk reads the next expert while this one converts
                ckpt.prefetch(stored_names(order[k + 1][1], cfg.expert_quant))
            ex = read_expert(ckpt, mats, fmt, block, stored=cfg.expert_quant)
            experts.setdefault(i, []).append(jax.block_until_ready(jax.device_put(ex, target(i, e))))
            bar.update(stored_nbytes(ckpt, mats, cfg.expert_quant))
    return OffloadedExecutor(cfg, plan, dtype, top, layers, experts, attention=attention,
                             expert_compute=expert_compute, rates=rates, mesh=mesh, host_activations=host_activations)
