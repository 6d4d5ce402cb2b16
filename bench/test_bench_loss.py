"""TSER loss forward+backward: fastsnn's kernels vs the eager reference and torch.compile of it, with the
launches per call and the bytes floor beside each row."""
import pytest
import torch

import fastsnn
from common import DEVICE, GPU_ROWS, fastsnn_path, run_benchmark, size
from fastsnn import reference
from fastsnn.testing import count_launches

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_compiled = {}


def _provider(provider):
    if provider == "fastsnn":
        return fastsnn.tser_loss, fastsnn_path(DEVICE)
    if provider == "eager":
        return reference.tser_loss, "eager"
    if "loss" not in _compiled:
        _compiled["loss"] = torch.compile(reference.tser_loss, fullgraph=True)
    return _compiled["loss"], "torch.compile"


def _launches(provider, fn, z, u, y):
    """Kernels launched from the call to the gradient (counted once, untimed): on CUDA every kernel the
    profiler sees; on the CPU (a dry run) Triton launches plus computing aten ops, None for torch.compile
    (which cannot run under the counting dispatch mode) and for fastsnn (whose CPU path adds a host check)."""
    if DEVICE == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.autograd.grad(fn(z, u, y), z)  # compiled and warm first
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(fn(z, u, y), z)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    if provider != "eager":
        return None
    with count_launches() as launched:
        torch.autograd.grad(fn(z, u, y), z)
    return len(launched["triton"]) + len(launched["aten"])


@pytest.mark.skipif(not GPU_ROWS, reason="GPU rows need CUDA (or FASTSNN_BENCH_DRY_RUN=1)")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [100, 1000])
@pytest.mark.parametrize("B", [64, 256])
@pytest.mark.parametrize("T", [2, 4, 6])
@pytest.mark.parametrize("provider", ["fastsnn", "eager", "compile"])
def test_tser_loss(benchmark, copy_gbs, provider, T, B, C, dtype):
    if DEVICE == "cpu" and dtype == "bf16":
        pytest.skip("the interpreter cannot do bf16 arithmetic")
    benchmark.group = f"tser_loss fwdbwd T={T} B={B} C={C} {dtype}"
    B_run, C_run = size(B, 3), size(C, 7)
    z = torch.randn(T, B_run, C_run, device=DEVICE, dtype=DTYPES[dtype], requires_grad=True)
    u = torch.randn(B_run, C_run, device=DEVICE, dtype=DTYPES[dtype])
    y = torch.randint(0, C_run, (B_run,), device=DEVICE)
    fn, path = _provider(provider)
    # the least any implementation moves: read z and u once, write dL/dz once
    floor_bytes = 2 * z.numel() * z.element_size() + u.numel() * u.element_size()
    launches = _launches(provider, fn, z, u, y)
    run_benchmark(benchmark, lambda: torch.autograd.grad(fn(z, u, y), z), bytes_moved=floor_bytes,
                  copy_gbs=copy_gbs, path=path, count_kernel_bytes=provider == "fastsnn", provider=provider,
                  op="tser_loss", pass_="fwdbwd", T=T, B=B, C=C, dtype=dtype, launches=launches)
