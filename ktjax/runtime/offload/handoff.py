"""A device program that hands data to the host and takes the host's answer back without returning to Python.

A decode step's MoE layer needs the host CPU in the middle of the device's work: the routing goes to the host, the
host computes its experts, their sum comes back. Driven from Python, each layer costs two program calls and a
routing round trip (~1 ms of a ~3 ms R1-share layer on the H100 machine, benchmarks/offload.md runs 26-41), and
XLA's host callbacks cost more (runs 34-39). KTransformers' answer is to launch the whole step at once and let the
device's stream wait for the host. `Handoff` does that inside XLA programs, with two FFI targets:

- `hand_over(x)`: queues a copy of x into a pinned host ring slot, then a write of its sequence number into a pinned
  flag (`cuMemcpyDtoHAsync`, `cuStreamWriteValue32`); the host spins on the flag (`receive`).
- `take_back(shape, dtype, *after)`: queues a wait until the host's flag reaches its sequence number, then a copy
  of the host's answer from its ring slot (`cuStreamWaitValue32`, `cuMemcpyHtoDAsync`); the host writes the answer
  and then the flag (`answer`). `after`: arrays the wait is ordered behind (the device's own share of the layer).

- `take_into(structs, *after)`: arrays the host copies into the program's own buffers (`fill`: the handler publishes
  their addresses at launch; the host queues copies on a stream of its own, from pinned host memory or device arrays,
  then a flag write the program's stream waits for). A layer's chosen experts reach its program so, whatever their
  number or place, with no byte crossing twice and no stack of experts to index.

The targets' handlers run when XLA launches the program, not when the stream reaches them: each only queues work
on the stream, and numbers its calls in launch order, which is the order the host sees them. They are compiled at
run time by numba (already ktjax's host-kernel compiler; no C compiler at install), against the XLA FFI C ABI
(`xla/ffi/api/c_api.h`, whose struct layouts are versioned and only grow at their ends). On the CPU backend (the
tests) the same protocol runs with plain copies and a spinning wait.

A program that takes anything back must be launched by another thread than the one that answers (`launch`): a
launch may block on the device midway (XLA reads some loop conditions back), and the device would wait for an
answer the blocked thread never gives.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.extending import intrinsic

# XLA FFI C ABI offsets (64-bit), from xla/ffi/api/c_api.h.
FRAME_EXTENSION, FRAME_API, FRAME_CTX, FRAME_STAGE = 8, 16, 24, 32
FRAME_ARGS, FRAME_RETS = 40 + 32, 80 + 32  # XLA_FFI_Args.args, XLA_FFI_Rets.rets (void**)
FRAME_RETS_SIZE = 80 + 16  # XLA_FFI_Rets.size
BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 16, 24, 32, 40
API_VERSION_MAJOR, API_VERSION_MINOR = 32, 36  # XLA_FFI_Api.api_version.{major,minor}_version
API_ERROR_CREATE, API_STREAM_GET = 48, 80
EXTENSION_TYPE, METADATA_EXTENSION, METADATA = 8, 1, 24  # XLA_FFI_Extension_Base.type; the metadata's pointer
STAGE_EXECUTE = 3
MAX_OUTPUTS = 32  # of a take_into
STAGING_BYTES = 4096  # a `Handoff.stage` slot
ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 4, 12: 8, 16: 2}  # XLA_FFI_DataType

WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*flag - value) >= 0
HOST_ALLOC_FLAGS = 0x01 | 0x02  # CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP

_names = itertools.count()


# ---- raw memory and indirect calls for the handlers (numba intrinsics over LLVM IR) --------------------------------

def _loader(bits: int):
    @intrinsic
    def load(typingctx, addr):
        def codegen(context, builder, signature, args):
            ty = ir.IntType(bits)
            # Atomic (acquire): the flags are written by another thread or the device; never hoisted from a loop.
            value = builder.load_atomic(builder.inttoptr(args[0], ty.as_pointer()), "acquire", bits // 8)
            return builder.sext(value, ir.IntType(64)) if bits < 64 else value
        return types.int64(types.int64), codegen
    return load


def _storer(bits: int):
    @intrinsic
    def store(typingctx, addr, value):
        def codegen(context, builder, signature, args):
            ty = ir.IntType(bits)
            v = builder.trunc(args[1], ty) if bits < 64 else args[1]
            builder.store_atomic(v, builder.inttoptr(args[0], ty.as_pointer()), "release", bits // 8)
            return context.get_dummy_value()
        return types.void(types.int64, types.int64), codegen
    return store


_load32, _load64, _store32, _store64 = _loader(32), _loader(64), _storer(32), _storer(64)


@intrinsic
def _call1(typingctx, fn, a):
    """fn(a) for a C function pointer fn returning a pointer (the FFI API's functions)."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        f = builder.inttoptr(args[0], ir.FunctionType(i64, [i64]).as_pointer())
        return builder.call(f, [args[1]])
    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _call4(typingctx, fn, a, b, c, d):
    """fn(a, b, c, d) for a C function pointer fn returning int32 (the CUDA driver's); 32-bit parameters are passed
    in 64-bit registers, which the SysV ABI allows (the callee reads their low halves)."""
    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        f = builder.inttoptr(args[0], ir.FunctionType(i32, [i64] * 4).as_pointer())
        return builder.sext(builder.call(f, list(args[1:])), i64)
    return types.int64(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def _copy(typingctx, dst, src, n):
    """memcpy(dst, src, n) (the CPU backend's copies)."""
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        builder.call(builder.module.declare_intrinsic("llvm.memcpy", [i8p, i8p, ir.IntType(64)]),
                     [builder.inttoptr(args[0], i8p), builder.inttoptr(args[1], i8p), args[2],
                      ir.Constant(ir.IntType(1), 0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.int64), codegen


# ---- pinned host memory the device can read and write ------------------------------------------------------------

class _Pinned:
    """Page-locked host memory mapped into the device's address space (cuMemHostAlloc), or, on the CPU backend,
    plain numpy memory. `host`: its address here; `device`: the address the device's stream operations take."""

    def __init__(self, nbytes: int, cuda: CudaDriver | None):
        self.cuda = cuda
        if cuda is None:
            self.array = np.zeros(nbytes, np.uint8)
            self.host = self.device = self.array.ctypes.data
            return
        self.host, self.device = cuda.host_alloc(nbytes)
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.host))


class CudaDriver:
    """The CUDA driver functions the handlers queue (their addresses, called from compiled code) and the pinned
    allocation, through libcuda (loaded already by jax's CUDA plugin)."""

    def __init__(self, ordinal: int):
        self.lib = lib = ctypes.CDLL("libcuda.so.1")

        def address(*names: str) -> int:
            for name in names:
                if hasattr(lib, name):
                    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            raise OSError(f"libcuda.so.1 has none of {names}")

        self.wait_value = address("cuStreamWaitValue32_v2", "cuStreamWaitValue32")
        self.write_value = address("cuStreamWriteValue32_v2", "cuStreamWriteValue32")
        self.to_device = address("cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync")
        self.to_host = address("cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync")
        self.ctx, device = ctypes.c_void_p(), ctypes.c_int()
        self.check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(device), ordinal))
        self.check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), device))
        # The host's own stream, for the copies it queues into a program's outputs (`Handoff.fill`).
        self.bind()
        self.stream = ctypes.c_void_p()
        self.check("cuStreamCreate", lib.cuStreamCreate(ctypes.byref(self.stream), 1))  # CU_STREAM_NON_BLOCKING
        self.copy = lib.cuMemcpyAsync
        self.copy.argtypes = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
        self.write = getattr(lib, "cuStreamWriteValue32_v2", None) or lib.cuStreamWriteValue32
        self.write.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)

    def bind(self) -> None:
        """Make the device's primary context (XLA's) current on this thread."""
        self.check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(self.ctx))

    def check(self, what: str, result: int) -> None:
        if result != 0:
            raise RuntimeError(f"CUDA driver: {what} failed (CUresult {result})")

    def host_alloc(self, nbytes: int) -> tuple[int, int]:
        lib = self.lib
        self.bind()
        host, device = ctypes.c_void_p(), ctypes.c_uint64()
        self.check(f"cuMemHostAlloc({nbytes} bytes)",
                   lib.cuMemHostAlloc(ctypes.byref(host), ctypes.c_size_t(nbytes), HOST_ALLOC_FLAGS))
        self.check("cuMemHostGetDevicePointer", lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device), host, 0))
        return host.value, device.value


# ---- the handoff --------------------------------------------------------------------------------------------------

class Handoff:
    """Rings of `slots` pinned slots of `slot_bytes` each, one each way, and the FFI targets that use them (one set
    per instance, registered for the device's platform). Sequence numbers count from 0 in launch order, one count
    per target; the host's side (`receive`, `answer`, `fill`) must take them in the same order."""

    def __init__(self, device, slot_bytes: int, slots: int = 64, timeout_s: float = 30.0):
        import jax

        self.slot_bytes, self.slots, self.timeout_s = slot_bytes, slots, timeout_s
        gpu = device.platform == "gpu"
        self.cuda = CudaDriver(device.local_hardware_id) if gpu else None
        # Flags the stream writes or waits on: handed over (device writes), answered, filled (host writes).
        self.flags = _Pinned(16, self.cuda)
        self.handed, self.answered, self.filled = (self.flags.array[4 * k:4 * k + 4].view(np.uint32) for k in range(3))
        self.counters = np.zeros(3, np.int64)  # launches of each target (hand_over, take_back, take_into)
        self.published = np.zeros(1, np.int64)  # take_into launches whose outputs' addresses are in `outputs`
        self.outputs = np.zeros((slots, MAX_OUTPUTS, 2), np.int64)  # per take_into: each output's address, bytes
        self.scratch = np.zeros(8, np.int64)  # the handlers' argument structs
        self.to_host = _Pinned(slot_bytes * slots, self.cuda)
        self.to_device = _Pinned(slot_bytes * slots, self.cuda)
        self.staging = _Pinned(STAGING_BYTES * slots, self.cuda)
        self.received = self.sent = self.filled_count = self.staged = 0  # the host side's next sequence numbers
        self.launcher = ThreadPoolExecutor(1, thread_name_prefix="ktjax-handoff")
        n = next(_names)
        self.names = {kind: f"ktjax_{kind}_{n}" for kind in ("hand_over", "take_back", "take_into")}
        platform = "CUDA" if gpu else "cpu"
        self._constants: list[np.ndarray] = []  # what the handlers' code points at, kept alive with them
        self._handlers = {kind: _handler(self, kind, self._constants) for kind in self.names}
        for kind, name in self.names.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(self._handlers[kind].address), platform=platform)

    # -- inside programs --
    def hand_over(self, x):
        """Queue x's copy to the host (its next ring slot) and the flag after it; returns a token [1] int32 that
        later work can be ordered behind."""
        import jax
        import jax.numpy as jnp
        return jax.ffi.ffi_call(self.names["hand_over"], jax.ShapeDtypeStruct((1,), jnp.int32),
                                has_side_effect=True)(x)

    def take_back(self, shape, dtype, *after):
        """An array of shape and dtype the host answers (`answer`), read once the arrays `after` are computed and the
        host has answered. `after` must hold the token of the hand-over this answers (where programs run their
        operations as their inputs allow, as XLA:CPU's do, nothing else orders the two)."""
        import jax
        return jax.ffi.ffi_call(self.names["take_back"], jax.ShapeDtypeStruct(shape, dtype),
                                has_side_effect=True)(*after)

    def take_into(self, structs, *after):
        """Arrays (one per jax.ShapeDtypeStruct in structs) that the host copies into itself (`fill`): the device's
        stream goes on once the host's copies have landed, which its own stream queues (from pinned host memory or
        from device arrays), so no byte crosses twice. `after`: as for take_back."""
        import jax
        if len(structs) > MAX_OUTPUTS:
            raise ValueError(f"handoff: take_into of {len(structs)} arrays; at most {MAX_OUTPUTS}")
        return jax.ffi.ffi_call(self.names["take_into"], list(structs), has_side_effect=True)(*after)

    # -- the host's side --
    def launch(self, fn, *args, **kwargs) -> Future:
        """Call fn (a program that takes answers back) on the launching thread."""
        return self.launcher.submit(fn, *args, **kwargs)

    def receive(self, shape, dtype) -> np.ndarray:
        """The next array handed over (waits for its flag): a view of its ring slot, valid until `slots` more."""
        n = self.received
        self._wait(self.handed.ctypes.data, n + 1, "hand-over")
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
        self.answered[0] = np.uint32((m + 1) & 0xFFFFFFFF)

    def stage(self, value: np.ndarray) -> tuple[int, int]:
        """value in the next pinned staging slot, as a source for `fill`: (its address, its bytes)."""
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        if raw.size > STAGING_BYTES:
            raise ValueError(f"handoff: {raw.size} bytes to stage; the slots hold {STAGING_BYTES}")
        slot = (self.staged % self.slots) * STAGING_BYTES
        self.staged += 1
        self.staging.array[slot:slot + raw.size] = raw
        return self.staging.device + slot, raw.size

    def fill(self, sources: list[tuple[int, int]]) -> None:
        """Copy sources ((address, bytes) each: pinned host memory, a device array's buffer, or `stage`'s) into the
        outputs of the next take_into, in order, then let its stream go on once they have landed. Outputs without a
        source keep whatever they held."""
        n = self.filled_count
        self._wait(self.published.ctypes.data, n + 1, "take_into launch")
        outputs = self.outputs[n % self.slots]
        for k, (source, nbytes) in enumerate(sources):
            if nbytes > outputs[k, 1]:
                raise ValueError(f"handoff: a source of {nbytes} bytes for take_into output {k} of {outputs[k, 1]}")
        cuda = self.cuda
        if cuda is not None:
            cuda.bind()
            for (source, nbytes), (dest, _) in zip(sources, outputs):
                cuda.check("cuMemcpyAsync", cuda.copy(int(dest), int(source), nbytes, cuda.stream))
            cuda.check("cuStreamWriteValue32", cuda.write(cuda.stream, self.flags.device + 8, (n + 1) & 0xFFFFFFFF, 0))
        else:
            for (source, nbytes), (dest, _) in zip(sources, outputs):
                ctypes.memmove(int(dest), int(source), nbytes)
            self.filled[0] = np.uint32((n + 1) & 0xFFFFFFFF)
        self.filled_count = n + 1

    def abandon(self, job: Future) -> None:
        """After a failure on the host's side: release every wait the launched program `job` queued, so that the
        device's stream drains (what it reads is garbage), wait for it, and count on from what was launched."""
        released = 0xFFFFFFFF
        while not job.done():  # its launch may still be queueing waits
            for flag, count in ((self.answered, self.counters[1]), (self.filled, self.counters[2])):
                flag[0] = np.uint32((int(count) + (1 << 30)) & released)
            time.sleep(0.001)
        try:
            job.result()
        except Exception:  # noqa: BLE001 - the program's own failure is the caller's to report
            pass
        self.answered[0] = np.uint32(int(self.counters[1]) & released)
        self.filled[0] = np.uint32(int(self.counters[2]) & released)
        self.received, self.sent, self.filled_count = (int(c) for c in self.counters)

    def _wait(self, address: int, target: int, what: str) -> None:
        # Spun in compiled code without the GIL: a Python loop would hold it, and the launching thread, which needs
        # it to make its call, would wait for the interpreter's switch interval (5 ms) each time.
        deadline = time.perf_counter() + self.timeout_s
        while not _spin(address, target & 0xFFFFFFFF, 1 << 20):
            if time.perf_counter() > deadline:
                launched = ", ".join(f"{int(c)} {kind}" for c, kind in zip(self.counters, self.names))
                raise TimeoutError(f"handoff: no {what} numbered {target - 1} within {self.timeout_s:.0f} s "
                                   f"(launched: {launched})")


@njit(nogil=True, cache=True)
def _spin(address, target, tries):
    """Whether the uint32 flag at address reaches target (modulo 2**32) within `tries` reads."""
    for _ in range(tries):
        if ((_load32(address) - target) & 0xFFFFFFFF) < 0x80000000:
            return True
    return False


@njit
def _error(api, scratch, message):
    """An XLA_FFI_Error made by the API's Error_Create (code INTERNAL) with a constant message."""
    _store64(scratch, 28)  # XLA_FFI_Error_Create_Args: struct_size, extension_start, message, errc
    _store64(scratch + 8, 0)
    _store64(scratch + 16, message)
    _store32(scratch + 24, 13)
    return _call1(_load64(api + API_ERROR_CREATE), scratch)


@njit
def _answered_metadata(frame) -> bool:
    """Where XLA asks which FFI version the handler was built for (the metadata extension): the one it runs (the
    layouts used here are the same in every version since 0.1), and no traits (never captured into a CUDA graph)."""
    ext = _load64(frame + FRAME_EXTENSION)
    if ext == 0 or _load32(ext + EXTENSION_TYPE) != METADATA_EXTENSION:
        return False
    api, md = _load64(frame + FRAME_API), _load64(ext + METADATA)
    _store64(md + 8, 24)
    _store64(md + 16, 0)
    _store32(md + 24, _load32(api + API_VERSION_MAJOR))
    _store32(md + 28, _load32(api + API_VERSION_MINOR))
    _store32(md + 32, 0)
    return True


@njit
def _nbytes(buf, item_table):
    """An XLA_FFI_Buffer's size in bytes (-1 for a dtype not in ITEM_BYTES)."""
    code = _load32(buf + BUFFER_DTYPE)
    nbytes = _load64(item_table + 8 * code) if 0 <= code < 32 else 0
    if nbytes == 0:
        return -1
    dims = _load64(buf + BUFFER_DIMS)
    for k in range(_load64(buf + BUFFER_RANK)):
        nbytes *= _load64(dims + 8 * k)
    return nbytes


@njit
def _stream(frame, scratch):
    """The call's CUstream (XLA_FFI_Stream_Get), or 0 with the error in scratch[4]."""
    _store64(scratch, 32)  # XLA_FFI_Stream_Get_Args: struct_size, extension_start, ctx, stream (out)
    _store64(scratch + 8, 0)
    _store64(scratch + 16, _load64(frame + FRAME_CTX))
    _store64(scratch + 32, _call1(_load64(_load64(frame + FRAME_API) + API_STREAM_GET), scratch))
    return 0 if _load64(scratch + 32) != 0 else _load64(scratch + 24)


def _handler(h: Handoff, kind: str, constants: list):
    """The FFI handler of one target (`kind`: hand_over, take_back or take_into), its addresses compiled in as
    constants (the arrays they point into appended to `constants`)."""
    which = ("hand_over", "take_back", "take_into").index(kind)
    over, back = which == 0, which == 1
    counter = h.counters.ctypes.data + 8 * which
    scratch = h.scratch.ctypes.data
    flag_host, flag_device = h.flags.host + 4 * which, h.flags.device + 4 * which
    ring = h.to_host.device if over else h.to_device.device
    published, outputs = h.published.ctypes.data, h.outputs.ctypes.data
    slot_bytes, slots = h.slot_bytes, h.slots
    cuda = h.cuda is not None
    wait_value, write_value, to_device, to_host = ((h.cuda.wait_value, h.cuda.write_value, h.cuda.to_device,
                                                    h.cuda.to_host) if cuda else (0, 0, 0, 0))
    item = np.zeros(32, np.int64)
    for code, size in ITEM_BYTES.items():
        item[code] = size
    messages = {k: np.frombuffer(f"ktjax handoff: {m}\0".encode(), np.uint8) for k, m in (
        ("size", f"an array larger than the {slot_bytes}-byte slots"), ("dtype", "an unsupported dtype"),
        ("cuda", "a CUDA stream operation failed"))}
    size_error, dtype_error, cuda_error = (messages[k].ctypes.data for k in ("size", "dtype", "cuda"))
    constants += [item, *messages.values()]
    item_table = item.ctypes.data

    @cfunc(types.int64(types.int64))
    def handler(frame):
        if _answered_metadata(frame):
            return 0
        if _load32(frame + FRAME_STAGE) != STAGE_EXECUTE:
            return 0
        api = _load64(frame + FRAME_API)
        n = _load64(counter)
        if which == 2:  # take_into: publish the outputs' addresses, then wait for the host's copies
            rets, row = _load64(frame + FRAME_RETS), outputs + (n % slots) * MAX_OUTPUTS * 16
            for r in range(_load64(frame + FRAME_RETS_SIZE)):
                buf = _load64(rets + 8 * r)
                _store64(row + 16 * r, _load64(buf + BUFFER_DATA))
                _store64(row + 16 * r + 8, _nbytes(buf, item_table))
            _store64(counter, n + 1)
            _store64(published, n + 1)
        else:
            buf = _load64(_load64(frame + (FRAME_ARGS if over else FRAME_RETS)))
            nbytes = _nbytes(buf, item_table)
            if nbytes < 0:
                return _error(api, scratch, dtype_error)
            if nbytes > slot_bytes:
                return _error(api, scratch, size_error)
            data = _load64(buf + BUFFER_DATA)
            _store64(counter, n + 1)
            slot = ring + (n % slots) * slot_bytes
        if not cuda:
            if over:
                _copy(slot, data, nbytes)
                _store32(flag_host, n + 1)
                return 0
            while ((_load32(flag_host) - (n + 1)) & 0xFFFFFFFF) >= 0x80000000:
                pass
            if back:
                _copy(data, slot, nbytes)
            return 0
        stream = _stream(frame, scratch)
        if stream == 0:
            return _load64(scratch + 32)
        if over:
            status = _call4(to_host, slot, data, nbytes, stream)
            if status == 0:
                status = _call4(write_value, stream, flag_device, (n + 1) & 0xFFFFFFFF, 0)
        else:
            status = _call4(wait_value, stream, flag_device, (n + 1) & 0xFFFFFFFF, WAIT_GEQ)
            if status == 0 and back:
                status = _call4(to_device, data, slot, nbytes, stream)
        if status != 0:
            return _error(api, scratch, cuda_error)
        return 0

    return handler
