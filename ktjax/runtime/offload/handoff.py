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
BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 16, 24, 32, 40
API_VERSION_MAJOR, API_VERSION_MINOR = 32, 36  # XLA_FFI_Api.api_version.{major,minor}_version
API_ERROR_CREATE, API_STREAM_GET = 48, 80
EXTENSION_TYPE, METADATA_EXTENSION, METADATA = 8, 1, 24  # XLA_FFI_Extension_Base.type; the metadata's pointer
STAGE_EXECUTE = 3
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
        self.ordinal = ordinal

        def address(*names: str) -> int:
            for name in names:
                if hasattr(lib, name):
                    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            raise OSError(f"libcuda.so.1 has none of {names}")

        self.wait_value = address("cuStreamWaitValue32_v2", "cuStreamWaitValue32")
        self.write_value = address("cuStreamWriteValue32_v2", "cuStreamWriteValue32")
        self.to_device = address("cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync")
        self.to_host = address("cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync")

    def check(self, what: str, result: int) -> None:
        if result != 0:
            raise RuntimeError(f"CUDA driver: {what} failed (CUresult {result})")

    def host_alloc(self, nbytes: int) -> tuple[int, int]:
        lib, ctx = self.lib, ctypes.c_void_p()
        self.check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self.ordinal))
        self.check("cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(ctx))
        try:
            host, device = ctypes.c_void_p(), ctypes.c_uint64()
            self.check(f"cuMemHostAlloc({nbytes} bytes)",
                       lib.cuMemHostAlloc(ctypes.byref(host), ctypes.c_size_t(nbytes), HOST_ALLOC_FLAGS))
            self.check("cuMemHostGetDevicePointer", lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device), host, 0))
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        return host.value, device.value


# ---- the handoff --------------------------------------------------------------------------------------------------

class Handoff:
    """Rings of `slots` pinned slots of `slot_bytes` each, one each way, and the FFI targets that use them (one pair
    per instance, registered for device's platform). Sequence numbers count from 0 in launch order; the host's
    side (`receive`, `answer`) must take them in the same order."""

    def __init__(self, device, slot_bytes: int, slots: int = 64, timeout_s: float = 30.0):
        import jax

        self.slot_bytes, self.slots, self.timeout_s = slot_bytes, slots, timeout_s
        gpu = device.platform == "gpu"
        self.cuda = CudaDriver(device.local_hardware_id) if gpu else None
        # Flags: [handed over (device writes), answered (host writes)]; counters: launches of each target.
        self.flags = _Pinned(8, self.cuda)
        self.counters = np.zeros(2, np.int64)
        self.scratch = np.zeros(8, np.int64)  # the handlers' argument structs
        self.to_host = _Pinned(slot_bytes * slots, self.cuda)
        self.to_device = _Pinned(slot_bytes * slots, self.cuda)
        self.handed = self.flags.array[:4].view(np.uint32)
        self.answered = self.flags.array[4:].view(np.uint32)
        self.received = self.sent = 0  # the host side's next sequence numbers
        self.launcher = ThreadPoolExecutor(1, thread_name_prefix="ktjax-handoff")
        n = next(_names)
        self.over_name, self.back_name = f"ktjax_hand_over_{n}", f"ktjax_take_back_{n}"
        platform = "CUDA" if gpu else "cpu"
        self._constants: list[np.ndarray] = []  # what the handlers' code points at, kept alive with them
        self._handlers = [_handler(self, over, self._constants) for over in (True, False)]
        for name, h in zip((self.over_name, self.back_name), self._handlers):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(h.address), platform=platform)

    # -- inside programs --
    def hand_over(self, x):
        """Queue x's copy to the host (its next ring slot) and the flag after it; returns a token [1] int32 that
        later work can be ordered behind."""
        import jax
        import jax.numpy as jnp
        return jax.ffi.ffi_call(self.over_name, jax.ShapeDtypeStruct((1,), jnp.int32), has_side_effect=True)(x)

    def take_back(self, shape, dtype, *after):
        """An array of shape and dtype the host answers (`answer`), read once the arrays `after` are computed and the
        host has answered. `after` must hold the token of the hand-over this answers (where programs run their
        operations as their inputs allow, as XLA:CPU's do, nothing else orders the two)."""
        import jax
        return jax.ffi.ffi_call(self.back_name, jax.ShapeDtypeStruct(shape, dtype), has_side_effect=True)(*after)

    # -- the host's side --
    def launch(self, fn, *args, **kwargs) -> Future:
        """Call fn (a program that takes answers back) on the launching thread."""
        return self.launcher.submit(fn, *args, **kwargs)

    def receive(self, shape, dtype) -> np.ndarray:
        """The next array handed over (waits for its flag): a view of its ring slot, valid until `slots` more."""
        n = self.received
        self._wait(self.handed, n + 1, "a hand-over")
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

    def abandon(self, job: Future) -> None:
        """After a failure on the host's side: release every wait the launched program `job` queued, so that the
        device's stream drains (the answers it reads are garbage), wait for it, and count on from what was
        launched."""
        released = 0xFFFFFFFF
        while not job.done():  # its launch may still be queueing waits
            self.answered[0] = np.uint32((int(self.counters[1]) + (1 << 30)) & released)
            time.sleep(0.001)
        try:
            job.result()
        except Exception:  # noqa: BLE001 - the program's own failure is the caller's to report
            pass
        self.answered[0] = np.uint32(int(self.counters[1]) & released)
        self.received, self.sent = int(self.counters[0]), int(self.counters[1])

    def _wait(self, flag: np.ndarray, target: int, what: str) -> None:
        # Spun in compiled code without the GIL: a Python loop would hold it, and the launching thread, which needs
        # it to make its call, would wait for the interpreter's switch interval (5 ms) each time.
        deadline = time.perf_counter() + self.timeout_s
        address = flag.ctypes.data
        while not _spin(address, target & 0xFFFFFFFF, 1 << 20):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"handoff: no {what} numbered {target - 1} within {self.timeout_s:.0f} s "
                                   f"(launched: {int(self.counters[0])} hand-overs, {int(self.counters[1])} "
                                   f"take-backs)")


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


def _handler(h: Handoff, over: bool, constants: list):
    """The FFI handler of one target (hand_over where `over`, else take_back), its addresses compiled in as
    constants (the arrays they point into appended to `constants`)."""
    counter = h.counters.ctypes.data + (0 if over else 8)
    scratch = h.scratch.ctypes.data
    flag_host = h.flags.host + (0 if over else 4)
    flag_device = h.flags.device + (0 if over else 4)
    ring = h.to_host.device if over else h.to_device.device
    slot_bytes, slots = h.slot_bytes, h.slots
    cuda = h.cuda is not None
    if cuda:
        wait_value, write_value = h.cuda.wait_value, h.cuda.write_value
        to_device, to_host = h.cuda.to_device, h.cuda.to_host
    else:
        wait_value = write_value = to_device = to_host = 0
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
        api = _load64(frame + FRAME_API)
        ext = _load64(frame + FRAME_EXTENSION)
        if ext != 0 and _load32(ext + EXTENSION_TYPE) == METADATA_EXTENSION:
            # XLA asks which FFI version the handler was built for: the one it runs (the layouts used here are
            # the same in every version since 0.1), no traits (never captured into a CUDA graph).
            md = _load64(ext + METADATA)
            _store64(md + 8, 24)
            _store64(md + 16, 0)
            _store32(md + 24, _load32(api + API_VERSION_MAJOR))
            _store32(md + 28, _load32(api + API_VERSION_MINOR))
            _store32(md + 32, 0)
            return 0
        if _load32(frame + FRAME_STAGE) != STAGE_EXECUTE:
            return 0
        buf = _load64(_load64(frame + (FRAME_ARGS if over else FRAME_RETS)))
        code = _load32(buf + BUFFER_DTYPE)
        size = _load64(item_table + 8 * code) if 0 <= code < 32 else 0
        if size == 0:
            return _error(api, scratch, dtype_error)
        rank, dims = _load64(buf + BUFFER_RANK), _load64(buf + BUFFER_DIMS)
        nbytes = size
        for k in range(rank):
            nbytes *= _load64(dims + 8 * k)
        if nbytes > slot_bytes:
            return _error(api, scratch, size_error)
        data = _load64(buf + BUFFER_DATA)
        n = _load64(counter)
        _store64(counter, n + 1)
        slot = ring + (n % slots) * slot_bytes
        if not cuda:
            if over:
                _copy(slot, data, nbytes)
                _store32(flag_host, n + 1)
            else:
                while ((_load32(flag_host) - (n + 1)) & 0xFFFFFFFF) >= 0x80000000:
                    pass
                _copy(data, slot, nbytes)
            return 0
        _store64(scratch, 32)  # XLA_FFI_Stream_Get_Args: struct_size, extension_start, ctx, stream (out)
        _store64(scratch + 8, 0)
        _store64(scratch + 16, _load64(frame + FRAME_CTX))
        err = _call1(_load64(api + API_STREAM_GET), scratch)
        if err != 0:
            return err
        stream = _load64(scratch + 24)
        if over:
            status = _call4(to_host, slot, data, nbytes, stream)
            if status == 0:
                status = _call4(write_value, stream, flag_device, (n + 1) & 0xFFFFFFFF, 0)
        else:
            status = _call4(wait_value, stream, flag_device, (n + 1) & 0xFFFFFFFF, WAIT_GEQ)
            if status == 0:
                status = _call4(to_device, data, slot, nbytes, stream)
        if status != 0:
            return _error(api, scratch, cuda_error)
        return 0

    return handler
