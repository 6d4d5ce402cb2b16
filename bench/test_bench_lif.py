"""Multistep LIF forward / backward / forward+backward: fastsnn vs the eager reference, torch.compile of it,
and SpikingJelly 2.0's LIFNode on its Triton kernels."""
import pytest
import torch

import fastsnn
from common import DEVICE, GPU_ROWS, fastsnn_path, run_benchmark, size, spikingjelly_lif
from fastsnn import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {"64x65536": (64, 65536), "64x128x28x28": (64, 128, 28, 28)}
TINY = {"64x65536": (2, 300), "64x128x28x28": (2, 3, 5, 7)}
PROVIDERS = ["fastsnn", "eager", "compile", "spikingjelly"]
_compiled = {}


def _provider(provider, dtype):
    """(fn(x) -> spikes, the code path it runs)."""
    if provider == "fastsnn":
        return (lambda x: fastsnn.lif_multistep(x, detach_reset=True)), fastsnn_path(DEVICE)
    if provider == "eager":
        return (lambda x: reference.lif_multistep(x, detach_reset=True)), "eager"
    if provider == "compile":
        if "lif" not in _compiled:  # fullgraph: a graph break raises instead of timing eager code
            _compiled["lif"] = torch.compile(lambda x: reference.lif_multistep(x, detach_reset=True), fullgraph=True)
        return _compiled["lif"], "torch.compile"
    pytest.importorskip("spikingjelly")
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("SpikingJelly's CPU path has no bf16 here; its bf16 row runs on CUDA")
    node, path = spikingjelly_lif(dtype, DEVICE)

    def run(x):
        node[0].reset()
        return node(x)
    return run, path


def _bytes(pass_, x):
    n = x.numel() * x.element_size()
    return {"fwd": 2 * n, "bwd": 3 * n, "fwdbwd": 5 * n}[pass_]  # fwd: x, s; bwd: g, x, gx


def _case(fn, pass_, x):
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


@pytest.mark.skipif(not GPU_ROWS, reason="GPU rows need CUDA (or FASTSNN_BENCH_DRY_RUN=1)")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lif(benchmark, copy_gbs, provider, pass_, T, shape, dtype):
    if DEVICE == "cpu" and dtype == "bf16":
        pytest.skip("the interpreter cannot do bf16 arithmetic")
    benchmark.group = f"lif {pass_} T={T} {shape} {dtype}"
    x = torch.randn(T, *size(SHAPES[shape], TINY[shape]), device=DEVICE, dtype=DTYPES[dtype],
                    requires_grad=pass_ != "fwd")
    fn, path = _provider(provider, DTYPES[dtype])
    run_benchmark(benchmark, _case(fn, pass_, x), bytes_moved=_bytes(pass_, x), copy_gbs=copy_gbs, path=path,
                  count_kernel_bytes=provider in ("fastsnn", "spikingjelly"), provider=provider, op="lif",
                  pass_=pass_, T=T, shape=shape, dtype=dtype)
