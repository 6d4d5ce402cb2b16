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


INT_ARGS = {"N": "i64", "n": "i64", "stride_xt": "i64", "T": "i32", "B": "i32", "C": "i32", "stride_zt": "i64", "stride_zb": "i64",
            "stride_ub": "i64", "has_v_init": "i32", "store_v": "i32", "has_grad_v": "i32"}


def signature(kernel, const, dtype, fp32_pointers=(), int_pointers=()):
    """Triton signature of `kernel`: pointers `p_*` of `dtype` unless named as fp32/int64, scalars from INT_ARGS
    or fp32, constexprs for the names in `const`."""
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in fp32_pointers:
            sig[name] = "*fp32"
        elif name in int_pointers:
            sig[name] = "*i64"
        elif name.startswith("p_"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = INT_ARGS.get(name, "fp32")
    return sig


def lif_variants():
    from fastsnn.kernels import lif

    for dtype, neuron, hard in itertools.product(DTYPES, (0, 1, 2), (True, False)):
        const = {"T": 4, "NEURON": neuron, "HARD_RESET": hard, "BLOCK": lif.FWD_BLOCK}
        sig = signature(lif._lif_fwd_kernel, const, dtype, ("p_v0", "p_vT"))
        yield "_lif_fwd_kernel", sig, const, {"num_warps": lif.FWD_WARPS}
    for dtype, neuron, hard, surrogate, detach in itertools.product(DTYPES, (0, 1, 2), (True, False), range(4),
                                                                     (True, False)):
        # T = 2 * MAX_CHUNK exercises the chunked recompute path at the largest register footprint
        T = 2 * lif.MAX_CHUNK
        const = {"T": T, "CHUNK": lif.chunk_for(T), "NEURON": neuron, "HARD_RESET": hard, "SURROGATE": surrogate,
                 "DETACH_RESET": detach, "BLOCK": lif.BWD_BLOCK}
        sig = signature(lif._lif_bwd_kernel, const, dtype, ("p_v0", "p_gvT", "p_gv0"))
        yield "_lif_bwd_kernel", sig, const, {"num_warps": lif.BWD_WARPS}


def tser_loss_variants():
    from fastsnn.kernels import tser_loss

    # the blocks of C=1000 (one block per row) and C=32768 (many blocks per row)
    blocks = [tser_loss.block_for(1000), tser_loss.block_for(32768)]
    for dtype, (block_c, warps), ts_ce, ts_kl, ent, grad in itertools.product(
            DTYPES, blocks, *[(True, False)] * 4):
        const = {"BLOCK_C": block_c, "TS_CE": ts_ce, "TS_KL": ts_kl, "HAS_ENT": ent, "COMPUTE_GRAD": grad}
        sig = signature(tser_loss._tser_loss_fwd_kernel, const, dtype, ("p_terms", "p_stats"), ("p_y",))
        yield "_tser_loss_fwd_kernel", sig, const, {"num_warps": warps, "maxnreg": tser_loss.MAXNREG}
    for dtype in DTYPES:
        const = {"BLOCK": tser_loss.SCALE_BLOCK}
        sig = signature(tser_loss._scale_grad_kernel, const, dtype, ("p_go",))
        yield "_scale_grad_kernel", sig, const, {"num_warps": 4}


KERNEL_MODULES = {"_lif_fwd_kernel": "fastsnn.kernels.lif", "_lif_bwd_kernel": "fastsnn.kernels.lif",
                  "_tser_loss_fwd_kernel": "fastsnn.kernels.tser_loss",
                  "_scale_grad_kernel": "fastsnn.kernels.tser_loss"}
VARIANT_SOURCES = [lif_variants, tser_loss_variants]


def compile_one(job):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    name, sig, const, options, arch = job
    kernel = getattr(importlib.import_module(KERNEL_MODULES[name]), name)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch == 90 else ""
        # the flags Triton's own make_cubin passes, so the figures are those of the kernel that runs
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", ptx,
                              "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    first_pointer = next(v for v in sig.values() if v.startswith("*"))
    variant = dict(const) | {"dtype": first_pointer.lstrip("*")}
    return {"kernel": name, "arch": f"sm_{arch}", "variant": variant, "registers": registers, "spill_bytes": spills}


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_compile: unset TRITON_INTERPRET; the interpreter cannot compile kernels")
    only = set(argv)
    jobs = [(name, sig, const, options, arch)
            for source in VARIANT_SOURCES for name, sig, const, options in source()
            for arch in ARCHS if not only or name in only]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for row in pool.map(compile_one, jobs, chunksize=4):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
