"""Shared benchmark helpers: the device and sizes of this run, synchronised timing, bandwidth figures and the
record of which code path each provider actually ran.

A run is one of:
- GPU: CUDA present; fastsnn's kernels compiled, the rows at their full sizes.
- dry run (FASTSNN_BENCH_DRY_RUN=1, `bash bench/gpu.sh --dry-run`): no GPU needed; every GPU row runs on
  the CPU at tiny sizes (fastsnn's kernels under Triton's interpreter), exercising the same code and
  writing the same files as the GPU run, with times that mean nothing.
- otherwise (CPU, no dry run): GPU rows skip; the CPU rows (host time, saved bytes) run.
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch

try:
    from importlib.metadata import version

    SPIKINGJELLY = version("spikingjelly")
except Exception:  # not installed
    SPIKINGJELLY = None

# SpikingJelly 2.0 picks its CUDA LIF implementation from this variable at each call: its Triton kernels, so
# that a call that would fall back to its PyTorch loop raises instead of timing the wrong thing
os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = "triton"
HAS_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("FASTSNN_BENCH_DRY_RUN") == "1" and not HAS_CUDA
GPU_ROWS = HAS_CUDA or DRY_RUN
DEVICE = "cuda" if HAS_CUDA else "cpu"


def size(full, tiny):
    """A benchmark size: `full` on a GPU, `tiny` in a dry run."""
    return tiny if DRY_RUN else full


def environment() -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(0) if HAS_CUDA else "cpu", "dry_run": DRY_RUN,
            "torch": torch.__version__, "triton": triton.__version__, "spikingjelly": SPIKINGJELLY,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}


def fastsnn_path(device: str) -> str:
    """The code path fastsnn's ops take for tensors on `device` in this process."""
    from fastsnn.backend import INTERPRET, resolve_backend

    if resolve_backend("bench", "auto", torch.device(device)) == "reference":
        return "reference"
    return "triton-compiled" if device == "cuda" else "triton-interpreter" if INTERPRET else "reference"


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured in this run; the value of
    FASTSNN_COPY_GBS when set (bench/gpu.py measures it once for all its steps). Without CUDA (a rehearsal)
    the host's memcpy bandwidth, so that every row's floor exists (and means as little as its times)."""
    if os.environ.get("FASTSNN_COPY_GBS"):
        return float(os.environ["FASTSNN_COPY_GBS"])
    if not HAS_CUDA:
        src = torch.empty(1 << 26, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        return 2 * src.numel() * 5 / (time.perf_counter() - start) / 1e9
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    return 2 * nbytes / seconds / 1e9


# ---- three clocks per row: kernel_us (device), eager_us (what a training step sees), host_us (CPU) ----

FLUSH_OP = "bitwise_not"  # the L2 flush between timed calls: a kernel no provider launches, so it marks rounds
_flush_buffer = {}


def _flush_l2():
    """Overwrites a buffer of twice the L2's size, so that every timed call starts from a cold L2."""
    if "buf" not in _flush_buffer:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
        _flush_buffer["buf"] = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    torch.bitwise_not(_flush_buffer["buf"], out=_flush_buffer["buf"])


def per_round_us(events, delimiter: str = FLUSH_OP) -> list[float]:
    """Per round, the summed duration of the device events between two delimiter kernels: `events` are
    (start, duration µs, name) in any order; what comes before the first delimiter or after the last is not a
    round (a flush precedes every call, and one more closes the last)."""
    rounds, current = [], None
    for _, duration, name in sorted(events):
        if delimiter in name:
            if current is not None:
                rounds.append(current)
            current = 0.0
        elif current is not None:
            current += duration
    return rounds


def _median(values):
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[n // 2] + ordered[(n - 1) // 2]) / 2


def _kernel_us(fn, rounds: int) -> tuple[float, str]:
    """(median over `rounds` calls of the device time of the kernels, copies and memsets each launches, summed
    from torch.profiler's CUDA activity, L2 flushed before every call: launch gaps and host time excluded; how it
    was measured). Should the profiler give no kernel events, each call is timed with CUDA events instead (gaps
    included), and the method says so."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            _flush_l2()
            fn()
        _flush_l2()  # closes the last round
        torch.cuda.synchronize()
    events = [(e.time_range.start, e.time_range.elapsed_us(), e.name) for e in prof.events()
              if e.device_type.name == "CUDA"]
    per_call = per_round_us(events)
    if len(per_call) == rounds:
        return _median(per_call), "profiler kernel sum, median of rounds, L2 flushed"
    walls = []
    for _ in range(rounds):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end) * 1e3)
    return _median(walls), "CUDA events per call (the profiler gave no kernel events), L2 flushed"


def _eager_us(fn, calls: int) -> float:
    """µs per call of `calls` back-to-back eager calls, timed with CUDA events, one sync at the end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _host_us(fn, calls: int) -> float:
    """The process's CPU time per call (all threads: autograd runs a CUDA backward on a thread of its own),
    the device left to finish afterwards, uncounted."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    seconds = time.process_time() - start
    sync()
    return seconds / calls * 1e6


def timings(fn, *, warmup: int = 3, rounds: int = 50, calls: int = 20) -> dict:
    """kernel_us, eager_us and host_us of fn (see above), and warmup_s: the seconds of its first calls
    (compilation, autotuning, cache warm-up), logged apart from the timed region. Without CUDA (a rehearsal)
    kernel_us and eager_us are wall-clock times per call, which say nothing about kernels."""
    start = time.perf_counter()
    for _ in range(size(warmup, 1)):
        fn()
    sync()
    out = {"warmup_s": round(time.perf_counter() - start, 3)}
    rounds, calls = size(rounds, 2), size(calls, 1)
    if HAS_CUDA:
        kernel, method = _kernel_us(fn, rounds)
        out.update(kernel_us=kernel, kernel_method=method, eager_us=_eager_us(fn, calls))
    else:
        walls = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t0)
        out.update(kernel_us=_median(walls) * 1e6, kernel_method="cpu wall clock (no device clock)",
                   eager_us=sum(walls) / len(walls) * 1e6)
    out.update(host_us=_host_us(fn, calls), rounds=rounds, calls=calls)
    return {k: round(v, 2) if isinstance(v, float) and k.endswith("_us") else v for k, v in out.items()}


def kernel_bytes(fn) -> int | None:
    """Bytes of the tensors fn's Triton launches take (each counted once per launch; its kernels read or write
    all of each), from one untimed call with the launches intercepted; None when fn launched no Triton kernel
    (torch's own kernels, or Triton's interpreter off)."""
    from triton.runtime.jit import KernelInterface

    total = {"bytes": 0, "launches": 0}
    original = KernelInterface.__getitem__

    def counting(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            seen = set()
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total["bytes"] += t.numel() * t.element_size()
            total["launches"] += 1
            return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = counting
    try:
        fn()
        sync()
    finally:
        KernelInterface.__getitem__ = original
    return total["bytes"] if total["launches"] else None


ROWS_ENV = "FASTSNN_BENCH_ROWS"  # a JSON-lines file each row is appended to as soon as it is measured


def append_row(row: dict) -> None:
    path = os.environ.get(ROWS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_benchmark(benchmark, fn, *, bytes_moved: int | None, copy_gbs: float | None, path: str,
                  count_kernel_bytes: bool = False, floor_bytes: int | None = None, items: int | None = None,
                  **info) -> dict:
    """Measures fn (timings) and records the row: in pytest-benchmark's extra_info and, at once, as a line of
    the FASTSNN_BENCH_ROWS file (a group stopped by the budget keeps every row it finished). The row holds
    its fields (`info`), the code path that ran, the three clocks, the bytes the op must move (`bytes`) and
    floor_us (floor_bytes, default those, over the copy bandwidth measured in this run) with the fraction of it
    kernel_us reaches, kernel_bytes (the tensors its Triton launches take) when asked, images/s (`items` per
    call over eager_us) and the peak memory."""
    row = dict(info, path=path, device=DEVICE, gpu_row=True)
    if count_kernel_bytes:
        row["kernel_bytes"] = kernel_bytes(fn)
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    row.update(timings(fn))
    floor_bytes = floor_bytes or bytes_moved
    if bytes_moved:
        row["bytes"] = int(bytes_moved)
    if floor_bytes and copy_gbs:
        row["copy_GB/s"] = round(copy_gbs, 1)
        row["floor_us"] = round(floor_bytes / (copy_gbs * 1e9) * 1e6, 3)
        row["copy_fraction"] = round(row["floor_us"] / row["kernel_us"], 3)
    if items:
        row["images/s"] = float(f"{items / (row['eager_us'] * 1e-6):.4g}")  # 4 significant digits: CPU rows are < 0.1
    if HAS_CUDA:
        row["peak_mem_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record(benchmark, row)
    return row


def record(benchmark, row: dict) -> None:
    """The row into pytest-benchmark's JSON and the rows file; one trivial round so that --benchmark-only
    keeps the test."""
    benchmark.extra_info.update(row)
    append_row(row)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def saved_bytes(fn) -> int:
    """Activation bytes saved for backward while fn runs: each storage counted once, parameters (which
    exist whether or not anything is saved) and views of them (the weight.t() a linear layer saves) left out."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ---- SpikingJelly as a baseline, on the path its own documentation prescribes ----

def spikingjelly_lif(dtype: torch.dtype, device: str):
    """(a multi-step SpikingJelly LIFNode (ATan, detach_reset) as fastsnn's benchmarks compare against,
    the path it runs). On CUDA SpikingJelly's Triton kernels are forced (SJ_LIF_CUDA_IMPLEMENTATION=triton,
    set when this module is imported): a call that would fall back to its PyTorch loop raises instead of reporting a
    number. At fp16/bf16 the node is prepared as SpikingJelly's precision API prescribes
    (prepare_model_for_precision with neuron_storage = the input's dtype, fp32 compute), without which its
    membrane is created in x's dtype and only its PyTorch loop can run."""
    from spikingjelly.activation_based import neuron, surrogate

    node = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True, step_mode="m")
    node = torch.nn.Sequential(node).to(device)
    prepare_spikingjelly(node, dtype, device)
    return node, spikingjelly_path(device, dtype)


def prepare_spikingjelly(model: torch.nn.Module, dtype: torch.dtype, device: str) -> None:
    """Configures the SpikingJelly neurons of `model` for inputs of `dtype` on `device` (see above)."""
    if device != "cuda" or dtype == torch.float32:
        return
    from spikingjelly.activation_based.precision import PrecisionConfig, prepare_model_for_precision

    storage = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    prepare_model_for_precision(model, device, PrecisionConfig(mode=storage, neuron_storage=storage,
                                                               neuron_fwd="fp32", neuron_bwd="fp32"))


def spikingjelly_path(device: str, dtype: torch.dtype) -> str:
    if device != "cuda":
        return "spikingjelly-torch"
    requested = os.environ.get("SJ_LIF_CUDA_IMPLEMENTATION")
    if requested != "triton":
        raise RuntimeError(f"SJ_LIF_CUDA_IMPLEMENTATION={requested!r}: the SpikingJelly rows must force 'triton'")
    return "spikingjelly-triton" + ("" if dtype == torch.float32 else f"-storage-{str(dtype)[6:]}")
