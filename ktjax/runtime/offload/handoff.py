"""A device program that hands data to the host and takes the host's answer back without returning to Python.

A decode step's MoE layer needs the host CPU in the middle of the device's work: the routing goes to the host, the
host computes its experts, their sum comes back. Driven from Python, each layer costs two program calls and a
routing round trip (~1 ms of a ~3 ms R1-share layer on the H100 machine, benchmarks/offload.md runs 26-41), and
XLA's host callbacks cost more (runs 34-39). KTransformers' answer is to launch the whole step at once and let the
device's stream wait for the host. `Handoff` does that inside XLA programs, with three FFI targets
(`handoff_targets`):

- `hand_over(x)`: queues a copy of x into a pinned host ring slot, then a write of its sequence number into a pinned
  flag (`cuMemcpyDtoHAsync`, `cuStreamWriteValue32`); the host spins on the flag (`receive`).
- `take_back(shape, dtype, *after)`: queues a wait until the host's flag reaches its sequence number, then a copy
  of the host's answer from its ring slot (`cuStreamWaitValue32`, `cuMemcpyHtoDAsync`); the host writes the answer
  and then the flag (`answer`). `after`: arrays the wait is ordered behind (the device's own share of the layer).
- `hand_over(x, into=structs)` also returns arrays the host copies into (`fill`: the handler publishes their addresses
  at launch; the host queues copies into them, or into places within them, on a stream of its own, from pinned host
  memory or device arrays, then a flag write), and `filled(arrays, *after)` returns them once those copies have landed
  (a wait on the stream, the buffers passed through in place). A layer's chosen experts reach its program so, each
  into arrays of its own or its slot of a stack, whatever their number or place, with no byte crossing twice. The
  arrays are the hand-over's own results, live until `filled` reads them: the device's work between the two (the
  shared expert) cannot share their memory while the host writes into it. `filled_first` between the two waits only
  for the fill's first part (`fill`'s `first` copies, then a flag of its own), so that the device computes what those
  bring while the rest lands.

The targets' handlers run when XLA launches the program, not when the stream reaches them: each only queues work
on the stream, and numbers its calls in launch order, which is the order the host sees them. On the CPU backend (the
tests) the same protocol runs with plain copies and a spinning wait.

A program that takes anything back must be launched by another thread than the one that answers (`launch`): a
launch may block on the device midway (XLA reads some loop conditions back), and the device would wait for an
answer the blocked thread never gives.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ktjax.runtime.offload.handoff_targets import (MAX_OUTPUTS, STAGING_BYTES, TARGETS, CudaDriver, Pinned,
                                                   compile_handler, placed, queue_fill, spin)

_names = itertools.count()

# The targets' calls are declared free of side effects by default: each one's results are used, and its operands
# order it (`hand_over`'s token and arrays go into `filled` and `take_back`), so XLA neither drops nor reorders them.
# A jitted function with an effect is dispatched by jax's Python path instead of its C++ one: on the dev box, 463-527
# against 31-50 us a call of 25 arrays (`scripts/probe_effect_dispatch.py`), on the launching thread, which must stay
# ahead of the device (offload.md run 45: each MoE layer's program took 2.5-3.3 ms to launch, about a layer's time).
SIDE_EFFECT = False


def _u32(count: int) -> np.uint32:
    """A sequence count as the flags hold it: modulo 2**32 (the waits compare so, `handoff_targets.spin`)."""
    return np.uint32(count & 0xFFFFFFFF)


def _done(a) -> bool:
    """Whether an array's computation has ended, well or not."""
    try:
        return a.is_ready()
    except Exception:  # noqa: BLE001 - its program failed: ended
        return True


# ---- the handoff --------------------------------------------------------------------------------------------------

class Handoff:
    """Rings of `slots` pinned slots of `slot_bytes` each, one each way, and the FFI targets that use them (one set
    per instance, registered for the device's platform). A launch may run ahead of the host by fewer than `slots`
    hand-overs into arrays (their addresses' ring). Sequence numbers count from 0 in launch order, one count
    per target; the host's side (`receive`, `answer`, `fill`) must take them in the same order."""

    def __init__(self, device, slot_bytes: int, slots: int = 64, timeout_s: float = 30.0):
        import jax

        self.slot_bytes, self.slots, self.timeout_s = slot_bytes, slots, timeout_s
        gpu = device.platform == "gpu"
        self.cuda = CudaDriver(device.local_hardware_id) if gpu else None
        # Flags the stream writes or waits on: handed over (device writes); answered, filled, filled first (host).
        self.flags = Pinned(16, self.cuda)
        # Each target's flag at 4 * its index in TARGETS.
        self.flag = {kind: self.flags.array[4 * k:4 * k + 4].view(np.uint32) for k, kind in enumerate(TARGETS)}
        self.handed_flag, self.answered_flag, self.filled_flag, self.first_flag = self.flag.values()
        self.counters = np.zeros(3, np.int64)  # launches of hand_over, take_back, filled (filled_first counts none)
        self.published = np.zeros(1, np.int64)  # hand-overs whose arrays to fill have their addresses in `outputs`
        self.outputs = np.zeros((slots, MAX_OUTPUTS, 2), np.int64)  # per such hand-over: each array's address, bytes
        self.scratch = np.zeros(8, np.int64)  # the handlers' argument structs
        self.to_host = Pinned(slot_bytes * slots, self.cuda)
        self.to_device = Pinned(slot_bytes * slots, self.cuda)
        self.staging = Pinned(STAGING_BYTES * slots, self.cuda)
        self.received = self.sent = self.filled_count = self.staged = 0  # the host side's next sequence numbers
        self.launcher = ThreadPoolExecutor(1, thread_name_prefix="ktjax-handoff")
        self.launched: list[Future] = []  # `launch`'s jobs not known to have finished well
        # A program queued behind everything launched on the device (`abandon` waits for it).
        self._after = functools.partial(jax.jit(lambda z: z + 1), jax.device_put(np.float32(0), device))
        n = next(_names)
        self.names = {kind: f"ktjax_{kind}_{n}" for kind in TARGETS}
        platform = "CUDA" if gpu else "cpu"
        self._constants: list[np.ndarray] = []  # what the handlers' code points at, kept alive with them
        self._handlers = {kind: compile_handler(self, kind, self._constants) for kind in self.names}
        for kind, name in self.names.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(self._handlers[kind].address), platform=platform)

    # -- inside programs --
    def hand_over(self, x, into=(), side_effect: bool = SIDE_EFFECT):
        """Queue x's copy to the host (its next ring slot) and the flag after it; returns a token [1] int32 that
        later work can be ordered behind. With `into` (jax.ShapeDtypeStructs): (the token, arrays of those shapes
        that the host fills once it has received x, `fill`; read them through `filled`). side_effect: declared
        to XLA and jax (see SIDE_EFFECT), as at the other calls of the program."""
        import jax
        import jax.numpy as jnp
        token = jax.ShapeDtypeStruct((1,), jnp.int32)
        if len(into) > MAX_OUTPUTS:
            raise ValueError(f"handoff: a hand-over into {len(into)} arrays; at most {MAX_OUTPUTS}")
        if not into:
            return jax.ffi.ffi_call(self.names["hand_over"], token, has_side_effect=side_effect)(x)
        handed, *arrays = jax.ffi.ffi_call(self.names["hand_over"], [token, *into], has_side_effect=side_effect)(x)
        return handed, arrays

    def take_back(self, shape, dtype, *after, side_effect: bool = SIDE_EFFECT):
        """An array of shape and dtype the host answers (`answer`), read once the arrays `after` are computed and the
        host has answered. `after` must hold the token of the hand-over this answers (where programs run their
        operations as their inputs allow, as XLA:CPU's do, nothing else orders the two)."""
        import jax
        return jax.ffi.ffi_call(self.names["take_back"], jax.ShapeDtypeStruct(shape, dtype),
                                has_side_effect=side_effect)(*after)

    def filled(self, arrays, *after, side_effect: bool = SIDE_EFFECT):
        """arrays (those of a `hand_over(..., into=...)`) once the host's copies into them (`fill`) have landed, in
        place. `after`: arrays the wait is ordered behind."""
        import jax
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
        return jax.ffi.ffi_call(self.names["filled"], structs, has_side_effect=side_effect,
                                input_output_aliases={k: k for k in range(len(arrays))})(*arrays, *after)

    def filled_first(self, arrays, *after, side_effect: bool = SIDE_EFFECT):
        """arrays (any, passed through in place) once the first part of the next `filled`'s fill has landed (`fill`'s
        `first`): the device can compute on what that part copies while the rest is still on its way. Call it
        between a hand-over into arrays and its `filled`. `after`: arrays the wait is ordered behind."""
        import jax
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
        return jax.ffi.ffi_call(self.names["filled_first"], structs, has_side_effect=side_effect,
                                input_output_aliases={k: k for k in range(len(arrays))})(*arrays, *after)

    # -- the host's side --
    def launch(self, fn, *args, **kwargs) -> Future:
        """Call fn (a program that takes answers back) on the launching thread. While it runs, the host's waits
        (`receive`, `fill`) do not time out for a call it has yet to launch (the launch may first compile its
        programs); if it fails, they raise its error at once."""
        job = self.launcher.submit(fn, *args, **kwargs)
        self.launched.append(job)
        return job

    def receive(self, shape, dtype) -> np.ndarray:
        """The next array handed over (waits for its flag): a view of its ring slot, valid until `slots` more."""
        n = self.received
        self._wait(self.handed_flag.ctypes.data, n + 1, "hand-over", self.counters[:1])
        self.received = n + 1
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        slot = (n % self.slots) * self.slot_bytes
        return self.to_host.array[slot:slot + nbytes].view(dtype).reshape(shape)

    def answer(self, value: np.ndarray) -> None:
        """Write the next answer into its ring slot, then its flag (the device reads the slot once it sees that)."""
        m = self.sent
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        if raw.size > self.slot_bytes:
            raise ValueError(f"handoff: an answer of {raw.size} bytes exceeds the {self.slot_bytes}-byte slots")
        slot = (m % self.slots) * self.slot_bytes
        self.to_device.array[slot:slot + raw.size] = raw
        self.sent = m + 1
        self.answered_flag[0] = _u32(m + 1)

    def stage(self, value: np.ndarray) -> tuple[int, int]:
        """value in the next pinned staging slot, as a source for `fill`: (its address, its bytes)."""
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        if raw.size > STAGING_BYTES:
            raise ValueError(f"handoff: {raw.size} bytes to stage; the slots hold {STAGING_BYTES}")
        slot = (self.staged % self.slots) * STAGING_BYTES
        self.staged += 1
        self.staging.array[slot:slot + raw.size] = raw
        return self.staging.device + slot, raw.size

    def fill(self, copies, first: int = 0) -> None:
        """Queue copies into the arrays of the next hand-over `into` arrays, then let its `filled` go on once they
        have landed. copies: rows (array, byte offset in it, source address, bytes); a source is pinned host memory,
        a device array's buffer, or `stage`'s. What no copy writes keeps whatever it held. The first `first` copies
        are queued ahead of the rest, and a `filled_first` between the hand-over and its `filled` goes on once they
        have landed."""
        n = self.filled_count
        self._wait(self.published.ctypes.data, n + 1, "hand-over into arrays", self.published)
        if int(self.published[0]) - n > self.slots:  # its row holds a later hand-over's arrays
            raise RuntimeError(f"handoff: {int(self.published[0]) - n} hand-overs into arrays launched ahead of the "
                               f"host's fills; the ring holds {self.slots}")
        outputs = self.outputs[n % self.slots]
        copies = np.asarray(copies, np.int64).reshape(-1, 4)
        table = np.empty((len(copies), 3), np.int64)
        bad = placed(outputs, copies, table)  # one compiled pass: a layer's fill is on the host CPU's way
        if bad >= 0:
            a, offset, nbytes = (int(v) for v in copies[bad, [0, 1, 3]])
            if not 0 <= a < MAX_OUTPUTS or offset < 0:
                raise ValueError(f"handoff: copy {bad} into array {a} at offset {offset}")
            raise ValueError(f"handoff: copy {bad} of {nbytes} bytes at offset {offset} of array {a}, of "
                             f"{outputs[a, 1]}")
        self._queue(table, ("filled_first", "filled"), n + 1, first)
        self.filled_count = n + 1

    def copy_ahead(self, table) -> None:
        """Queue copies, table's rows (destination, source, bytes), behind every fill so far and before any later
        one, with no flag: into device buffers of the host's own that a later fill copies from (the lookahead's).
        A later fill that copies from them, and one into them, are ordered after these by their queue."""
        self._queue(np.asarray(table, np.int64).reshape(-1, 3))

    def _queue(self, table: np.ndarray, targets=(None, None), count: int = 0, first: int = 0) -> None:
        """Copy table's rows (destination, source, bytes) in order on the host's stream, setting targets[0]'s flag
        to count after the first `first` of them and targets[1]'s after the rest (None: no flag), in one call. On
        the CPU backend, now."""
        cuda = self.cuda
        if cuda is not None:
            cuda.bind()
            flags = [0 if t is None else self.flags.device + 4 * TARGETS.index(t) for t in targets]
            cuda.check("cuMemcpyAsync or cuStreamWriteValue32",
                       queue_fill(cuda.copy, cuda.write_value, cuda.stream.value, table, first, *flags,
                                  int(_u32(count))))
            return
        for part, target in zip((table[:first], table[first:]), targets):
            for dest, source, nbytes in part:
                ctypes.memmove(int(dest), int(source), int(nbytes))
            if target is not None:
                self.flag[target][0] = _u32(count)

    def abandon(self, job: Future) -> None:
        """After a failure on the host's side: release every wait the launched program `job` queued, so that the
        device drains what it launched (reading garbage), wait for that, and count on from what was launched."""
        import jax
        while not job.done():  # its launch may still be queueing waits
            self._release()
            time.sleep(0.001)
        if job in self.launched:
            self.launched.remove(job)
        try:
            outputs = job.result()
        except Exception:  # noqa: BLE001 - the program's own failure is the caller's to report
            outputs = None
        # Launched is not run: the device (on the CPU backend, XLA's threads, whose handlers count their calls as they
        # run) still has the programs to finish, and meets waits on the way. A program queued after them finishes
        # after them on a GPU's stream; their own outputs say so on the CPU backend.
        pending = [a for a in jax.tree.leaves(outputs) if isinstance(a, jax.Array)] + [self._after()]
        while not all(_done(a) for a in pending):
            self._release()
            time.sleep(0.001)
        # A launch that failed between a hand-over into arrays and its `filled` leaves the two counts apart: both
        # go on from the larger, so that the next pair's numbers (and ring rows) agree again.
        self.counters[2] = self.published[0] = max(int(self.counters[2]), int(self.published[0]))
        self.answered_flag[0] = _u32(int(self.counters[1]))
        self.filled_flag[0] = self.first_flag[0] = _u32(int(self.counters[2]))
        self.received, self.sent, self.filled_count = (int(c) for c in self.counters)

    def _release(self) -> None:
        """Let every wait launched so far pass (the flags well past their counts)."""
        for flag, count in ((self.answered_flag, self.counters[1]), (self.filled_flag, self.counters[2]),
                            (self.first_flag, self.counters[2])):
            flag[0] = _u32(int(count) + (1 << 30))

    def _wait(self, address: int, target: int, what: str, launches: np.ndarray) -> None:
        # Spun in compiled code without the GIL: a Python loop would hold it, and the launching thread, which needs
        # it to make its call, would wait for the interpreter's switch interval (5 ms) each time. The timeout counts
        # from when the awaited call is launched (or nothing more is being launched): a launch may compile first.
        deadline = time.perf_counter() + self.timeout_s
        while not spin(address, _u32(target), 1 << 20):
            if self._launching(launches, target):
                deadline = time.perf_counter() + self.timeout_s
            elif time.perf_counter() > deadline:
                launched = ", ".join(f"{int(c)} {kind}" for c, kind in zip(self.counters, self.names))
                raise TimeoutError(f"handoff: no {what} numbered {target - 1} within {self.timeout_s:.0f} s "
                                   f"(launched: {launched})")

    def _launching(self, launches: np.ndarray, target: int) -> bool:
        """Whether a launched job is still to launch call number target - 1 (launches[0]: those launched so far);
        raises the error of a job that failed."""
        for job in [j for j in self.launched if j.done()]:
            self.launched.remove(job)
            if job.exception() is not None:
                raise RuntimeError(f"handoff: the launched program failed: {job.exception()}") from job.exception()
        return bool(self.launched) and int(launches[0]) < target
