import os
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
_CACHE = os.environ.setdefault("KTJAX_CACHE_DIR", tempfile.mkdtemp(prefix="ktjax-tests-"))
# Every process of the session (this one, the notebook's kernel, the multi-device and distributed workers)
# shares that persistent compilation cache from the start, for programs of any compile time: tests that load
# models of the same shapes compile each program once (each model builds its own jitted segments).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
