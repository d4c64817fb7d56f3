"""The XLA FFI targets of `handoff.Handoff`, compiled at run time by numba against the XLA FFI C ABI
(`xla/ffi/api/c_api.h`, whose structs are versioned and only grow at their ends), and what they need: raw memory
access and indirect calls (numba intrinsics over LLVM IR), pinned host memory the device maps, and the CUDA driver's
stream memory operations and copies (through libcuda, loaded already by jax's CUDA plugin). No C compiler at install:
numba is already ktjax's host-kernel compiler.

A handler runs when XLA launches its program, not when the stream reaches it: it only queues work on the stream
(on the CPU backend, where there is no stream, it does the work itself: copies, and a spinning wait).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import numpy as np
from llvmlite import ir
from numba import cfunc, njit, types
from numba.extending import intrinsic

if TYPE_CHECKING:
    from ktjax.runtime.offload.handoff import Handoff

# XLA FFI C ABI offsets (64-bit), from xla/ffi/api/c_api.h.
FRAME_EXTENSION, FRAME_API, FRAME_CTX, FRAME_STAGE = 8, 16, 24, 32
FRAME_ARGS, FRAME_RETS = 40 + 32, 80 + 32  # XLA_FFI_Args.args, XLA_FFI_Rets.rets (void**)
FRAME_RETS_SIZE = 80 + 16  # XLA_FFI_Rets.size
BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 16, 24, 32, 40
API_VERSION_MAJOR, API_VERSION_MINOR = 32, 36  # XLA_FFI_Api.api_version.{major,minor}_version
API_ERROR_CREATE, API_STREAM_GET = 48, 80
EXTENSION_TYPE, METADATA_EXTENSION, METADATA = 8, 1, 24  # XLA_FFI_Extension_Base.type; the metadata's pointer
STAGE_EXECUTE = 3
TARGETS = ("hand_over", "take_back", "filled", "filled_first")  # each one's flag at 4 * its index in Handoff.flags
MAX_OUTPUTS = 64  # arrays a hand-over publishes for the host to fill (a MoE layer's: the slots' ids, a stack per leaf)
STAGING_BYTES = 4096  # a `Handoff.stage` slot
ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 4, 12: 8, 16: 2}  # XLA_FFI_DataType
_ITEM_TABLE = np.zeros(32, np.int64)  # ITEM_BYTES as the handlers read it (0: not supported)
_ITEM_TABLE[list(ITEM_BYTES)] = list(ITEM_BYTES.values())

WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*flag - value) >= 0
HOST_ALLOC_FLAGS = 0x01 | 0x02  # CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP

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

class Pinned:
    """Page-locked host memory mapped into the device's address space (cuMemHostAlloc), or, on the CPU backend,
    plain numpy memory. `host`: its address here; `device`: the address the device's stream operations take."""

    def __init__(self, nbytes: int, cuda: CudaDriver | None):
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

        def address(*names: str) -> int:  # of the first name libcuda has (the _v2 entry points where there are)
            for name in names:
                if hasattr(lib, name):
                    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            raise OSError(f"libcuda.so.1 has none of {names}")

        self.wait_value = address("cuStreamWaitValue32_v2", "cuStreamWaitValue32")
        self.write_value = address("cuStreamWriteValue32_v2", "cuStreamWriteValue32")
        self.to_device = address("cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync")
        self.to_host = address("cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync")
        self.on_device = address("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")
        self.copy = address("cuMemcpyAsync")
        self.ctx, device = ctypes.c_void_p(), ctypes.c_int()
        self.check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(device), ordinal))
        self.check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), device))
        # The host's own stream, for the copies it queues into a program's outputs (`Handoff.fill`).
        self.bind()
        self.stream = ctypes.c_void_p()
        self.check("cuStreamCreate", lib.cuStreamCreate(ctypes.byref(self.stream), 1))  # CU_STREAM_NON_BLOCKING

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


@njit(nogil=True, cache=True)
def spin(address, target, tries):
    """Whether the uint32 flag at address reaches target (modulo 2**32) within `tries` reads."""
    for _ in range(tries):
        if _reached(address, target):
            return True
    return False


@njit(nogil=True, cache=True)
def queue_copies(copy, write_value, stream, table, n, flag, value):
    """Queue on `stream` the copies table[k] = (destination, source, bytes), k < n (`copy`: cuMemcpyAsync), then a
    write of value into flag (`write_value`: cuStreamWriteValue32; flag 0: none): one call for a layer's ~10-40
    copies, where ctypes costs microseconds a call. Returns the first failing call's CUresult, or 0."""
    for k in range(n):
        status = _call4(copy, table[k, 0], table[k, 1], table[k, 2], stream)
        if status != 0:
            return status
    return _call4(write_value, stream, flag, value, 0) if flag != 0 else 0


@njit(nogil=True, cache=True)
def queue_fill(copy, write_value, stream, table, first, first_flag, flag, value):
    """`queue_copies` of a fill's first `first` copies with first_flag's write, then of the rest with flag's: one
    call for both parts."""
    status = queue_copies(copy, write_value, stream, table[:first], first, first_flag, value)
    if status != 0:
        return status
    return queue_copies(copy, write_value, stream, table[first:], table.shape[0] - first, flag, value)


@njit(nogil=True, cache=True)
def placed(outputs, copies, table):
    """table[k] = (destination, source, bytes) of copies[k] = (array, byte offset in it, source, bytes), into the
    arrays outputs[a] = (address, bytes). Returns the first copy that does not fit its array, or -1."""
    for k in range(copies.shape[0]):
        a, offset, nbytes = copies[k, 0], copies[k, 1], copies[k, 3]
        if a < 0 or a >= outputs.shape[0] or offset < 0 or offset + nbytes > outputs[a, 1]:
            return k
        table[k, 0] = outputs[a, 0] + offset
        table[k, 1] = copies[k, 2]
        table[k, 2] = nbytes
    return -1


@njit(nogil=True, cache=True)
def _reached(address, target):
    """Whether the uint32 flag at address is at or past target, modulo 2**32 (as CU_STREAM_WAIT_VALUE_GEQ)."""
    return ((_load32(address) - target) & 0xFFFFFFFF) < 0x80000000


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


def compile_handler(h: Handoff, kind: str, constants: list):
    """The FFI handler of one target (`kind`: hand_over, take_back, filled or filled_first), its addresses compiled
    in as constants (the arrays they point into appended to `constants`). filled_first counts nothing: it waits for
    the first part of the fill that the next `filled` call (filled's count) will read."""
    which = TARGETS.index(kind)
    over, back, filled, first = which == 0, which == 1, which == 2, which == 3
    counter = h.counters.ctypes.data + 8 * TARGETS.index("filled" if first else kind)  # filled_first reads filled's
    scratch = h.scratch.ctypes.data
    flag_host, flag_device = h.flags.host + 4 * which, h.flags.device + 4 * which
    ring = h.to_host.device if over else h.to_device.device
    published, outputs = h.published.ctypes.data, h.outputs.ctypes.data
    slot_bytes, slots = h.slot_bytes, h.slots
    cuda = h.cuda is not None
    wait_value, write_value, to_device, to_host, on_device = (
        (h.cuda.wait_value, h.cuda.write_value, h.cuda.to_device, h.cuda.to_host, h.cuda.on_device) if cuda
        else (0, 0, 0, 0, 0))
    messages = {k: np.frombuffer(f"ktjax handoff: {m}\0".encode(), np.uint8) for k, m in (
        ("size", f"an array larger than the {slot_bytes}-byte slots"), ("dtype", "an unsupported dtype"),
        ("cuda", "a CUDA stream operation failed"),
        ("moved", "an array to be filled is not the buffer its hand-over published (XLA copied it between)"))}
    size_error, dtype_error, cuda_error, moved_error = (messages[k].ctypes.data
                                                        for k in ("size", "dtype", "cuda", "moved"))
    constants += messages.values()
    item_table = _ITEM_TABLE.ctypes.data

    @cfunc(types.int64(types.int64))
    def handler(frame):
        if _answered_metadata(frame):
            return 0
        if _load32(frame + FRAME_STAGE) != STAGE_EXECUTE:
            return 0
        api = _load64(frame + FRAME_API)
        n = _load64(counter)
        args, rets, n_rets = _load64(frame + FRAME_ARGS), _load64(frame + FRAME_RETS), _load64(frame + FRAME_RETS_SIZE)
        if filled:  # the arrays its hand-over published, once the host's copies into them have landed
            row = outputs + (n % slots) * MAX_OUTPUTS * 16
            for r in range(n_rets):
                if _load64(_load64(args + 8 * r) + BUFFER_DATA) != _load64(row + 16 * r):
                    return _error(api, scratch, moved_error)
            _store64(counter, n + 1)
        elif not first:
            buf = _load64(args if over else rets)
            nbytes = _nbytes(buf, item_table)
            if nbytes < 0:
                return _error(api, scratch, dtype_error)
            if nbytes > slot_bytes:
                return _error(api, scratch, size_error)
            data = _load64(buf + BUFFER_DATA)
            _store64(counter, n + 1)
            slot = ring + (n % slots) * slot_bytes
            if over and n_rets > 1:  # publish the arrays the host will fill (results after the token)
                p = _load64(published)
                row = outputs + (p % slots) * MAX_OUTPUTS * 16
                for r in range(1, n_rets):
                    out = _load64(rets + 8 * r)
                    _store64(row + 16 * (r - 1), _load64(out + BUFFER_DATA))
                    _store64(row + 16 * (r - 1) + 8, _nbytes(out, item_table))
                _store64(published, p + 1)
        if not cuda:
            if over:
                _copy(slot, data, nbytes)
                _store32(flag_host, n + 1)
                return 0
            while not _reached(flag_host, n + 1):
                pass
            if back:
                _copy(data, slot, nbytes)
            for r in range(n_rets if filled or first else 0):  # where XLA gave the results buffers of their own
                src, dst = _load64(_load64(args + 8 * r) + BUFFER_DATA), _load64(_load64(rets + 8 * r) + BUFFER_DATA)
                if src != dst:
                    _copy(dst, src, _nbytes(_load64(rets + 8 * r), item_table))
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
            for r in range(n_rets if filled or first else 0):
                src, dst = _load64(_load64(args + 8 * r) + BUFFER_DATA), _load64(_load64(rets + 8 * r) + BUFFER_DATA)
                if status == 0 and src != dst:
                    status = _call4(on_device, dst, src, _nbytes(_load64(rets + 8 * r), item_table), stream)
        if status != 0:
            return _error(api, scratch, cuda_error)
        return 0

    return handler
