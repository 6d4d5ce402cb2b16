"""Ahead-of-time compilation of every kernel variant for sm_80/sm_89/sm_90 on a CPU-only machine, specialised
exactly as Triton's JIT specialises a real launch.

Each variant is a real call of a launcher in fastsnn.kernels on CPU tensors: the kernel launch is captured
instead of run, bound by Triton's own binder (the JIT's specialisation: 16-byte-aligned pointers and
integers divisible by 16 get tt.divisibility=16, launch options such as num_warps and maxnreg are parsed
as the JIT parses them), and compiled with triton.compile. Each variant is compiled twice: with aligned
tensors and sizes divisible by 16 (the common case), and unaligned (offset pointers, odd sizes).

Run as a script in a process where TRITON_INTERPRET is unset:
    python tests/aot_compile.py [kernel names...] [--arch 90] [--aligned-only] [--dtype fp16]
(unaligned variants compile for sm_90 only unless --unaligned-archs says otherwise).
Prints one JSON object per line: kernel, arch, aligned, variant, registers, spill_bytes, global loads and
stores by width in bits ({"128": 2, "32": 1}), the SASS instruction count, shared memory and occupancy;
then, for the LIF kernels, one {"kernel", ..., "instructions_per_element_step"} line per variant: the
marginal SASS cost of one more timestep per element (see element_step_costs).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import torch

ARCHS = (80, 89, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _tensor(shape, dtype, aligned, device="cpu"):
    """A tensor of `shape` whose data pointer is 16-byte aligned, or deliberately one element off."""
    numel = 1
    for size in shape:
        numel *= size
    if aligned:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.zeros(numel + 1, dtype=dtype, device=device)[1:].view(shape)


# ---- variants: (kernel name, labels, T for an elementwise-over-time kernel or None, a call of the launcher
#      that launches that kernel) ----

def lif_variants(aligned: bool):
    """Forward at T = 4 and 8 (one chunk: the difference is the cost of 4 more steps); backward at T = 16 (two
    chunks, the second restarting from a checkpoint) for every option, and at T = 4 and 8 for the atan,
    detach_reset=True options (for the per-step cost)."""
    from fastsnn.kernels import lif
    from fastsnn.spec import NeuronSpec

    N = 4096 if aligned else 4095
    kinds, resets = ("if", "lif", "lif_no_decay", "plif", "plif_no_decay"), (0.0, None)
    for dtype_name, kind, v_reset, T in itertools.product(DTYPES, kinds, resets, (4, 8)):
        spec = NeuronSpec(kind, 2.0, 1.0, v_reset)

        def call(T=T, dtype=DTYPES[dtype_name], spec=spec):
            x = _tensor((T, N), dtype, aligned)
            lif.lif_forward(x, torch.empty_like(x), None, None, None, spec, _rate(spec))
        yield "_lif_fwd_kernel", dict(dtype=dtype_name, T=T, kind=kind, hard_reset=v_reset is not None), T, call
    backward = [(T, s, d) for T in (2 * lif.MAX_CHUNK,) for s in lif.SURROGATE_CODES for d in (True, False)]
    backward += [(4, "atan", True), (8, "atan", True)]
    for dtype_name, kind, v_reset, (T, surrogate, detach) in itertools.product(DTYPES, kinds, resets, backward):
        if kind.startswith("plif") and surrogate != "atan":  # the surrogates' arithmetic: the LIF variants have it
            continue
        spec = NeuronSpec(kind, 2.0, 1.0, v_reset, surrogate, 2.0, detach)

        def call(T=T, dtype=DTYPES[dtype_name], spec=spec):
            x = _tensor((T, N), dtype, aligned)
            n = lif.checkpoints_for(T)
            checkpoints = _tensor((n, N), torch.float32, aligned) if n else None
            lif.lif_backward(x, torch.empty_like(x), None, checkpoints, None, torch.empty_like(x), None, spec,
                             rate=_rate(spec))
        yield "_lif_bwd_kernel", dict(dtype=dtype_name, T=T, kind=kind, hard_reset=v_reset is not None,
                                      surrogate=surrogate, detach_reset=detach), T, call


def _rate(spec):
    """A parametric neuron's rate k (one fp32 element); None for the others."""
    return torch.full((), 0.5) if spec.parametric else None


def element_step_costs(rows) -> list[dict]:
    """SASS instructions per element per timestep of the elementwise-over-time kernels, read as the marginal
    cost of 4 more timesteps in one chunk: (instructions at T=8 − at T=4) / (4 · elements per thread)."""
    by_key = {}
    for r in rows:
        if "elements_per_thread" in r and r["variant"]["T"] in (4, 8):
            others = json.dumps({k: v for k, v in r["variant"].items() if k != "T"})
            key = (r["kernel"], r["arch"], r["aligned"], others)
            by_key.setdefault(key, {})[r["variant"]["T"]] = r
    costs = []
    for (kernel, arch, aligned, variant), pair in sorted(by_key.items()):
        if 4 in pair and 8 in pair:
            extra = pair[8]["sass_instructions"] - pair[4]["sass_instructions"]
            costs.append({"kernel": kernel, "arch": arch, "aligned": aligned, "variant": json.loads(variant),
                          "instructions_per_element_step": round(extra / (4 * pair[8]["elements_per_thread"]), 2)})
    return costs


def tser_loss_variants(aligned: bool):
    from fastsnn.kernels import tser_loss as k

    B = 256 if aligned else 255
    for dtype_name, C, (ts_ce, ts_kl), lam in itertools.product(
            DTYPES, (100, 1000, 1024, 5000), ((True, True), (False, True), (True, False), (False, False)),
            (0.0, 0.01)):
        T = 4
        dtype = DTYPES[dtype_name]
        C_run = C if aligned else C + 1

        def buffers(T=T, dtype=dtype, C_run=C_run, ts_ce=ts_ce, ts_kl=ts_kl):
            return (_tensor((T, B, C_run), dtype, aligned), _tensor((B, C_run), dtype, aligned),
                    _tensor((B,), torch.int64, aligned), torch.empty(k.stats_size(T, B, C_run, ts_ce, ts_kl)),
                    torch.empty(()))
        kw = dict(alpha=0.5, tau=5.0, tau_h=5.0, lam=lam, ts_ce=ts_ce, ts_kl=ts_kl, ignore_index=-100)
        plan = functools.partial(k.launch_plan, **kw)
        labels = dict(dtype=dtype_name, T=T, C=C, ts_ce=ts_ce, ts_kl=ts_kl, entropy=lam > 0)

        def forward(buffers=buffers, plan=plan):
            z, u, y, stats, loss = buffers()
            k.tser_loss_forward(z, u, y, stats, loss, torch.empty(3), plan(z, u, y, with_entropy=False))

        def backward(buffers=buffers, plan=plan):
            z, u, y, stats, loss = buffers()
            k.tser_loss_backward(z, u, y, stats, loss, torch.empty_like(z), plan(z, u, y, with_entropy=False))
        yield "_tser_loss_fwd_kernel", labels, None, forward
        yield "_tser_loss_bwd_kernel", labels, None, backward
        if C == 100 and lam == 0.0 and ts_ce and ts_kl:  # fp32 buffers only: the same kernel for each dtype
            yield "_tser_loss_reduce_kernel", labels, None, forward


def _bn_x(T, dtype, layout, aligned):
    """x [T, 4, C, H, W]: NCHW with H·W = 256 (225 unaligned) or channels_last with C = 64 (63 unaligned)."""
    if layout == "nchw":
        return _tensor((T, 4, 16, 16, 16) if aligned else (T, 4, 16, 15, 15), dtype, aligned)
    C = 64 if aligned else 63
    return _tensor((T, 4, 6, 6, C), dtype, aligned).permute(0, 1, 4, 2, 3)


def bn_lif_variants(aligned: bool):
    """The fused BatchNorm + neuron: statistics, finalisations, fire and its backward, grad_x; NCHW and
    channels_last; T = 4 and 16 (two chunks); with and without the residual; LIF (and IF, no-decay once)."""
    from fastsnn.kernels import bn_lif as k
    from fastsnn.spec import NeuronSpec

    layouts = ("nchw", "channels_last")
    for dtype_name, layout in itertools.product(DTYPES, layouts):
        def stats(dtype=DTYPES[dtype_name], layout=layout, training=True):
            x = _bn_x(4, dtype, layout, aligned)
            C = x.shape[2]
            k.bn_statistics(x, k.geometry(x), torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C),
                            torch.empty(4, C), training=training, momentum=0.1, eps=1e-5)

        def grad_input(dtype=DTYPES[dtype_name], layout=layout):
            x = _bn_x(4, dtype, layout, aligned)
            C = x.shape[2]
            k.bn_fire_backward(x, None, torch.empty_like(x), torch.empty(4, C), None, torch.empty_like(x),
                               torch.ones(C), torch.empty(C), torch.empty(C), torch.empty_like(x), k.geometry(x),
                               NeuronSpec(), training=True)
        labels = dict(dtype=dtype_name, layout=layout)
        yield "_bn_stats_kernel", labels, None, stats
        yield "_bn_grad_input_kernel", labels, None, grad_input
        if dtype_name == "fp32" and layout == "nchw":
            yield "_bn_finalize_fwd_kernel", dict(labels, training=True), None, stats
            yield "_bn_finalize_fwd_kernel", dict(labels, training=False), None, partial_call(stats, training=False)
            yield "_bn_finalize_bwd_kernel", labels, None, grad_input
    specs = [NeuronSpec("lif", 2.0, 1.0, 0.0, "atan", 2.0, True)]
    specs += [NeuronSpec("if", 1.0, 1.0, None, "sigmoid", 4.0, False), NeuronSpec("lif_no_decay", 2.0, 1.0, 0.0),
              NeuronSpec("plif", 2.0, 1.0, 0.0, "atan", 2.0, True)]
    # residual: none, added (True), or normalised by its own BatchNorm in the same op ("bn")
    for dtype_name, layout, T, residual, spec in itertools.product(DTYPES, layouts, (4, 16), (True, False, "bn"),
                                                                   specs):
        if spec.kind not in ("lif", "plif") and (T != 4 or residual is not True):
            continue

        def buffers(T=T, dtype=DTYPES[dtype_name], layout=layout, residual=residual):
            x = _bn_x(T, dtype, layout, aligned)
            n = k.checkpoints_for(T)
            checkpoints = torch.empty(n, *x.shape[1:]) if n else None
            r_stats = torch.empty(4, x.shape[2]) if residual == "bn" else None
            return x, torch.empty_like(x) if residual else None, torch.empty(4, x.shape[2]), checkpoints, r_stats

        def fire(buffers=buffers, spec=spec):
            x, r, stats, checkpoints, r_stats = buffers()
            k.bn_fire(x, r, stats, torch.empty_like(x), checkpoints, k.geometry(x), spec, residual_stats=r_stats,
                      rate=_rate(spec))

        def backward(buffers=buffers, spec=spec):
            x, r, stats, checkpoints, r_stats = buffers()
            C = x.shape[2]
            r_bn = None if r_stats is None else (r_stats, torch.ones(C), torch.empty(C), torch.empty(C),
                                                 torch.empty_like(x))
            k.bn_fire_backward(x, r, torch.empty_like(x), stats, checkpoints, torch.empty_like(x), torch.ones(C),
                               torch.empty(C), torch.empty(C), None, k.geometry(x), spec, training=True,
                               residual_bn=r_bn, rate=_rate(spec))
        labels = dict(dtype=dtype_name, layout=layout, T=T, residual=residual, kind=spec.kind,
                      hard_reset=spec.hard_reset, surrogate=spec.surrogate, detach_reset=spec.detach_reset)
        yield "_bn_lif_fwd_kernel", labels, None, fire
        yield "_bn_lif_bwd_kernel", labels, None, backward


def spike_pack_variants(aligned: bool):
    """Spikes to bits (checked and unchecked) and back, for each dtype."""
    from fastsnn.kernels import spike_pack as k

    numel = 1 << 16 if aligned else (1 << 16) - 3
    for dtype_name, check in itertools.product(DTYPES, (False, True)):
        def pack(dtype=DTYPES[dtype_name], check=check):
            k.pack_bits(_tensor((numel,), dtype, aligned), torch.empty(k.packed_bytes(numel), dtype=torch.uint8),
                        torch.zeros(1, dtype=torch.int32) if check else None)
        yield "_pack_bits_kernel", dict(dtype=dtype_name, check=check), None, pack
        if not check:
            def unpack(dtype=DTYPES[dtype_name]):
                k.unpack_bits(torch.empty(k.packed_bytes(numel), dtype=torch.uint8), _tensor((numel,), dtype, aligned))
            yield "_unpack_bits_kernel", dict(dtype=dtype_name), None, unpack


def partial_call(fn, **kw):
    return lambda: fn(**kw)


VARIANT_SOURCES = [lif_variants, tser_loss_variants, bn_lif_variants, spike_pack_variants]


def variants(aligned: bool):
    return [v for source in VARIANT_SOURCES for v in source(aligned)]


SCOPES = ("quick", "default", "full")


def _representative(name: str, labels: dict) -> bool:
    """The variants compiled for sm_80/sm_89 in the default scope: every LIF forward, the atan backward
    (every dtype, kind, reset, detach and T), the loss at C = 1000. Other surrogates and C differ in arithmetic
    and block count only, which sm_90 (every variant) covers."""
    if name.startswith("_lif_bwd"):
        return labels["surrogate"] == "atan"
    if name in ("_tser_loss_fwd_kernel", "_tser_loss_bwd_kernel"):
        return labels["C"] == 1000
    if name.startswith("_bn_"):  # the finalisations are fp32 whatever x's dtype
        return labels["dtype"] == "fp16" or "finalize" in name
    return True


def jobs(scope: str = "full", kernels=(), dtypes=(), archs=(), unaligned_archs=(), aligned_only=False):
    """[(variant index, arch, aligned)] to compile. Scopes: quick = sm_90 fp16 aligned and unaligned; default =
    every variant aligned on sm_90, the representative ones on sm_80/sm_89 and (fp16) unaligned on sm_90; full =
    every variant aligned on sm_80/89/90 and unaligned on sm_90. Explicit archs/dtypes narrow the scope."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    out = []
    for aligned in (True, False):
        if not aligned and aligned_only:
            continue
        for index, (name, labels, *_) in enumerate(variants(aligned)):
            if (kernels and name not in kernels) or (dtypes and labels["dtype"] not in dtypes):
                continue
            if scope == "quick" and labels["dtype"] != "fp16" and "finalize" not in name:  # finalisations: fp32 only
                continue
            if not aligned:
                wanted = unaligned_archs or (90,)
                if scope == "default" and (labels["dtype"] != "fp16" or not _representative(name, labels)):
                    continue
            elif scope == "quick":
                wanted = (90,)
            elif scope == "default":
                wanted = (80, 89, 90) if _representative(name, labels) else (90,)
            else:
                wanted = ARCHS
            out += [(index, arch, aligned) for arch in wanted if not archs or arch in archs]
    return out


# ---- capture a launch, bind it as the JIT does, compile ----

def capture_launches(call):
    """Runs call() with every Triton launch captured instead of run: [(kernel, (), kwargs)], every argument by name
    (the launchers pass the constexprs positionally: fastsnn.kernels.positional)."""
    from triton.runtime.jit import KernelInterface

    launches = []
    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: (
        lambda *a, **kw: launches.append((kernel, (), {**dict(zip(kernel.arg_names, a)), **kw})))
    try:
        call()
    finally:
        KernelInterface.__getitem__ = original
    return launches


def jit_compile(kernel, args, kwargs, arch: int):
    """triton.compile of `kernel` with the signature, constexprs, attributes and options the JIT derives
    from these launch arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__), options


_WIDTH = {".128": 128, ".64": 64, ".U16": 16, ".S16": 16, ".16": 16, ".U8": 8, ".S8": 8}


def sass_report(cubin: bytes) -> dict:
    """Global load/store widths and the instruction count, read from cuobjdump's SASS of the cubin."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    loads, stores, count = Counter(), Counter(), 0
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m or m.group(1).startswith("NOP"):
            continue
        count += 1
        opcode = m.group(1)
        kind = loads if opcode.startswith("LDG") else stores if opcode.startswith("STG") else None
        if kind is not None:
            suffixes = re.findall(r"\.[A-Z0-9]+", opcode)
            kind[str(next((_WIDTH[s] for s in suffixes if s in _WIDTH), 32))] += 1
    return {"loads": dict(loads), "stores": dict(stores), "sass_instructions": count}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ptxas -v with the flags Triton's make_cubin passes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))}


# per SM: (max resident warps, max resident blocks, shared memory in bytes), from NVIDIA's occupancy tables
SM_LIMITS = {80: (64, 32, 164 * 1024), 89: (48, 24, 100 * 1024), 90: (64, 32, 228 * 1024)}


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> float:
    """Resident warps over the SM's maximum: registers are allocated per warp in units of 256, from four
    16,384-register partitions; blocks are also bounded by shared memory and the block limit."""
    max_warps, max_blocks, smem = SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // 256) * 256
    warps_by_regs = 4 * (16384 // regs_per_warp)
    blocks = min(max_blocks, max_warps // num_warps, warps_by_regs // num_warps, smem // max(shared, 1))
    return round(blocks * num_warps / max_warps, 3)


def compile_one(job):
    index, arch, aligned = job
    name, labels, steps, call = variants(aligned)[index]
    kernel, args, kwargs = next((k, a, kw) for k, a, kw in capture_launches(call) if k.fn.__name__ == name)
    if "DIVIDE" in kwargs:  # the launchers choose the interpreter's arithmetic for CPU tensors; compile the GPU's
        from fastsnn.kernels.neuron import arithmetic_modes

        kwargs = dict(kwargs, **arithmetic_modes(cuda=True))
    compiled, options = jit_compile(kernel, args, kwargs, arch)
    row = {"kernel": name, "arch": f"sm_{arch}", "aligned": aligned, "variant": labels,
           "num_warps": options.num_warps}
    row |= ptxas_report(compiled.asm["ptx"], arch)
    row |= sass_report(compiled.asm["cubin"])
    row["shared_bytes"] = compiled.metadata.shared
    row["occupancy"] = occupancy(row["registers"], options.num_warps, compiled.metadata.shared, arch)
    if steps:  # elementwise-over-time kernels: BLOCK elements per program, each stepped T times
        constexprs = {kernel.arg_names[i[0]]: v for i, v in compiled.src.constants.items()}
        row["elements_per_thread"] = max(1, constexprs["BLOCK"] // (32 * options.num_warps))
    return row


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_compile: unset TRITON_INTERPRET; the interpreter cannot compile kernels")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="*", help="kernel names (default: all)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="default: all of 80, 89, 90")
    parser.add_argument("--aligned-only", action="store_true")
    parser.add_argument("--unaligned-archs", type=int, action="append", choices=ARCHS,
                        help="archs of the unaligned compilations (default: 90 only)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes")
    parser.add_argument("--scope", choices=SCOPES, default="full", help="see jobs() (default: full)")
    opts = parser.parse_args(argv)
    todo = jobs(opts.scope, opts.kernels, opts.dtype or (), opts.arch or (), opts.unaligned_archs or (),
                opts.aligned_only)
    print(f"aot_compile: {len(todo)} compilations", file=sys.stderr, flush=True)
    rows = []
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, row in enumerate(pool.map(compile_one, todo, chunksize=2), 1):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if i % 50 == 0:
                print(f"aot_compile: {i}/{len(todo)}", file=sys.stderr, flush=True)
    for cost in element_step_costs(rows):
        print(json.dumps(cost), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
