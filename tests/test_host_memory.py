"""Room in host memory for offloaded experts: a load that cannot fit is refused before it reads anything, with the
numbers and the option to change; XLA's pinned host pool (64 GiB by default) is raised to the machine's memory when
ktjax is imported first."""

import os
import subprocess
import sys

import pytest

import ktjax
from ktjax import api
from ktjax.runtime import host_memory
from ktjax.runtime.host_memory import PINNED_POOL_VAR, physical_memory, room_error

ALL_HOST = {r"model\.layers\.\d+\.mlp\.experts\.\d+": "host"}
GiB = 1 << 30


def test_experts_that_fit_are_let_through():
    assert room_error(10 * GiB, available=20 * GiB, pinned_pool=64 * GiB) is None
    assert room_error(10 * GiB, available=None, pinned_pool=None) is None  # nothing known, nothing refused


def test_experts_above_the_machines_memory_name_both_sizes_and_the_options():
    msg = room_error(30 * GiB, available=20 * GiB, pinned_pool=None)
    assert "30.0 GiB" in msg and "20.0 GiB available" in msg
    assert "gpu_memory=" in msg and "experts='int4'" in msg


def test_experts_above_xlas_pinned_pool_name_the_variable_to_set():
    msg = room_error(80 * GiB, available=200 * GiB, pinned_pool=64 * GiB)
    assert PINNED_POOL_VAR in msg and "64 GiB" in msg and "above 80" in msg


def test_load_refuses_experts_the_machine_cannot_hold_before_reading_any(monkeypatch):
    loaded = []
    monkeypatch.setattr(host_memory, "available_memory", lambda: 1 << 20)  # a machine with 1 MiB to spare
    monkeypatch.setattr(api, "load_offloaded", lambda *a, **k: loaded.append(a))
    with pytest.raises(ktjax.PlacementError, match="GiB available"):
        ktjax.load(placement=ALL_HOST, max_context=64)
    assert loaded == []


def _pool_after_import(env: dict, before: str = "") -> str:
    code = before + "import os, ktjax; from ktjax.runtime import host_memory as h; " \
                    f"print(os.environ.get({PINNED_POOL_VAR!r}), h.PINNED_POOL_GIB)"
    env = {k: v for k, v in os.environ.items() if k != PINNED_POOL_VAR} | env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[-2]


def test_importing_ktjax_first_lets_the_pinned_pool_grow_to_the_machines_memory():
    gib = str(max(64, physical_memory() >> 30))
    assert _pool_after_import({"JAX_PLATFORMS": "cpu"}) == f"{gib} {gib}"


def test_a_pinned_pool_limit_the_user_set_is_kept():
    assert _pool_after_import({"JAX_PLATFORMS": "cpu", PINNED_POOL_VAR: "100"}) == "100 100"


def test_after_a_backend_started_the_pool_keeps_xlas_default():
    # Too late to change it: the limit checked against is the one the backend started with.
    assert _pool_after_import({"JAX_PLATFORMS": "cpu"}, before="import jax; jax.devices(); ") == "None 64"
