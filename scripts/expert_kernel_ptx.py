"""Check the int8/int4 expert kernels' Triton lowering without a GPU: lower `experts_pallas` for DeepSeek-V3
sizes with jax's Pallas Triton lowering (`lowering_platforms=("cuda",)`, works on a CPU-only jax), write each
kernel's TTIR, and, given a Python with the `triton` package (any machine, no GPU needed), compile them for
sm_90a and report the loads (16-byte cp.async?), the MMA instructions, shared memory, registers and spills.

    python3 scripts/expert_kernel_ptx.py --out /tmp/ttir                                  # TTIR only
    python3 scripts/expert_kernel_ptx.py --out /tmp/ttir --triton-python /tmp/tvenv/bin/python
    (/tmp/tvenv: `python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton`)

The pip Triton is not the one inside XLA (jax 0.11.2 on the H200 compiles with its own), so this is evidence
that the kernels lower and fit, not a guarantee.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

COMPILE = r'''
import re, sys, glob, os
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = [os.path.join(bindir, p) for p in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, p))]
nw, ns = int(sys.argv[2]), int(sys.argv[3])
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.ttir"))):
    try:
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": ns})
    except Exception as e:
        print(os.path.basename(path), "FAILED", str(e).splitlines()[0][:300]); continue
    ptx = k.asm["ptx"]
    open(path + ".ptx", "w").write(ptx)
    c = Counter(re.findall(r"\b(ld\.global(?:\.v\d)?\.b\d+|cp\.async\.c[ag]|mma\.sync|wgmma)", ptx))
    info = ""
    for p in ptxas:
        r = __import__("subprocess").run([p, "-v", "--gpu-name", "sm_90a", path + ".ptx", "-o", os.devnull],
                                         capture_output=True, text=True)
        regs = re.findall(r"Used (\d+) registers", r.stderr); spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
        if regs:
            info = f"registers {regs[0]}, spill stores {spill[0] if spill else '?'} B"; break
    print(f"{os.path.basename(path)}: shared {k.metadata.shared} B, {info}, {dict(c)}")
'''


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="expert_kernel_ttir")
    p.add_argument("--cases", nargs="+", default=["int8,1,1", "int4,1,1", "int8,1,8", "int4,1,8", "int8,32,1",
                                                   "int4,32,1"],
                   help="fmt,C,K (default tiles); fmt,C,K,vec: int4 scales read as contiguous runs "
                        "(Tiles.vector_scales); fmt,C,K,vec|bytes,BK1,BK2: other loop steps")
    p.add_argument("--triton-python", help="a Python with `triton` installed: compile the TTIR for sm_90a")
    args = p.parse_args()
    from jax._src.pallas.triton import lowering, pallas_call_registration as reg

    from ktjax.experts.packed import PackedLayout
    from ktjax.kernels.expert_ffn import default_tiles, experts_pallas

    os.makedirs(args.out, exist_ok=True)
    orig = lowering.lower_jaxpr_to_triton_module
    names: list[str] = []
    tag = [""]

    def capture(*a, **k):
        res = orig(*a, **k)
        name = f"{tag[0]}_{'gate_up' if len(names) % 2 == 0 else 'down'}.ttir"
        with open(os.path.join(args.out, name), "w") as fh:
            fh.write(res.module.operation.get_asm(enable_debug_info=False))
        names.append(name)
        return res

    reg.lowering.lower_jaxpr_to_triton_module = capture
    warps = stages = None
    for case in args.cases:
        fmt, C, K, *more = case.split(",")
        C, K = int(C), int(K)
        lay = PackedLayout(fmt, 2048, 7168)
        vec = bool(more) and more[0] == "vec"
        tiles = dataclasses.replace(default_tiles(fmt, K, C, 2048, 7168), vector_scales=vec)
        if len(more) == 3:  # BK1, BK2
            tiles = dataclasses.replace(tiles, BK1=int(more[1]), BK2=int(more[2]))
        warps, stages = tiles.num_warps, tiles.num_stages
        tag[0] = f"{fmt}_C{C}_K{K}" + ("_vec" if vec else "") + (f"_bk{more[1]}_{more[2]}" if len(more) == 3 else "")
        x = jax.ShapeDtypeStruct((C, 7168), jnp.bfloat16)
        bufs = tuple(jax.ShapeDtypeStruct((lay.nbytes,), jnp.uint8) for _ in range(K))
        wt, acc = jax.ShapeDtypeStruct((C, K), jnp.float32), jax.ShapeDtypeStruct((C, 7168), jnp.float32)
        jax.jit(lambda x, b, w, a: experts_pallas(x, b, w, a, layout=lay, tiles=tiles)).trace(x, bufs, wt, acc).lower(
            lowering_platforms=("cuda",))
        print(f"{case}: lowered, tiles {tiles}", flush=True)
    reg.lowering.lower_jaxpr_to_triton_module = orig
    if args.triton_python:
        subprocess.run([args.triton_python, "-c", COMPILE, args.out, str(warps), str(stages)], check=False)


if __name__ == "__main__":
    sys.exit(main())
