"""The fused BatchNorm + LIF (fastsnn.bn_lif) forward+backward at a spiking ResNet-19 layer's shape (T=4, batch
64, 256 channels at 16×16, CIFAR), against BatchNorm then the neuron: eager (F.batch_norm + the reference LIF),
torch.compile of that, and nn.BatchNorm2d + SpikingJelly's LIFNode on its Triton kernels."""
import pytest
import torch
import torch.nn.functional as F

import fastsnn
from common import DEVICE, GPU_ROWS, fastsnn_path, run_benchmark, size, spikingjelly_lif
from fastsnn import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPE = (4, 64, 256, 16, 16)  # [T, B, C, H, W]: a 3rd-stage conv output of spiking_resnet19 at 32 px
TINY = (2, 2, 3, 4, 5)
_compiled = {}


def _unfused(x, weight, bias, running_mean, running_var):
    y = F.batch_norm(x.flatten(0, 1), running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    return reference.lif_multistep(y.unflatten(0, x.shape[:2]), detach_reset=True)


def _provider(provider, dtype, C):
    if provider == "fastsnn":
        return (lambda x, *bn: fastsnn.bn_lif(x, *bn, training=True, detach_reset=True)), fastsnn_path(DEVICE)
    if provider == "eager":
        return _unfused, "eager"
    if provider == "compile":
        if "bn" not in _compiled:
            _compiled["bn"] = torch.compile(_unfused, fullgraph=True)
        return _compiled["bn"], "torch.compile"
    pytest.importorskip("spikingjelly")
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("SpikingJelly's CPU path has no bf16 here; its bf16 row runs on CUDA")
    node, path = spikingjelly_lif(dtype, DEVICE)

    def run(x, weight, bias, running_mean, running_var):
        node[0].reset()
        y = F.batch_norm(x.flatten(0, 1), running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        return node(y.unflatten(0, x.shape[:2]))
    return run, path + "+nn.BatchNorm2d"


@pytest.mark.skipif(not GPU_ROWS, reason="GPU rows need CUDA (or FASTSNN_BENCH_DRY_RUN=1)")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", ["fastsnn", "eager", "compile", "spikingjelly"])
def test_bn_lif(benchmark, copy_gbs, provider, dtype):
    if DEVICE == "cpu" and dtype == "bf16":
        pytest.skip("the interpreter cannot do bf16 arithmetic")
    shape = size(SHAPE, TINY)
    C = shape[2]
    benchmark.group = f"bn_lif fwdbwd T=4 {'x'.join(map(str, SHAPE[1:]))} {dtype}"
    x = (torch.randn(shape, device=DEVICE) * 2).to(DTYPES[dtype]).requires_grad_()
    weight = torch.ones(C, device=DEVICE, requires_grad=True)
    bias = torch.zeros(C, device=DEVICE, requires_grad=True)
    running = (torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE))
    grad = torch.randn_like(x)
    fn, path = _provider(provider, DTYPES[dtype], C)

    def step():
        return torch.autograd.grad(fn(x, weight, bias, *running), (x, weight, bias), grad)
    # the op's inputs and outputs once: read x, write the spikes; read dL/ds and x, write dL/dx
    io_bytes = 5 * x.numel() * x.element_size()
    run_benchmark(benchmark, step, bytes_moved=io_bytes, copy_gbs=copy_gbs, path=path,
                  count_kernel_bytes=provider in ("fastsnn", "spikingjelly"), provider=provider, op="bn_lif",
                  pass_="fwdbwd", T=4, shape="x".join(map(str, SHAPE[1:])), dtype=dtype)
