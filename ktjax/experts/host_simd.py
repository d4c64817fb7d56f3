"""Vector instructions the host-CPU expert kernels (`host_kernels`) need and numba does not emit by
itself, as numba intrinsics: the CPU feature checks that choose them, integer dot products of bytes
(AVX2's pmaddubsw and pmaddwd; AVX-512 VNNI's vpdpbusd), sixteen float16 scales converted at once
(F16C), and the raw pointers and stack buffers the kernels address experts and accumulators through.
LLVM does not find these in plain loops (measured: `host_kernels`' notes, benchmarks/host_experts.md).
"""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _compiles_avx2() -> bool:
    """Whether numba compiles for this CPU and it has AVX2 (every x86 CPU since 2013). Not when numba
    is told to compile for another CPU (NUMBA_CPU_NAME, e.g. `generic` for portable caches)."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    try:
        return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")
    except RuntimeError:  # features unknown on this platform
        return False


# Integer dot products need AVX2; elsewhere int8 activations go through the float kernel (the same
# numbers, `HostExperts`).
INT8_DOTS = _compiles_avx2()


def _compiles_avx512_vnni() -> bool:
    """Whether numba compiles for this CPU and it has AVX-512 with VNNI's byte dot products (Intel since
    Ice Lake / Sapphire Rapids, AMD since Zen 4)."""
    if not INT8_DOTS:
        return False
    features = llvm.get_host_cpu_features().flatten().split(",")
    return all(f in features for f in ("+avx512f", "+avx512bw", "+avx512vnni"))


# int4 weights by int8 activations 64 bytes at a time (`matvec_int4_q8_vnni`) where the CPU has them.
INT4_VNNI = _compiles_avx512_vnni()


@intrinsic
def voidptr(typingctx, address):
    """An integer address as a void pointer, for `numba.carray` over a chosen expert's buffer."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@intrinsic
def stack_f32(typingctx, n):
    """A float32 buffer of literal size n on the stack (registers, once LLVM promotes it)."""
    if not isinstance(n, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=n.literal_value)
    return types.CPointer(types.float32)(n), codegen


_F32x16 = ir.VectorType(ir.FloatType(), 16)


@intrinsic
def scales16(typingctx, out, g0, bits_addr, xs_addr):
    """out[g0:g0+16] = float16 scales (raw bits at bits_addr) * xs[0:16] (float32 at xs_addr): one
    conversion instruction for 16 scales (F16C's vcvtph2ps), where `_f16` takes about ten per scale."""
    def codegen(context, builder, signature, args):
        out_p, g0_v, ba, xa = args
        i16x16, h16 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.HalfType(), 16)
        bits = builder.load(builder.inttoptr(ba, i16x16.as_pointer()), align=2)
        xs = builder.load(builder.inttoptr(xa, _F32x16.as_pointer()), align=4)
        v = builder.fmul(builder.fpext(builder.bitcast(bits, h16), _F32x16), xs)
        builder.store(v, builder.bitcast(builder.gep(out_p, [g0_v]), _F32x16.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(out, g0, bits_addr, xs_addr), codegen


_I8x32, _I16x16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)
_I32x8, _F32x8 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.FloatType(), 8)


def _scaled_dots(builder, acc, unsigned, signed, scale):
    """acc + scale * (8 lanes of 4-byte dot products of `unsigned` (u8) and `signed` (s8) bytes), as
    AVX2's pmaddubsw (pairs to 16 bits), pmaddwd by ones (to 32 bits), a conversion and an FMA."""
    mod = builder.module
    maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(_I16x16, [_I8x32, _I8x32]), "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32x8, [_I16x16, _I16x16]), "llvm.x86.avx2.pmadd.wd")
    fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_F32x8, [_F32x8] * 3), "llvm.fma.v8f32")
    dots = builder.call(maddwd, [builder.call(maddubs, [unsigned, signed]), ir.Constant(_I16x16, [1] * 16)])
    splat = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_F32x8, ir.Undefined), scale, ir.Constant(ir.IntType(32), 0)),
        ir.Constant(_F32x8, ir.Undefined), ir.Constant(_I32x8, [0] * 8))
    return builder.call(fma, [builder.sitofp(dots, _F32x8), splat, acc])


def _load32(builder, address):
    return builder.load(builder.inttoptr(address, _I8x32.as_pointer()), align=1)


@intrinsic
def int4_pair_dots(typingctx, acc, q_addr, xlo_addr, xhi_addr, s_lo, s_hi):
    """acc[0:8] += s_lo * (low nibbles . xlo) + s_hi * (high nibbles . xhi), 8 lanes of partial sums:
    32 packed bytes (a pair of groups) against two groups of 32 int8 activations."""
    def codegen(context, builder, signature, args):
        acc_p, qa, xla, xha, slo, shi = args
        q = _load32(builder, qa)
        acc_v = builder.bitcast(acc_p, _F32x8.as_pointer())
        a = builder.load(acc_v, align=4)
        # Nibbles 0..15 are pmaddubsw's unsigned operand: |pair sums| <= 2 * 15 * 128, no saturation.
        a = _scaled_dots(builder, a, builder.and_(q, ir.Constant(_I8x32, [15] * 32)), _load32(builder, xla), slo)
        a = _scaled_dots(builder, a, builder.lshr(q, ir.Constant(_I8x32, [4] * 32)), _load32(builder, xha), shi)
        builder.store(a, acc_v, align=4)
        return context.get_dummy_value()
    return types.void(acc, q_addr, xlo_addr, xhi_addr, s_lo, s_hi), codegen


@intrinsic
def int8_group_dot(typingctx, acc, q_addr, x_addr, scale):
    """acc[0:8] += scale * (q . x), 8 lanes of partial sums: a group of 32 int8 weights against 32 int8
    activations. pmaddubsw wants one unsigned operand: |q| times x with q's sign (AVX2's psignb, as
    llama.cpp does); |pair sums| <= 2 * 128 * 127 < 2^15, no saturation."""
    def codegen(context, builder, signature, args):
        acc_p, qa, xa, scale_v = args
        psign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I8x32, [_I8x32, _I8x32]),
                                               "llvm.x86.avx2.psign.b")
        q, x = _load32(builder, qa), _load32(builder, xa)
        acc_v = builder.bitcast(acc_p, _F32x8.as_pointer())
        a = _scaled_dots(builder, builder.load(acc_v, align=4), builder.call(psign, [q, q]),
                         builder.call(psign, [x, q]), scale_v)
        builder.store(a, acc_v, align=4)
        return context.get_dummy_value()
    return types.void(acc, q_addr, x_addr, scale), codegen


_I32x16, _F32x4 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.FloatType(), 4)
_I8x64 = ir.VectorType(ir.IntType(8), 64)


@intrinsic
def int4_quad_dots(typingctx, acc, q_addr, x_addr, scales, j):
    """acc[0:16] += per lane, scale of its group * a 4-byte dot product: 64 packed bytes (groups 4j..4j+3:
    low nibbles 4j and 4j+2, high 4j+1 and 4j+3) against those groups' 128 int8 activations, scales[4j..4j+3].

    AVX-512 VNNI's vpdpbusd (unsigned nibble times signed activation, four products summed into each of 16
    int32 lanes, no saturation) does in one instruction what AVX2 needs pmaddubsw and pmaddwd for, over twice
    the bytes. Lanes 0-7 hold one group, 8-15 another."""
    def codegen(context, builder, signature, args):
        acc_p, qa, xa, scales_p, j_v = args
        mod = builder.module
        # The <16 x i32> form: what older LLVMs declare, and newer ones upgrade.
        dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32x16, [_I32x16] * 3), "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_F32x16, [_F32x16] * 3), "llvm.fma.v16f32")
        q = builder.load(builder.inttoptr(qa, _I8x64.as_pointer()), align=1)
        x0 = builder.load(builder.inttoptr(xa, _I8x64.as_pointer()), align=1)  # groups 4j, 4j+1
        x1 = builder.load(builder.inttoptr(builder.add(xa, ir.Constant(ir.IntType(64), 64)), _I8x64.as_pointer()),
                          align=1)  # groups 4j+2, 4j+3
        i32 = ir.IntType(32)
        x_lo = builder.shuffle_vector(x0, x1, ir.Constant(ir.VectorType(i32, 64), list(range(32)) + list(range(64, 96))))
        x_hi = builder.shuffle_vector(x0, x1, ir.Constant(ir.VectorType(i32, 64), list(range(32, 64)) + list(range(96, 128))))
        lo = builder.and_(q, ir.Constant(_I8x64, [15] * 64))
        hi = builder.lshr(q, ir.Constant(_I8x64, [4] * 64))
        zero = ir.Constant(_I32x16, [0] * 16)
        d_lo = builder.call(dpbusd, [zero, builder.bitcast(lo, _I32x16), builder.bitcast(x_lo, _I32x16)])
        d_hi = builder.call(dpbusd, [zero, builder.bitcast(hi, _I32x16), builder.bitcast(x_hi, _I32x16)])
        s_ptr = builder.gep(scales_p, [builder.mul(j_v, ir.Constant(j_v.type, 4))])
        s4 = builder.load(builder.bitcast(s_ptr, _F32x4.as_pointer()), align=4)
        s_lo = builder.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(i32, 16), [0] * 8 + [2] * 8))
        s_hi = builder.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(i32, 16), [1] * 8 + [3] * 8))
        acc_v = builder.bitcast(acc_p, _F32x16.as_pointer())
        a = builder.load(acc_v, align=4)
        a = builder.call(fma, [builder.sitofp(d_lo, _F32x16), s_lo, a])
        a = builder.call(fma, [builder.sitofp(d_hi, _F32x16), s_hi, a])
        builder.store(a, acc_v, align=4)
        return context.get_dummy_value()
    return types.void(acc, q_addr, x_addr, scales, j), codegen
