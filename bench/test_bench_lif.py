"""Multistep LIF forward / backward / forward+backward: fastsnn vs the eager reference, torch.compile of
it, and SpikingJelly 2.0's LIFNode (its Triton backend)."""
import pytest
import torch

import fastsnn
from common import run_benchmark
from fastsnn import reference

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_SHAPES = {"64x65536": (64, 65536), "conv64x128x28x28": (64, 128, 28, 28)}
PROVIDERS = ["fastsnn", "eager", "compile", "spikingjelly"]
_compiled = {}


def _provider_fn(provider):
    if provider == "fastsnn":
        return lambda x: fastsnn.lif_multistep(x, detach_reset=True)
    if provider == "eager":
        return lambda x: reference.lif_multistep(x, detach_reset=True)
    if provider == "compile":
        if "lif" not in _compiled:
            _compiled["lif"] = torch.compile(lambda x: reference.lif_multistep(x, detach_reset=True))
        return _compiled["lif"]
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    node = sj_neuron.LIFNode(surrogate_function=sj_surrogate.ATan(), detach_reset=True, step_mode="m")

    def run(x):
        node.reset()
        return node(x)

    return run


def _bytes(pass_, x):
    n = x.numel() * x.element_size()
    return {"fwd": 2 * n, "bwd": 3 * n, "fwdbwd": 5 * n}[pass_]  # fwd: x, s; bwd: g, x, gx


def _case(provider, pass_, x):
    fn = _provider_fn(provider)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                return fn(x)
        return step
    grad = torch.randn_like(x)
    if pass_ == "bwd":  # the graph is built once, untimed; each round runs its backward again
        out = fn(x)
        return lambda: torch.autograd.grad(out, x, grad, retain_graph=True)

    def step():
        return torch.autograd.grad(fn(x), x, grad)
    return step


@pytest.mark.skipif(not HAS_CUDA, reason="GPU rows need CUDA")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lif_gpu(benchmark, copy_gbs, provider, pass_, T, shape, dtype):
    benchmark.group = f"lif {pass_} T={T} {shape} {dtype}"
    x = torch.randn(T, *GPU_SHAPES[shape], device="cuda", dtype=DTYPES[dtype], requires_grad=pass_ != "fwd")
    run_benchmark(benchmark, _case(provider, pass_, x), bytes_moved=_bytes(pass_, x), copy_gbs=copy_gbs,
                  provider=provider, op="lif", pass_=pass_, T=T, shape=shape, dtype=dtype)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["fastsnn", "eager"])
def test_lif_cpu(benchmark, provider, pass_):
    """CPU rows at a small size: the reference path (and, without CUDA, the interpreted kernels)."""
    benchmark.group = f"lif cpu {pass_} T=4 8x4096 fp32"
    x = torch.randn(4, 8, 4096, requires_grad=pass_ != "fwd")
    run_benchmark(benchmark, _case(provider, pass_, x), bytes_moved=None, copy_gbs=None, rounds=5, warmup=1,
                  provider=provider, op="lif", pass_=pass_, T=4, shape="8x4096", dtype="fp32", device="cpu")
