"""Room in host memory for the routed experts a placement keeps there, checked before loading.

Two limits apply. The machine's memory: a plan that keeps more experts in host memory than the machine has
available would fill it partway through a long load and end in the kernel's OOM kill. And on GPUs, XLA's pinned
host pool, from which every `pinned_host` array is allocated: it grows on demand up to the limit that
XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB set when the backend started (64 GiB when unset), and past it the load fails
with XLA's "Out of host memory ... xla_gpu_host_bfc". `raise_pinned_pool_limit` (called when ktjax is imported,
before any backend starts where it can) sets that variable's default to the machine's memory instead.
"""

from __future__ import annotations

import os

PINNED_POOL_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
XLA_PINNED_POOL_GIB = 64  # XLA's default when the variable is unset


def physical_memory() -> int:
    """Bytes of memory the machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int | None:
    """Bytes the machine can still give a process without swapping (Linux's MemAvailable: free memory and
    the page cache it can drop); None where the kernel does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without this query: assume the worst
        return True


def raise_pinned_pool_limit() -> int:
    """Let XLA's pinned host pool grow to the machine's memory, unless the user set its limit or a backend has
    already started (then the limit it started with holds). Returns that pool's limit in GiB, as XLA will use
    it."""
    if PINNED_POOL_VAR not in os.environ and not _backends_started():
        os.environ[PINNED_POOL_VAR] = str(max(XLA_PINNED_POOL_GIB, physical_memory() >> 30))
    try:
        return int(os.environ.get(PINNED_POOL_VAR, XLA_PINNED_POOL_GIB))
    except ValueError:
        return XLA_PINNED_POOL_GIB


# The pinned pool's limit this process runs with: decided once, when ktjax is imported.
PINNED_POOL_GIB = raise_pinned_pool_limit()


def host_room(plan) -> tuple[int, int | None, int | None]:
    """(bytes of routed experts a `PlacementPlan` keeps in host memory, bytes the machine has available, bytes
    XLA's pinned pool may grow to where there is one: on GPUs), what `room_error` judges."""
    from ktjax.io.experts import on_gpu  # the device that holds host experts behind it
    return (len(plan.host_experts) * plan.expert_bytes, available_memory(),
            PINNED_POOL_GIB << 30 if on_gpu() else None)


def room_error(host_bytes: int, available: int | None, pinned_pool: int | None) -> str | None:
    """Why `host_bytes` of routed experts cannot be kept in host memory (None: they can). available: what the
    machine can give (None: unknown, not checked); pinned_pool: the bytes XLA's pinned pool may grow to (None:
    no such pool, off GPUs)."""
    gib = host_bytes / 2**30
    if available is not None and host_bytes > available:
        return (f"the routed experts kept in host memory need {gib:.1f} GiB, and this machine has "
                f"{available / 2**30:.1f} GiB available: keep more of them on the device (gpu_memory=), or store "
                f"them smaller (experts='int4')")
    if pinned_pool is not None and host_bytes > pinned_pool:
        return (f"the routed experts kept in host memory need {gib:.1f} GiB of pinned memory, and XLA's pinned "
                f"host pool stops at {pinned_pool / 2**30:.0f} GiB: set {PINNED_POOL_VAR} above {gib:.0f} before "
                f"jax starts (importing ktjax first sets it to the machine's memory)")
    return None
