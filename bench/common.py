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

import os
import platform

import torch

try:
    from importlib.metadata import version

    SPIKINGJELLY = version("spikingjelly")
except Exception:  # not installed
    SPIKINGJELLY = None

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
    FASTSNN_COPY_GBS when set (bench/gpu.sh measures it once for all its steps)."""
    if os.environ.get("FASTSNN_COPY_GBS"):
        return float(os.environ["FASTSNN_COPY_GBS"])
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


def run_benchmark(benchmark, fn, *, bytes_moved: int | None, copy_gbs: float | None, path: str,
                  rounds: int = 20, warmup: int = 3, **info):
    """Times fn (synchronised) with pytest-benchmark and records, in extra_info: the row's fields (`info`),
    the code path that ran, the bytes the op must move and the predicted floor (bytes over the measured copy
    bandwidth), GB/s and its fraction of copy bandwidth, and peak memory."""
    def call():
        out = fn()
        sync()
        return out

    for _ in range(size(warmup, 1)):  # compiles, autotunes and warms caches before timing
        call()
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, rounds=size(rounds, 2), iterations=1, warmup_rounds=size(1, 0))
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info, path=path, device=DEVICE, median_us=round(median * 1e6, 2))
    if bytes_moved:
        benchmark.extra_info["bytes"] = int(bytes_moved)
        benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        if copy_gbs:
            benchmark.extra_info["copy_GB/s"] = round(copy_gbs, 1)
            benchmark.extra_info["floor_us"] = round(bytes_moved / (copy_gbs * 1e9) * 1e6, 2)
            benchmark.extra_info["copy_fraction"] = round(bytes_moved / median / 1e9 / copy_gbs, 3)
    if HAS_CUDA:
        benchmark.extra_info["peak_mem_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def saved_bytes(fn) -> int:
    """Activation bytes saved for backward while fn runs: each storage counted once, parameters (which
    exist whether or not anything is saved) left out."""
    seen = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter):
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
    set by bench/conftest.py): a call that would fall back to its PyTorch loop raises instead of reporting a
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
