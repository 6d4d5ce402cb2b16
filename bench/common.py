"""Shared benchmark helpers: CUDA-synchronised calls, bandwidth figures, environment record."""
from __future__ import annotations

import platform

import torch

try:
    from importlib.metadata import version

    SPIKINGJELLY = version("spikingjelly")
except Exception:  # not installed
    SPIKINGJELLY = None


def environment() -> dict:
    import triton

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "spikingjelly": SPIKINGJELLY,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured in this run."""
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
    return 2 * nbytes / seconds / 1e9


def run_benchmark(benchmark, fn, *, bytes_moved: int | None, copy_gbs: float | None, rounds: int = 20,
                  warmup: int = 3, **info):
    """Times fn (synchronised) with pytest-benchmark and records median GB/s, the fraction of copy
    bandwidth and peak memory in extra_info."""
    def call():
        out = fn()
        sync()
        return out

    for _ in range(warmup):  # compiles, autotunes and warms caches before timing
        call()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(info)
    if bytes_moved:
        gbs = bytes_moved / median / 1e9
        benchmark.extra_info["GB/s"] = round(gbs, 2)
        if copy_gbs:
            benchmark.extra_info["copy_fraction"] = round(gbs / copy_gbs, 3)
            benchmark.extra_info["copy_GB/s"] = round(copy_gbs, 1)
    if torch.cuda.is_available():
        benchmark.extra_info["peak_mem_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def saved_bytes(fn) -> int:
    """Bytes saved for backward while fn runs, each storage counted once."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
