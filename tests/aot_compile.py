"""Ahead-of-time compilation of every kernel variant for sm_80/sm_89/sm_90 on a CPU-only machine.

Run as a script in a process where TRITON_INTERPRET is unset. Prints one JSON object per line:
{"kernel", "arch", "variant", "registers", "spill_bytes"} read from Triton's bundled ptxas -v.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 89, 90)
DTYPES = ("fp32", "fp16", "bf16")


def lif_variants():
    from fastsnn.kernels import lif

    base = {"N": "i64", "tau": "fp32", "v_threshold": "fp32", "v_reset": "fp32"}
    for dtype, neuron, hard in itertools.product(DTYPES, (0, 1, 2), (True, False)):
        sig = {"p_x": f"*{dtype}", "p_s": f"*{dtype}", "p_v0": "*fp32", "p_vT": "*fp32", **base,
               "has_v_init": "i32", "store_v": "i32", "T": "constexpr", "NEURON": "constexpr",
               "HARD_RESET": "constexpr", "BLOCK": "constexpr"}
        const = {"T": 4, "NEURON": neuron, "HARD_RESET": hard, "BLOCK": lif.FWD_BLOCK}
        yield "_lif_fwd_kernel", sig, const, lif.FWD_WARPS
    for dtype, neuron, hard, surrogate, detach in itertools.product(DTYPES, (0, 1, 2), (True, False), range(4),
                                                                     (True, False)):
        sig = {"p_x": f"*{dtype}", "p_gs": f"*{dtype}", "p_v0": "*fp32", "p_gvT": "*fp32", "p_gx": f"*{dtype}",
               "p_gv0": "*fp32", **base, "alpha": "fp32", "has_v_init": "i32", "has_grad_v": "i32",
               "T": "constexpr", "CHUNK": "constexpr", "NEURON": "constexpr", "HARD_RESET": "constexpr",
               "SURROGATE": "constexpr", "DETACH_RESET": "constexpr", "BLOCK": "constexpr"}
        # T = 2 * MAX_CHUNK exercises the chunked recompute path at the largest register footprint
        T = 2 * lif.MAX_CHUNK
        const = {"T": T, "CHUNK": lif.chunk_for(T), "NEURON": neuron, "HARD_RESET": hard, "SURROGATE": surrogate,
                 "DETACH_RESET": detach, "BLOCK": lif.BWD_BLOCK}
        yield "_lif_bwd_kernel", sig, const, lif.BWD_WARPS


KERNEL_MODULES = {"_lif_fwd_kernel": "fastsnn.kernels.lif", "_lif_bwd_kernel": "fastsnn.kernels.lif"}
VARIANT_SOURCES = [lif_variants]


def compile_one(job):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    name, sig, const, warps, arch = job
    kernel = getattr(importlib.import_module(KERNEL_MODULES[name]), name)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch == 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    variant = {k: v for k, v in const.items()} | {"dtype": sig["p_x"].lstrip("*")}
    return {"kernel": name, "arch": f"sm_{arch}", "variant": variant, "registers": registers, "spill_bytes": spills}


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_compile: unset TRITON_INTERPRET; the interpreter cannot compile kernels")
    only = set(argv)
    jobs = [(name, sig, const, warps, arch)
            for source in VARIANT_SOURCES for name, sig, const, warps in source()
            for arch in ARCHS if not only or name in only]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for row in pool.map(compile_one, jobs, chunksize=4):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
