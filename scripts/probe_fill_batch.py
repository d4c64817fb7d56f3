"""Would one batched driver call queue a handoff layer's fill faster than its copies one by one? `Handoff.fill`
queues one `cuMemcpyAsync` per copy: the slots' ids, then each of the device's experts (one packed buffer each,
`experts.packed`), resident ones device to device as the fill's first part, the link's from pinned host memory as
the rest, a flag written after each part. The fill took 0.07-0.10 ms of a ~2.1 ms int4 layer on the host CPU's path
(offload.md run 73). CUDA 12.8 added `cuMemcpyBatchAsync` (13.0's `_v2` drops its failIdx argument): a list of
copies in one call.

Timed on the host's thread, the stream drained between calls: one layer's fill queued (a) as `Handoff._queue` does
(`queue_fill`: a compiled loop of cuMemcpyAsync) and (b) by one compiled call that queues a batch per part
(`queue_fill_batched` below: each part's copies as three arrays, one CUmemcpyAttributes reading the sources in stream
order), each part followed by its flag's write; and on the device's clock (events around the queued copies) whether
the batch lands later. Medians of --reps calls, (a) again last.

Run 74 (offload.md, an H100 machine): the batch saved nothing. Five copies (2 resident and 2 link experts) took 34.9
against 29.2-36.2 us one by one, five (3 and 1) 37.3 against 28.3-28.5, nine 69.2 against 57.2-59.9; the copies
landed as late. `fill` stays one call a copy.

    python3 scripts/probe_fill_batch.py [--reps 200] [--resident 2] [--link 2] [--expert-bytes 26148864]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ktjax.runtime.offload.handoff_targets import CudaDriver, Pinned, _call4, queue_fill

# CUmemcpyAttributes (srcAccessOrder CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, no location hints, no flags: 24 bytes), then
# the batch's attrsIdxs [0] (these attributes for all its copies).
ATTRIBUTES = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.int32)


@intrinsic
def _call8(typingctx, fn, a, b, c, d, e, f, g, h):
    """fn(a, ..., h) for a C function pointer returning int32 (as `handoff_targets._call4`)."""
    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        function = builder.inttoptr(args[0], ir.FunctionType(i32, [i64] * 8).as_pointer())
        return builder.sext(builder.call(function, list(args[1:])), i64)
    return types.int64(*[types.int64] * 9), codegen


@njit(nogil=True)
def queue_fill_batched(copy_batch, write_value, stream, table, first, first_flag, flag, value, attributes):
    """`queue_fill` with each part's copies in one call of cuMemcpyBatchAsync_v2 (`copy_batch`), then its flag."""
    n = table.shape[0]
    columns = np.empty((3, max(n, 1)), np.int64)  # the destinations, the sources and the sizes, each contiguous
    columns[:, :n] = table.T
    for lo, hi, target in ((0, first, first_flag), (first, n, flag)):
        if hi > lo:
            address, step = columns.ctypes.data + 8 * lo, 8 * columns.shape[1]
            status = _call8(copy_batch, address, address + step, address + 2 * step, hi - lo, attributes,
                            attributes + 24, 1, stream)
            if status != 0:
                return status
        if target != 0:
            status = _call4(write_value, stream, target, value, 0)
            if status != 0:
                return status
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--resident", type=int, default=2)
    p.add_argument("--link", type=int, default=2)
    p.add_argument("--expert-bytes", type=int, default=26148864, help="an int4 expert of DeepSeek-V3, packed")
    args = p.parse_args()
    device = jax.devices()[0]
    cuda = CudaDriver(device.local_hardware_id)
    lib = cuda.lib
    n_exp, nb = args.resident + args.link, args.expert_bytes
    slots = jnp.zeros(n_exp * nb, jnp.uint8, device=device)  # a program's stack of slots
    resident = [jnp.ones(nb, jnp.uint8, device=device) for _ in range(args.resident)]
    host = [Pinned(nb, cuda) for _ in range(args.link)]
    ids_dev, ids_host = jnp.zeros(64, jnp.uint8, device=device), Pinned(64, cuda)
    flags = Pinned(8, cuda)
    jax.block_until_ready([slots, ids_dev, *resident])
    sources = [r.unsafe_buffer_pointer() for r in resident] + [h.host for h in host]
    table = np.array([(ids_dev.unsafe_buffer_pointer(), ids_host.host, 64)]
                     + [(slots.unsafe_buffer_pointer() + j * nb, src, nb) for j, src in enumerate(sources)], np.int64)
    first = 1 + args.resident
    flag0, flag1 = flags.device, flags.device + 4
    batch = getattr(lib, "cuMemcpyBatchAsync_v2", None)  # CUDA 13's signature: no failIdx
    print(f"libcuda: cuMemcpyBatchAsync_v2 {'found' if batch else 'missing'}")
    batch = ctypes.cast(batch, ctypes.c_void_p).value if batch else 0

    def one_by_one():
        cuda.bind()
        cuda.check("queue_fill", queue_fill(cuda.copy, cuda.write_value, cuda.stream.value, table, first, flag0,
                                            flag1, 7))

    def batched():
        cuda.bind()
        cuda.check("queue_fill_batched", queue_fill_batched(batch, cuda.write_value, cuda.stream.value, table, first,
                                                            flag0, flag1, 7, ATTRIBUTES.ctypes.data))

    start, end = ctypes.c_void_p(), ctypes.c_void_p()
    cuda.check("cuEventCreate", lib.cuEventCreate(ctypes.byref(start), 0))
    cuda.check("cuEventCreate", lib.cuEventCreate(ctypes.byref(end), 0))

    def timed(fn):
        host_s, device_ms = [], []
        for _ in range(args.reps + 3):
            cuda.check("cuStreamSynchronize", lib.cuStreamSynchronize(cuda.stream))
            cuda.check("cuEventRecord", lib.cuEventRecord(start, cuda.stream))
            t = time.perf_counter()
            fn()
            host_s.append(time.perf_counter() - t)
            cuda.check("cuEventRecord", lib.cuEventRecord(end, cuda.stream))
            cuda.check("cuEventSynchronize", lib.cuEventSynchronize(end))
            ms = ctypes.c_float()
            cuda.check("cuEventElapsedTime", lib.cuEventElapsedTime(ctypes.byref(ms), start, end))
            device_ms.append(ms.value)
        return statistics.median(host_s[3:]) * 1e6, statistics.median(device_ms[3:])

    results = [("cuMemcpyAsync one by one (queue_fill)", *timed(one_by_one))]
    if batch:
        results.append(("a cuMemcpyBatchAsync_v2 call per part", *timed(batched)))
        results.append(("cuMemcpyAsync one by one, again", *timed(one_by_one)))
    print(f"{device.device_kind}: {len(table)} copies (the ids, {args.resident} resident and {args.link} link experts "
          f"of {nb} bytes), median of {args.reps}")
    print("| how | host thread | queued to landed (device) |")
    print("| --- | ---: | ---: |")
    for what, us, ms in results:
        print(f"| {what} | {us:.1f} us | {ms:.3f} ms |")


if __name__ == "__main__":
    main()
