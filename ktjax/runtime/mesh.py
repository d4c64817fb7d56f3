"""Several devices: the mesh the routed experts are split over (expert parallelism), and where each
parameter lives on it.

One mesh axis, `expert`: device d owns the contiguous block of experts d*E/n .. (d+1)*E/n - 1 of
every MoE layer (`PlacementPlan.owner`). Core parameters and the KV cache are replicated on every
device; every device runs attention for every token, and each MoE layer's routed experts run as a
`shard_map` over the axis with one psum (`ktjax.models.moe.routed_experts_parallel`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ktjax.config import ModelConfig
from ktjax.io.load import LeafPath, is_routed_expert
from ktjax.models.moe import EXPERT_AXIS
from ktjax.runtime.placement import PlacementError, check_expert_split


def expert_mesh(cfg: ModelConfig, devices: int | None = None, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh to split the routed experts over: the first `devices` devices, or `mesh` (it needs an
    `expert` axis and no other axis of size > 1); None for one device (the single-device path)."""
    if devices is not None and mesh is not None:
        raise PlacementError("give devices=N or mesh=..., not both")
    if mesh is None:
        if devices is None or devices == 1:
            return None
        check_expert_split(cfg, devices)
        here = jax.devices()
        if devices > len(here):
            raise PlacementError(f"devices={devices}: only {len(here)} {here[0].platform} device(s) here")
        return Mesh(np.array(here[:devices]), (EXPERT_AXIS,))
    if not isinstance(mesh, Mesh):
        raise PlacementError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if EXPERT_AXIS not in mesh.axis_names:
        raise PlacementError(f"mesh axes {tuple(mesh.axis_names)}: the routed experts are split over an axis named "
                             f"{EXPERT_AXIS!r}, and this mesh has none")
    others = {a: n for a, n in mesh.shape.items() if a != EXPERT_AXIS and n > 1}
    if others:
        raise PlacementError(f"mesh axes {others}: inference splits the routed experts over {EXPERT_AXIS!r} only; "
                             "other axes must have size 1")
    check_expert_split(cfg, mesh.shape[EXPERT_AXIS])
    # Auto axes: the shard_map takes the experts split as placed and the rest replicated, whatever
    # axis types the caller's mesh was made with.
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def devices_of(mesh: Mesh | None) -> int:
    """How many devices the routed experts are split over."""
    return 1 if mesh is None else mesh.shape[EXPERT_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_sharding(mesh: Mesh, leaf_path: LeafPath) -> NamedSharding:
    """Where a leaf of the stacked model state lives: routed experts [layers, E, ...] split along E,
    everything else replicated."""
    if is_routed_expert(leaf_path):
        return NamedSharding(mesh, PartitionSpec(None, EXPERT_AXIS))
    return replicated(mesh)
