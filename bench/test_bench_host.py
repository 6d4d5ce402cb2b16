"""Host time per call (CPU-runnable): an eager forward+backward of each op with every kernel launch replaced
by a no-op, against a bare torch.autograd.Function that makes the same allocations. On a fast GPU this,
not the kernel, decides the time of a small op; the target is <= 1.5x the bare Function. Times are the
calling thread's CPU time; the ratio is the median over adjacent op/floor block pairs (see _per_call_us)."""
import statistics
import time

import pytest
import torch
from triton.runtime.jit import KernelInterface

import fastsnn
from common import DEVICE, record


class _Bare(torch.autograd.Function):
    """The floor: allocate the op's outputs (forward) and input gradient (backward), compute nothing."""

    @staticmethod
    def forward(ctx, x, *outputs_like):
        ctx.save_for_backward(x)
        return tuple(torch.empty_like(o) for o in outputs_like)

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        return (torch.empty_like(x),) + (None,) * len(grads)


class _BareBN(torch.autograd.Function):
    """The floor for bn_lif, with the op's allocations: forward the [4, C] statistics, the programs' partial
    sums and the spikes; backward g (= dL/dx in place), dL/dweight, dL/dbias, the partial sums and the
    [3, C] coefficients of dL/dx."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        C = weight.shape[0]
        torch.empty(4, C, device=x.device)
        torch.empty(3, 1, C, device=x.device)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        C = weight.shape[0]
        torch.empty(2, 1, C, device=x.device)
        torch.empty(3, C, device=x.device)
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _per_call_us(op_call, bare_call, repeats=50, pairs=60):
    """(op µs, bare µs, ratio) per call. The calls run in `pairs` pairs of adjacent blocks of `repeats` calls,
    op and floor, the order alternating pair by pair, timed in this thread's CPU time (another process on
    the same cores does not count). A shared CPU has slow spells lasting seconds that hit a whole block (or a
    whole process): the two blocks of a pair, a few ms apart, share the spell, so the ratio is the median of
    the pairs' ratios, and each time the least of its blocks (noise only adds)."""
    for _ in range(20):
        op_call(), bare_call()
    op_best = bare_best = float("inf")
    ratios = []
    for i in range(pairs):
        spent = {}
        for fn in ((op_call, bare_call) if i % 2 == 0 else (bare_call, op_call)):
            start = time.thread_time()
            for _ in range(repeats):
                fn()
            spent[fn] = (time.thread_time() - start) / repeats
        op_best, bare_best = min(op_best, spent[op_call]), min(bare_best, spent[bare_call])
        ratios.append(spent[op_call] / spent[bare_call])
    return op_best * 1e6, bare_best * 1e6, statistics.median(ratios)


def _cases():
    """Each op and its floor, called with a dense incoming gradient, as a layer's backward passes it (a
    `.sum()` would pass a stride-0 one, which the neuron ops copy into their layout first)."""
    x = torch.randn(4, 8, 64, device=DEVICE, requires_grad=True)
    gx = torch.randn(4, 8, 64, device=DEVICE)
    z = torch.randn(4, 8, 10, device=DEVICE, requires_grad=True)
    u, y = torch.randn(8, 10, device=DEVICE), torch.randint(0, 10, (8,), device=DEVICE)
    xb = torch.randn(4, 8, 16, 4, 4, device=DEVICE, requires_grad=True)
    gb = torch.randn(4, 8, 16, 4, 4, device=DEVICE)
    w, b = torch.ones(16, device=DEVICE, requires_grad=True), torch.zeros(16, device=DEVICE, requires_grad=True)
    running = (torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE))
    return {
        "bn_lif": (lambda: torch.autograd.grad(fastsnn.bn_lif(xb, w, b, *running, training=True, backend="triton"),
                                               (xb, w, b), gb),
                   lambda: torch.autograd.grad(_BareBN.apply(xb, w, b), (xb, w, b), gb)),
        "lif_multistep": (lambda: torch.autograd.grad(fastsnn.lif_multistep(x, backend="triton"), x, gx),
                          lambda: torch.autograd.grad(_Bare.apply(x, x)[0], x, gx)),
        "tser_loss": (lambda: torch.autograd.grad(fastsnn.tser_loss(z, u, y, backend="triton"), z),
                      lambda: torch.autograd.grad(_Bare.apply(z, z[0, 0, 0])[0], z)),
    }


@pytest.mark.parametrize("op", ["lif_multistep", "bn_lif", "tser_loss"])
def test_host_time_per_call(benchmark, op, monkeypatch):
    # no kernel runs: what is timed is the Python/dispatcher path around the launches
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda kernel, grid: (lambda *a, **k: None))
    if op == "tser_loss":  # the CPU's host label check is not part of the CUDA path
        import sys

        monkeypatch.setattr(sys.modules["fastsnn.ops.tser_loss"], "_check_labels_on_host", lambda *a: None)
    op_call, bare_call = _cases()[op]
    op_us, bare_us, ratio = _per_call_us(op_call, bare_call)
    benchmark.group = "host time per call"
    record(benchmark, dict(op="host", name=op, host_us=round(op_us, 1), bare_function_us=round(bare_us, 1),
                           ratio=round(ratio, 2), path="launches no-op'd", provider="fastsnn",
                           gpu_row=False))
