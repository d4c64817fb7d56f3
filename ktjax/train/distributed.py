"""Data-parallel fine-tuning over several devices and hosts, on JAX's own machinery.

One process per host joins the others through `jax.distributed.initialize` (a coordinator address,
the number of processes, this one's id). The devices that train form a one-axis mesh, `data`. Each
micro-batch's rows are split over that axis (`NamedSharding`); the base weights, the adapters and the
optimizer state are replicated. The step stays one jitted program: its loss is a sum over the global
batch, so XLA's SPMD partitioner computes each device's rows where they live and inserts the
all-reduce of the gradients. A run on N devices therefore makes the updates a run on one device makes
with the same global batch (`batch_size` rows per micro-batch, whatever N; each device takes
batch_size / N of them).

Every process reads and tokenizes the whole data set and draws the same global batch (batch k is a
pure function of data, seed and k, so they agree without talking), then puts only its own devices'
rows on them. Process 0 alone writes checkpoints and the adapter and tells the user about progress;
on resume it reads the checkpoint and sends the state to the others, so no shared file system is needed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"  # the mesh axis a batch's rows are split over

# The environment a launcher (or the user) sets on each host instead of the command-line options.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # jax.distributed.initialize reads this one itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes of a run: where the coordinator (process 0) listens, how many, which one this is."""

    coordinator: str
    num_processes: int
    process_id: int

    def __post_init__(self):
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--coordinator {self.coordinator!r}: expected HOST:PORT (process 0's address)")
        if self.num_processes < 1:
            raise ValueError(f"--num-processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")


def cluster_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                 environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster the arguments name, each missing one taken from the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); None when no coordinator is named: one process, nothing to join."""
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        return None
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    return Cluster(coordinator, num_processes, process_id)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def initialize(cluster: Cluster | None) -> None:
    """Join the cluster (once per process). Must run before anything touches a device: JAX fixes the
    set of devices when its backend starts."""
    if cluster is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id)


def data_mesh(devices: int | Sequence[jax.Device] | Mesh | None = None) -> Mesh:
    """The mesh a run trains on: a given mesh (it needs a `data` axis), the first `devices` devices, a
    list of devices, or by default every device of every process when several processes run, else one."""
    if isinstance(devices, Mesh):
        if DATA not in devices.axis_names:
            raise ValueError(f"the training mesh needs an axis named {DATA!r} (the batch is split over it); "
                             f"this one has {devices.axis_names}")
        mesh = devices
    else:
        if devices is None:
            chosen = jax.devices() if jax.process_count() > 1 else jax.devices()[:1]
        elif isinstance(devices, int):
            if not 1 <= devices <= len(jax.devices()):
                raise ValueError(f"devices={devices}: this run has {len(jax.devices())} device(s)")
            chosen = jax.devices()[:devices]
        else:
            chosen = list(devices)
        mesh = Mesh(np.asarray(chosen), (DATA,))
    present = {d.process_index for d in mesh.devices.flat}
    if present != set(range(jax.process_count())):
        raise ValueError(f"the training mesh holds devices of processes {sorted(present)}, but every one of the "
                         f"{jax.process_count()} processes must take part (one process per host, each with its devices)")
    return mesh


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """A micro-batch's rows split evenly over the data axis (it is the global micro-batch)."""
    if batch_size % data_size(mesh):
        raise ValueError(f"batch_size={batch_size} rows do not split over {data_size(mesh)} devices; use a multiple "
                         f"of {data_size(mesh)} (it is the global micro-batch: each device takes batch_size / devices)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rows(mesh: Mesh, ndim: int, axis: int) -> NamedSharding:
    """Dimension `axis` (the rows) of an ndim-dimensional batch split over the data axis."""
    spec = [None] * ndim
    spec[axis] = DATA
    return NamedSharding(mesh, PartitionSpec(*spec))


def micro_batches(mesh: Mesh) -> NamedSharding:
    """[micro-batch, row, token] arrays: rows split over the data axis."""
    return rows(mesh, 3, 1)


def batch(mesh: Mesh) -> NamedSharding:
    """[row, token] arrays: rows split over the data axis."""
    return rows(mesh, 2, 0)


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global array every process holds as numpy, as one jax.Array: each process places only the
    pieces its own devices hold."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def replicate(tree, mesh: Mesh, *, keep_spread: bool = False):
    """`tree` replicated over the mesh's devices (numpy arrays, or arrays on other devices, are
    copied there). keep_spread: arrays already spread over exactly the mesh's devices stay as they
    are, however split (the base weights of a model loaded over those devices: the step's program
    takes them as they are)."""
    target = replicated(mesh)
    devices = set(mesh.devices.flat)

    def place(x):
        # Exactly the target sharding, not an equivalent one (a single device's own): the step's
        # outputs have it, and jit compiles again for inputs whose sharding differs in type.
        if isinstance(x, jax.Array) and (x.sharding == target or keep_spread and x.sharding.device_set == devices):
            return x
        if jax.process_count() > 1:  # device_put cannot reach other processes' devices
            return put_global(np.asarray(x), target)
        return jax.device_put(x, target)

    return jax.tree.map(place, tree)


def is_primary() -> bool:
    """Whether this process writes files and reports progress (process 0)."""
    return jax.process_index() == 0


def host_copy(tree):
    """Numpy copies of replicated arrays (this process's own replica: no communication)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                        tree)


def from_primary(tree):
    """Process 0's values of `tree` (numpy arrays and scalars) on every process; as is with one process."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
