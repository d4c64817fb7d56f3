"""The persistent compilation cache: a second run starts without recompiling its segments."""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> None:
    path = path or os.environ.get("KTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ktjax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(path, "xla"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
