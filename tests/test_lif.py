"""Multistep LIF/IF: Triton kernels (interpreted on the CPU) against the PyTorch reference."""
import itertools

import pytest
import torch

import fastsnn
from fastsnn import reference
from fastsnn.surrogate import SURROGATES
from helpers import assert_close

SURROGATE_NAMES = sorted(SURROGATES)


def _inputs(T, shape, dtype, with_v_init):
    x = (torch.randn(T, *shape) * 1.5 + 0.4).to(dtype).requires_grad_()
    v_init = (torch.randn(*shape) * 0.5).to(dtype).requires_grad_() if with_v_init else None
    return x, v_init


def _fwd_bwd(fn, x, v_init, grad_spikes, grad_v, **kw):
    """Runs fn, returns (spikes, v_final or None, grad_x, grad_v_init or None) for upstream grads."""
    out = fn(x, v_init=v_init, return_v=grad_v is not None, **kw)
    spikes, v_final = out if grad_v is not None else (out, None)
    loss = (spikes.float() * grad_spikes).sum()
    if grad_v is not None:
        loss = loss + (v_final * grad_v).sum()
    inputs = [x] + ([v_init] if v_init is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return spikes, v_final, grads[0], (grads[1] if v_init is not None else None)


def _compare(fn, ref, T, shape, dtype, with_v_init, return_v, backend="triton", **kw):
    x, v_init = _inputs(T, shape, dtype, with_v_init)
    grad_spikes = torch.randn(T, *shape)
    grad_v = torch.randn(*shape) if return_v else None
    got = _fwd_bwd(fn, x, v_init, grad_spikes, grad_v, backend=backend, **kw)
    want = _fwd_bwd(ref, x, v_init, grad_spikes, grad_v, **kw)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert torch.equal(got[0], want[0]), "spikes differ"
    if return_v:
        assert got[1].dtype == torch.float32
        assert_close(got[1], want[1], torch.float32)
    assert got[2].dtype == dtype
    assert_close(got[2], want[2], dtype)
    if with_v_init:
        assert got[3].dtype == dtype
        assert_close(got[3], want[3], dtype)
    # a test that cannot fail is a defect: make sure the gradient is not trivially zero
    assert want[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 4, 7])
@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
@pytest.mark.parametrize("v_reset", [0.0, None], ids=["hard", "soft"])
@pytest.mark.parametrize("decay_input,detach_reset,with_v_init,return_v",
                         list(itertools.product([True, False], repeat=4)))
def test_lif_kernel_matches_reference(dtype, T, surrogate, v_reset, decay_input, detach_reset, with_v_init,
                                      return_v):
    _compare(fastsnn.lif_multistep, reference.lif_multistep, T, (3, 37), dtype, with_v_init, return_v,
             surrogate=surrogate, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 4, 7])
@pytest.mark.parametrize("v_reset", [0.0, None], ids=["hard", "soft"])
@pytest.mark.parametrize("detach_reset,with_v_init,return_v", list(itertools.product([True, False], repeat=3)))
def test_if_kernel_matches_reference(dtype, T, v_reset, detach_reset, with_v_init, return_v):
    ref = lambda x, **kw: reference.lif_multistep(x, neuron="if", **kw)  # noqa: E731
    _compare(fastsnn.if_multistep, ref, T, (5, 19), dtype, with_v_init, return_v, surrogate="sigmoid",
             v_reset=v_reset, detach_reset=detach_reset)


@pytest.mark.parametrize("T", [9, 17])  # more timesteps than the backward keeps in registers at once
@pytest.mark.parametrize("shape", [(41, 401), (2, 3, 5, 7)])
def test_long_sequences_and_many_blocks(T, shape):
    _compare(fastsnn.lif_multistep, reference.lif_multistep, T, shape, torch.float32, True, True,
             tau=3.7, v_threshold=0.8, v_reset=-0.2, surrogate="atan")


def test_reference_backend_is_the_reference():
    _compare(fastsnn.lif_multistep, reference.lif_multistep, 4, (3, 37), torch.float32, True, True,
             surrogate="erf", backend="reference")


def test_custom_alpha_changes_the_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    g1 = torch.autograd.grad(fastsnn.lif_multistep(x, alpha=2.0, backend="triton").sum(), x)[0]
    g2 = torch.autograd.grad(fastsnn.lif_multistep(x, alpha=5.0, backend="triton").sum(), x)[0]
    g2_ref = torch.autograd.grad(reference.lif_multistep(x, alpha=5.0).sum(), x)[0]
    assert not torch.allclose(g1, g2)
    assert_close(g2, g2_ref)


def test_channels_last_layout_is_kept_and_correct():
    T, B, C, H, W = 3, 2, 5, 4, 3
    x = torch.randn(T * B, C, H, W).to(memory_format=torch.channels_last).view(T, B, C, H, W)
    x.requires_grad_()
    spikes = fastsnn.lif_multistep(x)
    assert spikes.stride() == x.stride()
    g = torch.randn_like(spikes)
    (gx,) = torch.autograd.grad((spikes * g).sum(), x)
    x_ref = x.detach().contiguous().requires_grad_()
    ref = reference.lif_multistep(x_ref)
    assert torch.equal(spikes, ref)
    assert_close(gx, torch.autograd.grad((ref * g).sum(), x_ref)[0])


def test_input_broadcast_over_time_is_read_in_place():
    step = torch.randn(2, 5, 4, 3).to(memory_format=torch.channels_last).requires_grad_()
    x = step.unsqueeze(0).expand(4, *step.shape)  # direct encoding: one timestep repeated, time stride 0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        spikes = fastsnn.lif_multistep(x, backend="triton")
    assert sum(saved) == step.numel() * step.element_size()  # one timestep, not T
    assert spikes[0].is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(spikes)
    (grad,) = torch.autograd.grad((spikes * g).sum(), step)
    dense = step.detach().unsqueeze(0).repeat(4, 1, 1, 1, 1).requires_grad_()
    ref = reference.lif_multistep(dense)
    assert torch.equal(spikes, ref)
    assert_close(grad, torch.autograd.grad((ref * g).sum(), dense)[0].sum(0))


def test_non_contiguous_input():
    base = torch.randn(7, 4, 3)
    x = base.transpose(0, 1).requires_grad_()  # [4, 7, 3], time stride is not the outermost
    spikes = fastsnn.lif_multistep(x)
    assert torch.equal(spikes, reference.lif_multistep(x))


def test_modules_match_functional():
    x = torch.randn(4, 2, 8)
    lif = fastsnn.LIF(tau=3.0, v_reset=None, surrogate="sigmoid", detach_reset=True)
    assert torch.equal(lif(x), fastsnn.lif_multistep(x, tau=3.0, v_reset=None, surrogate="sigmoid"))
    neuron = fastsnn.IF(v_threshold=0.5)
    assert torch.equal(neuron(x), fastsnn.if_multistep(x, v_threshold=0.5))
    assert "tau=3.0" in repr(lif)


def test_module_records_spike_rate():
    x = torch.randn(4, 2, 8)
    lif = fastsnn.LIF()
    lif.record_rate = True
    spikes = lif(x)
    assert lif.spike_rate == spikes.float().mean()


def test_saved_bytes_equal_one_input():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(4, 3, 33).to(dtype).requires_grad_()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fastsnn.lif_multistep(x)
        assert sum(saved) == x.numel() * x.element_size()


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    lif = fastsnn.LIF()

    def net(x):  # x [T, B, 2, H, W]
        T, B = x.shape[:2]
        y = model(x.flatten(0, 1)).view(T, B, 4, *x.shape[3:])
        return lif(y)

    x = torch.randn(3, 2, 2, 5, 5, requires_grad=True)
    eager = net(x)
    g_eager = torch.autograd.grad(eager.sum(), x)[0]
    compiled = torch.compile(net, fullgraph=True)(x)
    g_compiled = torch.autograd.grad(compiled.sum(), x)[0]
    assert torch.equal(compiled, eager)
    assert_close(g_compiled, g_eager)


def test_ops_are_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 2, 3)
        spikes, v = torch.ops.fastsnn.lif_forward(x, None, 1, 2.0, 1.0, 0.0, True, 0, 2.0, False, True)
    assert spikes.shape == (4, 2, 3) and v.shape == (2, 3)
    torch.library.opcheck(torch.ops.fastsnn.lif_forward.default,
                          (torch.randn(3, 2, 5, requires_grad=True), None, 1, 2.0, 1.0, 0.0, True, 0, 2.0, False,
                           True))
