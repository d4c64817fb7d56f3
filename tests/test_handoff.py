"""A program that hands arrays to the host and takes the host's answers back in the middle of its run
(`runtime/offload/handoff.py`), on the CPU backend: what the host receives is what the program computed, what the
program reads back is what the host answered, in order, over several programs and more calls than ring slots."""

import ctypes
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ktjax.runtime.offload.handoff import Handoff
from ktjax.runtime.offload.handoff_targets import queue_copies, queue_fill


@pytest.fixture(scope="module")
def handoff():
    return Handoff(jax.devices()[0], slot_bytes=256, slots=3, timeout_s=20)


def layers(handoff, n_layers):
    """A program of n_layers steps: each hands x's sine to the host and adds the host's answer to it."""
    @jax.jit
    def program(x):
        for _ in range(n_layers):
            y = jnp.sin(x)
            handed = handoff.hand_over(y)
            x = y + handoff.take_back(x.shape, x.dtype, handed, y)
        return x
    return program


def host_answer(received: np.ndarray, k: int) -> np.ndarray:
    return (received * received + k).astype(np.float32)


def test_the_host_answers_each_hand_over_in_the_middle_of_the_program(handoff):
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    program = layers(handoff, 4)
    for run in range(3):  # 12 round trips through 3 slots
        job = handoff.launch(program, jnp.asarray(x + run))
        want = x + run
        for k in range(4):
            got = handoff.receive(want.shape, np.float32).copy()
            np.testing.assert_allclose(got, np.sin(want), rtol=1e-6, atol=1e-6)
            handoff.answer(host_answer(got, k))
            want = np.sin(want) + host_answer(got, k)
        np.testing.assert_allclose(np.asarray(job.result()), want, rtol=1e-5, atol=1e-5)


def test_a_program_that_hands_over_carries_no_effect_so_jax_dispatches_it_from_cpp(handoff):
    """The targets' calls are declared free of side effects (their operands and results order them): a jitted
    function with an effect is dispatched by jax's Python path, several times slower a call, on the thread that
    must launch a step's programs ahead of the device."""
    x = jnp.ones((3, 4), jnp.float32)
    assert jax.make_jaxpr(layers(handoff, 2))(x).effects == set()

    def filling(x):
        handed, arrays = handoff.hand_over(x, into=[jax.ShapeDtypeStruct((4,), jnp.float32)])
        return handoff.take_back(x.shape, x.dtype, handed, *handoff.filled(arrays, x))
    assert jax.make_jaxpr(filling)(x).effects == set()
    declared = jax.make_jaxpr(lambda x: handoff.hand_over(x, side_effect=True))(x)
    assert declared.effects  # what the check above would see, were they declared


def test_answers_given_before_the_launch_are_read_in_order(handoff):
    x = np.ones((2, 2), np.float32)
    answers = [np.full((2, 2), 10.0 * k, np.float32) for k in range(3)]
    for a in answers:
        handoff.answer(a)
    out = layers(handoff, 3)(jnp.asarray(x))  # nothing blocks: every wait is already met
    want = x
    for a in answers:
        want = np.sin(want) + a
        np.testing.assert_allclose(handoff.receive(want.shape, np.float32), want - a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_an_answer_larger_than_the_slots_is_refused(handoff):
    with pytest.raises(ValueError, match="257 bytes exceeds the 256-byte slots"):
        handoff.answer(np.zeros(257, np.uint8))


def test_a_hand_over_larger_than_the_slots_fails_the_program_and_names_the_limit(handoff):
    too_big = jax.jit(lambda x: handoff.hand_over(x))
    with pytest.raises(Exception, match="larger than the 256-byte slots"):
        jax.block_until_ready(too_big(jnp.zeros(65, jnp.float32)))
    small = np.arange(4, dtype=np.float32)
    jax.block_until_ready(jax.jit(lambda x: handoff.hand_over(x))(jnp.asarray(small)))
    np.testing.assert_array_equal(handoff.receive((4,), np.float32), small)  # the failed one took no number


def test_waiting_for_a_hand_over_that_never_comes_times_out_with_the_count():
    lonely = Handoff(jax.devices()[0], slot_bytes=64, slots=2, timeout_s=0.2)
    with pytest.raises(TimeoutError, match="no hand-over numbered 0 within 0 s .*0 hand_over"):
        lonely.receive((1,), np.float32)


def test_a_program_abandoned_midway_drains_and_the_next_one_is_answered_rightly(handoff):
    x = np.full((2, 2), 0.5, np.float32)
    job = handoff.launch(layers(handoff, 3), jnp.asarray(x))
    handoff.receive(x.shape, np.float32)  # the host fails after its first hand-over, before answering
    handoff.abandon(job)
    assert job.done()
    test_the_host_answers_each_hand_over_in_the_middle_of_the_program(handoff)


def test_the_host_copies_into_a_programs_own_outputs_what_it_chooses_after_a_hand_over(handoff):
    table = np.arange(24, dtype=np.float32).reshape(6, 4) ** 2  # rows the host chooses from, by what it receives

    @jax.jit
    def program(x):
        handed, arrays = handoff.hand_over(x, into=[jax.ShapeDtypeStruct((2,), jnp.int32),
                                                   jax.ShapeDtypeStruct((2, 4), jnp.float32)])
        busy = jnp.cumsum(jnp.outer(x, x) + 1.0)  # the device's own work meanwhile
        rows, chosen = handoff.filled(arrays, busy)
        return rows, chosen * x[:, None] + 0 * busy[-1]

    for run in range(4):  # more launches than the staging ring's 3 slots
        x = np.array([run + 1.0, 2.0 * run], np.float32)
        job = handoff.launch(program, jnp.asarray(x))
        got = handoff.receive((2,), np.float32)
        rows = (np.asarray(got, np.int64) + 1) % 6
        chosen = table[rows]
        row_bytes = table.strides[0]  # each chosen row copied to its place in the second array
        handoff.fill([(0, 0, *handoff.stage(rows.astype(np.int32)))]
                     + [(1, k * row_bytes, table.ctypes.data + r * row_bytes, row_bytes) for k, r in enumerate(rows)])
        out_rows, out = (np.asarray(a) for a in job.result())
        np.testing.assert_array_equal(out_rows, rows)
        np.testing.assert_allclose(out, table[rows] * x[:, None])


def test_the_program_computes_on_a_fills_first_part_while_the_rest_is_still_held_back(handoff, monkeypatch):
    """`filled_first` lets the program go on once the fill's first copies have landed: here it hands what it made of
    them to the host, which receives that before it lets the rest of the fill through; then `filled` reads all."""
    @jax.jit
    def program(x):
        handed, (a, b) = handoff.hand_over(x, into=[jax.ShapeDtypeStruct((4,), jnp.float32)] * 2)
        (a,) = handoff.filled_first([a], handed)
        first = 2 * a
        told = handoff.hand_over(first)
        a, b = handoff.filled([a, b], told)
        return first, a + b

    held = []
    queue = handoff._queue

    def first_part_only(table, targets=(None, None), count=0, first=0):  # the rest and "filled"'s flag held back
        queue(table[:first], (targets[0], None), count, first)
        held.append((table[first:], (None, targets[1]), count, 0))

    monkeypatch.setattr(handoff, "_queue", first_part_only)
    job = handoff.launch(program, jnp.ones(1))
    handoff.receive((1,), np.float32)
    a, b = np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32) + 10
    handoff.fill([(0, 0, a.ctypes.data, a.nbytes), (1, 0, b.ctypes.data, b.nbytes)], first=1)
    np.testing.assert_array_equal(handoff.receive((4,), np.float32), 2 * a)  # before the rest of the fill
    assert len(held) == 1 and not job.done()
    queue(*held[0])
    first, both = (np.asarray(v) for v in job.result())
    np.testing.assert_array_equal(first, 2 * a)
    np.testing.assert_array_equal(both, a + b)


def test_a_fill_past_its_arrays_end_is_refused_before_any_copy(handoff, monkeypatch):
    def program(x):
        handed, arrays = handoff.hand_over(x, into=[jax.ShapeDtypeStruct((2,), jnp.int32)])
        return handoff.filled(arrays)

    queued = []
    monkeypatch.setattr(handoff, "_queue", lambda *args: queued.append(args))
    job = handoff.launch(jax.jit(program), jnp.ones(1))

    def word():  # a staged int32: a source of 4 bytes
        return handoff.stage(np.zeros(1, np.int32))

    cases = [([(0, 0, *handoff.stage(np.zeros(3, np.int32)))], "copy 0 of 12 bytes at offset 0 of array 0, of 8"),
             ([(0, 0, *word()), (0, 8, *word())], "copy 1 of 4 bytes at offset 8 of array 0, of 8"),
             ([(0, -4, *word())], "copy 0 into array 0 at offset -4"),
             ([(64, 0, *word())], "copy 0 into array 64 at offset 0")]
    for copies, error in cases:
        with pytest.raises(ValueError, match=error):
            handoff.fill(copies)
    assert not queued
    monkeypatch.undo()
    handoff.abandon(job)


def test_a_launch_that_fails_raises_its_own_error_at_once_not_a_timeout():
    handoff = Handoff(jax.devices()[0], slot_bytes=64, slots=2, timeout_s=20)

    def launch_fails():
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating 3 GiB")

    job = handoff.launch(launch_fails)
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="launched program failed: RESOURCE_EXHAUSTED") as raised:
        handoff.receive((1,), np.float32)
    assert time.perf_counter() - t < 5
    assert isinstance(raised.value.__cause__, MemoryError)
    handoff.abandon(job)
    program = layers(handoff, 1)  # the handoff goes on counting from what was launched
    job = handoff.launch(program, jnp.ones(2, jnp.float32))
    np.testing.assert_allclose(handoff.receive((2,), np.float32), np.sin(np.ones(2)), rtol=1e-6)
    handoff.answer(np.full(2, 3.0, np.float32))
    np.testing.assert_allclose(np.asarray(job.result()), np.sin(np.ones(2)) + 3, rtol=1e-6)


def test_the_timeout_counts_from_the_launch_of_what_is_awaited_not_from_a_slow_launch_before_it():
    handoff = Handoff(jax.devices()[0], slot_bytes=64, slots=2, timeout_s=0.5)
    program = layers(handoff, 1)

    def compiles_slowly(x):
        time.sleep(2.0)  # as a first launch compiling its programs: 4 timeouts
        return program(x)

    job = handoff.launch(compiles_slowly, jnp.ones(2, jnp.float32))
    np.testing.assert_allclose(handoff.receive((2,), np.float32), np.sin(np.ones(2)), rtol=1e-6)
    handoff.answer(np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(job.result()), np.sin(np.ones(2)), rtol=1e-6)


def test_a_launch_further_ahead_than_the_ring_is_refused_before_a_wrong_copy(handoff):
    """The arrays' addresses wait in a ring of `slots` rows for the host's fills: a launch that publishes more
    before the host's first fill has overwritten that fill's row, which `fill` refuses rather than copy there. The
    program's first wait finds its arrays' row overwritten too, and fails; whichever side sees it first, the host
    raises."""
    n = handoff.slots + 1

    def program(x):
        token, outs = None, []
        for k in range(n):  # each hand-over after the one before, all before the first wait
            token, arrays = handoff.hand_over(x + k if token is None else x + k + 0 * token, into=[
                jax.ShapeDtypeStruct((1,), jnp.float32)])
            outs.append(arrays)
        got = []
        for arrays in outs:  # each wait after the one before
            got.append(handoff.filled(arrays, token if not got else got[-1])[0])
        return got

    job = handoff.launch(jax.jit(program), jnp.ones(1))
    refused = (f"{n} hand-overs into arrays launched ahead .* the ring holds {n - 1}"
               "|the launched program failed: .* not the buffer its hand-over published")
    with pytest.raises(RuntimeError, match=refused):
        for _ in range(n):
            handoff.receive((1,), np.float32)
        handoff.fill([(0, 0, *handoff.stage(np.zeros(1, np.float32)))])
    handoff.abandon(job)
    test_the_host_copies_into_a_programs_own_outputs_what_it_chooses_after_a_hand_over(handoff)


def test_a_fills_copies_and_flag_are_queued_in_order_by_one_compiled_call():
    """On a GPU `fill` queues its copies and the flags' writes through `queue_fill` (`queue_copies` for each part),
    which calls the driver's functions by address from compiled code. Here C callbacks stand in for cuMemcpyAsync
    and cuStreamWriteValue32 and record what they are given: every copy's (destination, source, bytes, stream) in
    order, then the flag's write."""
    calls = []
    signature = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)
    copy = signature(lambda *a: calls.append(("copy", *a)) or 0)
    write = signature(lambda *a: calls.append(("write", *a)) or 0)
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    table = np.array([[1000, 2000, 30], [1100, 2100, 40], [1200, 2200, 50]], np.int64)
    assert queue_copies(address(copy), address(write), 77, table, 2, 4242, 9) == 0
    assert calls == [("copy", 1000, 2000, 30, 77), ("copy", 1100, 2100, 40, 77), ("write", 77, 4242, 9, 0)]
    failing = signature(lambda *a: calls.append(("failed", *a)) or 700)  # CUDA_ERROR_ILLEGAL_ADDRESS
    calls.clear()
    assert queue_copies(address(failing), address(write), 77, table, 3, 4242, 9) == 700
    assert calls == [("failed", 1000, 2000, 30, 77)]  # nothing after the first failure, no flag
    # queue_fill (what `fill` calls): the first part and its flag, then the rest and the other flag.
    calls.clear()
    assert queue_fill(address(copy), address(write), 77, table, 1, 4141, 4242, 9) == 0
    assert calls == [("copy", 1000, 2000, 30, 77), ("write", 77, 4141, 9, 0), ("copy", 1100, 2100, 40, 77),
                     ("copy", 1200, 2200, 50, 77), ("write", 77, 4242, 9, 0)]
    calls.clear()
    assert queue_fill(address(copy), address(write), 77, table, 0, 0, 0, 9) == 0  # `copy_ahead`'s: no flag at all
    assert [c[0] for c in calls] == ["copy"] * 3
