import os
import tempfile

# Tests run on the CPU, deterministically, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' tiny models spend most of their time compiling, not running: XLA:CPU's backend at its lowest
# optimisation level takes about a third less CPU time over the model tests. Results may differ from the
# optimised build's in the last float bits (the tolerances allow it; bit-exact checks are elementwise).
# Set XLA_FLAGS yourself to test otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# `ktjax` commands (the CLI tests call main()) turn on the persistent compilation cache: the tests keep it
# out of the user's ~/.cache, and one run's time does not depend on what an earlier run compiled.
os.environ.setdefault("KTJAX_CACHE_DIR", tempfile.mkdtemp(prefix="ktjax-tests-"))
