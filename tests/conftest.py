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
os.environ.setdefault("KTJAX_CACHE_DIR", tempfile.mkdtemp(prefix="ktjax-tests-"))
# (Sharing a persistent compilation cache across the session's processes from the start, at any compile time,
# measured no faster: 104 against 113 s on test_offload + test_generation, 131 against 127 s on test_distributed
# + the Ctrl-C test, 16:22 against 14:30 for the whole suite on a slower afternoon.)
