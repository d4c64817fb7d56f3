"""How the offloaded executor's segments compile, and the persistent compilation cache (a second
run starts without recompiling them)."""

from __future__ import annotations

import functools
import os

import jax

# XLA:GPU replays a program's kernels as a CUDA graph, and updates the graph whenever its buffers
# move. A decode segment runs on different buffers nearly every call (each fetched expert is a new
# allocation), so the update is paid per call: measured on the H200 (benchmarks/offload.md, run 8)
# ~0.1 ms of a ~0.25 ms launch for a batch-1 expert, while its kernels run ~0.1 ms. Launch them directly.
SEGMENT_OPTIONS = {"xla_gpu_enable_command_buffer": ""}
segment_jit = functools.partial(jax.jit, compiler_options=SEGMENT_OPTIONS)


def enable_compilation_cache(path: str | None = None) -> None:
    path = path or os.environ.get("KTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ktjax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(path, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
