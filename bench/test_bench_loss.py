"""TSER loss forward+backward: fastsnn's fused kernel vs the eager reference and torch.compile of it."""
import pytest
import torch

import fastsnn
from common import run_benchmark
from fastsnn import reference

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_compiled = {}


def _fn(provider):
    if provider == "fastsnn":
        return fastsnn.tser_loss
    if provider == "eager":
        return reference.tser_loss
    if "loss" not in _compiled:
        _compiled["loss"] = torch.compile(reference.tser_loss)
    return _compiled["loss"]


def _step(provider, z, u, y):
    fn = _fn(provider)
    return lambda: torch.autograd.grad(fn(z, u, y), z)


@pytest.mark.skipif(not HAS_CUDA, reason="GPU rows need CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [10, 100, 1000])
@pytest.mark.parametrize("B", [128, 256])
@pytest.mark.parametrize("provider", ["fastsnn", "eager", "compile"])
def test_tser_loss_gpu(benchmark, copy_gbs, provider, B, C, dtype):
    T = 4
    benchmark.group = f"tser_loss fwdbwd T={T} B={B} C={C} {dtype}"
    z = torch.randn(T, B, C, device="cuda", dtype=DTYPES[dtype], requires_grad=True)
    u = torch.randn(B, C, device="cuda", dtype=DTYPES[dtype])
    y = torch.randint(0, C, (B,), device="cuda")
    moved = 2 * z.numel() * z.element_size() + u.numel() * u.element_size()  # read z and u, write dL/dz
    run_benchmark(benchmark, _step(provider, z, u, y), bytes_moved=moved, copy_gbs=copy_gbs, provider=provider,
                  op="tser_loss", pass_="fwdbwd", T=T, B=B, C=C, dtype=dtype)


@pytest.mark.parametrize("provider", ["fastsnn", "eager"])
def test_tser_loss_cpu(benchmark, provider):
    benchmark.group = "tser_loss cpu fwdbwd T=4 B=32 C=100 fp32"
    z = torch.randn(4, 32, 100, requires_grad=True)
    u, y = torch.randn(32, 100), torch.randint(0, 100, (32,))
    run_benchmark(benchmark, _step(provider, z, u, y), bytes_moved=None, copy_gbs=None, rounds=5, warmup=1,
                  provider=provider, op="tser_loss", pass_="fwdbwd", T=4, B=32, C=100, dtype="fp32", device="cpu")
