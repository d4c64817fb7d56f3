import atexit
import os
import shutil
import tempfile

# Tests run on the CPU, deterministically, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' tiny models spend most of their time compiling, not running: XLA:CPU's backend at its lowest
# optimisation level takes about a third less CPU time over the model tests, and its older elemental
# emitters (not the MLIR fusion emitters) compile in half the time again. Results may differ from the
# default build's in the last float bits (the tolerances allow it; bit-exact checks are elementwise).
# Set XLA_FLAGS yourself to test otherwise.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("XLA_FLAGS", " ".join(FAST_COMPILE))
# `ktjax` commands (the CLI tests call main()) turn on the persistent compilation cache: the tests keep it
# out of the user's ~/.cache, and one run's time does not depend on what an earlier run compiled.
# The process that makes the folder removes it at its exit (pytest-xdist's workers inherit it from the parent).
if "KTJAX_CACHE_DIR" not in os.environ:
    os.environ["KTJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="ktjax-tests-")
    atexit.register(shutil.rmtree, os.environ["KTJAX_CACHE_DIR"], ignore_errors=True)
# (Sharing a persistent compilation cache across the session's processes from the start, at any compile time
# (JAX_COMPILATION_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0), measured no faster on the 2-core dev
# machine on 2026-12-03: `time python -m pytest tests/test_offload.py tests/test_generation.py` 104 against 113 s,
# tests/test_distributed.py + the Ctrl-C-anywhere test 131 against 127 s, the whole suite in a fresh clone 16:22
# against 14:30 on a slower afternoon.)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Most of a test's time is one
    process compiling on one core, so two workers on the 2-core CI machine took the suite from 15:27 to
    9:54 (2026-12-03, the whole suite in a fresh clone); past a few workers the longest test files bound
    the run, and each worker holds its own torch, jax and compiled programs."""
    return max(1, min(os.cpu_count() or 1, 4))
