"""Multistep LIF/IF: the Triton kernels against the PyTorch reference, on every device of this process
(interpreted on CPU tensors by default; compiled on CUDA under FASTSNN_COMPILED=1, see test_cuda.py)."""
import pytest
import torch

import fastsnn
from fastsnn import reference
from fastsnn.surrogate import SURROGATES
from helpers import assert_close, product_cases

SURROGATE_NAMES = sorted(SURROGATES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 cases run on CUDA only (see conftest)


def _inputs(T, shape, dtype, with_v_init, device):
    x = (torch.randn(T, *shape, device=device) * 1.5 + 0.4).to(dtype).requires_grad_()
    v_init = (torch.randn(*shape, device=device) * 0.5).to(dtype).requires_grad_() if with_v_init else None
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


def _compare(fn, ref, T, shape, dtype, with_v_init, return_v, device, backend="triton", **kw):
    x, v_init = _inputs(T, shape, dtype, with_v_init, device)
    grad_spikes = torch.randn(T, *shape, device=device)
    grad_v = torch.randn(*shape, device=device) if return_v else None
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


@pytest.mark.parametrize("dtype,T,surrogate,v_reset,decay_input,detach_reset,with_v_init,return_v", product_cases(
    dtype=DTYPES, T=[1, 2, 4, 7], surrogate=SURROGATE_NAMES, reset={"hard": 0.0, "soft": None},
    decay={"decay": True, "no_decay": False}, detach=[True, False], v_init=[True, False], return_v=[True, False]))
def test_lif_kernel_matches_reference(device, dtype, T, surrogate, v_reset, decay_input, detach_reset, with_v_init,
                                      return_v):
    _compare(fastsnn.lif_multistep, reference.lif_multistep, T, (3, 37), dtype, with_v_init, return_v, device,
             surrogate=surrogate, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset)


@pytest.mark.parametrize("dtype,T,v_reset,detach_reset,with_v_init,return_v", product_cases(
    dtype=DTYPES, T=[1, 4, 7], reset={"hard": 0.0, "soft": None}, detach=[True, False], v_init=[True, False],
    return_v=[True, False]))
def test_if_kernel_matches_reference(device, dtype, T, v_reset, detach_reset, with_v_init, return_v):
    ref = lambda x, **kw: reference.lif_multistep(x, neuron="if", **kw)  # noqa: E731
    _compare(fastsnn.if_multistep, ref, T, (5, 19), dtype, with_v_init, return_v, device, surrogate="sigmoid",
             v_reset=v_reset, detach_reset=detach_reset)


@pytest.mark.parametrize("T", [9, 17, 24], ids=lambda T: f"T{T}")  # one partial and two whole extra chunks
@pytest.mark.parametrize("shape", [(41, 401), (2, 3, 5, 7)], ids=["41x401", "2x3x5x7"])
def test_long_sequences_restart_chunks_from_checkpoints(device, T, shape):
    _compare(fastsnn.lif_multistep, reference.lif_multistep, T, shape, torch.float32, True, True, device,
             tau=3.7, v_threshold=0.8, v_reset=-0.2, surrogate="atan")



def _at_threshold(v0, tau, v_threshold, kind, ulps, dtype=torch.float32):
    """x_1 placing the first charged membrane h_1 within `ulps` (an integer tensor) fp32 ulps of the
    threshold, from v_init v0 (v_reset 0): where the rounding of the division by tau decides the spike."""
    target = torch.full_like(v0, v_threshold, dtype=torch.float64)
    v = v0.double()
    x = v + (target - v) * tau if kind == "lif" else target - v + v / tau  # solve h_1 = v_threshold for x_1
    x = x.float()
    return x + ulps * torch.finfo(torch.float32).eps * x.abs()


@pytest.mark.parametrize("tau", [2.0, 1.1, 10 / 3, 1.9999999, 7.0], ids=lambda t: f"tau{t:.7g}")
@pytest.mark.parametrize("kind,v_reset", [("lif", 0.0), ("lif", None), ("lif_no_decay", 0.0)],
                         ids=["lif-hard", "lif-soft", "lif_no_decay-hard"])
def test_gpu_division_gives_the_reference_spikes_at_the_threshold(device, tau, kind, v_reset):
    """The CUDA code path of the division (q = x·r corrected by two fused multiply-adds, fastsnn.kernels.lif
    DIVIDE_FMA): on a GPU compiled; on the CPU run by the interpreter with a GPU's rounding
    (fastsnn.testing.gpu_arithmetic). Spikes must equal the correctly rounded reference bit for bit where
    the division's last bit decides them: a reciprocal multiply alone flips about a tenth of these."""
    import contextlib

    from fastsnn.testing import gpu_arithmetic

    n = 4096
    v0 = torch.rand(n, device=device) * 0.9
    ulps = torch.randint(-4, 5, (n,), device=device)
    first = _at_threshold(v0, tau, 1.0, kind, ulps)
    x = torch.cat([first[None], torch.randn(11, n, device=device) * 1.5 + 0.5]).requires_grad_()  # T = 12: 2 chunks
    v_init = v0.clone().requires_grad_()
    kw = dict(tau=tau, decay_input=kind == "lif", v_reset=v_reset, v_init=v_init, return_v=True)
    with gpu_arithmetic() if device == "cpu" else contextlib.nullcontext():
        spikes, v_final = fastsnn.lif_multistep(x, backend="triton", **kw)
        grad_spikes = torch.randn_like(spikes)
        grads = torch.autograd.grad((spikes * grad_spikes).sum() + v_final.sum(), (x, v_init))
    want, want_v = reference.lif_multistep(x, **kw)
    want_grads = torch.autograd.grad((want * grad_spikes).sum() + want_v.sum(), (x, v_init))
    assert 0.2 < want[0].mean().item() < 0.8  # the first step really sits on the threshold
    assert torch.equal(spikes, want), f"{(spikes != want).sum().item()} spikes differ"
    assert_close(v_final, want_v)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected)

def test_reference_backend_is_the_reference(device):
    _compare(fastsnn.lif_multistep, reference.lif_multistep, 4, (3, 37), torch.float32, True, True, device,
             surrogate="erf", backend="reference")


def test_custom_alpha_changes_the_gradient(device):
    x = torch.randn(4, 64, device=device, requires_grad=True)
    g1 = torch.autograd.grad(fastsnn.lif_multistep(x, alpha=2.0, backend="triton").sum(), x)[0]
    g2 = torch.autograd.grad(fastsnn.lif_multistep(x, alpha=5.0, backend="triton").sum(), x)[0]
    g2_ref = torch.autograd.grad(reference.lif_multistep(x, alpha=5.0).sum(), x)[0]
    assert not torch.allclose(g1, g2)
    assert_close(g2, g2_ref)


def test_channels_last_layout_is_kept_and_correct(device):
    T, B, C, H, W = 3, 2, 5, 4, 3
    x = torch.randn(T * B, C, H, W, device=device).to(memory_format=torch.channels_last).view(T, B, C, H, W)
    x.requires_grad_()
    spikes = fastsnn.lif_multistep(x, backend="triton")
    assert spikes.stride() == x.stride()
    g = torch.randn_like(spikes)
    (gx,) = torch.autograd.grad((spikes * g).sum(), x)
    x_ref = x.detach().contiguous().requires_grad_()
    ref = reference.lif_multistep(x_ref)
    assert torch.equal(spikes, ref)
    assert_close(gx, torch.autograd.grad((ref * g).sum(), x_ref)[0])


@pytest.mark.parametrize("T", [1, 4, 11], ids=lambda T: f"T{T}")
def test_repeat_reads_one_timestep_and_sums_its_gradient_in_the_kernel(device, T):
    step = torch.randn(2, 5, 4, 3, device=device).to(memory_format=torch.channels_last).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        spikes = fastsnn.lif_multistep(step, repeat=T, backend="triton")
    checkpoints = 4 * step.numel() * (-(-T // 8) - 1)
    assert sum(saved) == step.numel() * step.element_size() + checkpoints  # one timestep, not T
    assert spikes.shape == (T, *step.shape) and spikes[0].is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(spikes)
    (grad,) = torch.autograd.grad((spikes * g).sum(), step)
    dense = step.detach().unsqueeze(0).repeat(T, 1, 1, 1, 1).requires_grad_()
    ref = reference.lif_multistep(dense)
    assert torch.equal(spikes, ref)
    assert_close(grad, torch.autograd.grad((ref * g).sum(), dense)[0].sum(0))


def test_input_broadcast_over_time_is_read_in_place(device):
    step = torch.randn(2, 5, 4, 3, device=device).requires_grad_()
    x = step.unsqueeze(0).expand(4, *step.shape)  # a stride-0 view: read in place, its gradient via expand
    spikes = fastsnn.lif_multistep(x, backend="triton")
    g = torch.randn_like(spikes)
    (grad,) = torch.autograd.grad((spikes * g).sum(), step)
    dense = step.detach().unsqueeze(0).repeat(4, 1, 1, 1, 1).requires_grad_()
    ref = reference.lif_multistep(dense)
    assert torch.equal(spikes, ref)
    assert_close(grad, torch.autograd.grad((ref * g).sum(), dense)[0].sum(0))


def test_non_contiguous_input(device):
    base = torch.randn(7, 4, 3, device=device)
    x = base.transpose(0, 1).requires_grad_()  # [4, 7, 3], time stride is not the outermost
    spikes = fastsnn.lif_multistep(x, backend="triton")
    assert torch.equal(spikes, reference.lif_multistep(x))



@pytest.mark.parametrize("shape,kwargs", [
    ((4, 0, 3), {}), ((4, 3, 0), dict(return_v=True, v_init="zeros")), ((0, 5), dict(repeat=3)),
    ((2, 0, 3), dict(decay_input=False, v_reset=None))], ids=["batch0", "v_init-return_v", "repeat", "soft"])
def test_empty_input_gives_empty_results_and_launches_nothing(device, shape, kwargs):
    """A zero-size x (an empty batch) has strides that describe no dense block: the op must not launch a
    kernel on it (one would write past the empty tensors' storage)."""
    from fastsnn.testing import count_launches

    x = torch.randn(shape, device=device, requires_grad=True)
    if kwargs.get("v_init") == "zeros":
        kwargs = dict(kwargs, v_init=torch.zeros(shape[1:], device=device, requires_grad=True))
    with count_launches() as launches:
        out = fastsnn.lif_multistep(x, backend="triton", **kwargs)
        spikes = out[0] if isinstance(out, tuple) else out
        (grad,) = torch.autograd.grad(spikes, x, torch.ones_like(spikes))
    assert launches["triton"] == []
    steps = (kwargs["repeat"], *shape) if "repeat" in kwargs else shape
    assert spikes.shape == steps and spikes.dtype == x.dtype and grad.shape == x.shape
    if kwargs.get("return_v"):
        assert out[1].shape == shape[1:]

def test_modules_match_functional(device):
    x = torch.randn(4, 2, 8, device=device)
    lif = fastsnn.LIF(tau=3.0, v_reset=None, surrogate="sigmoid", detach_reset=True)
    assert torch.equal(lif(x), fastsnn.lif_multistep(x, tau=3.0, v_reset=None, surrogate="sigmoid"))
    neuron = fastsnn.IF(v_threshold=0.5)
    assert torch.equal(neuron(x), fastsnn.if_multistep(x, v_threshold=0.5))
    assert "tau=3.0" in repr(lif) and lif.tau == 3.0 and lif.spec.kind == "lif"
    same = fastsnn.MultistepNeuron.from_spec(lif.spec)
    assert isinstance(same, fastsnn.LIF) and torch.equal(same(x), lif(x))


@pytest.mark.parametrize("T", [4, 8, 9, 17], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_saved_bytes_are_the_input_and_chunk_checkpoints(device, T, dtype):
    x = torch.randn(T, 3, 33, device=device).to(dtype).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastsnn.lif_multistep(x, backend="triton")
    # x itself, plus the fp32 membrane at each chunk boundary when T > 8 (none at T <= 8)
    assert sum(saved) == x.numel() * x.element_size() + 4 * 3 * 33 * (-(-T // 8) - 1)


@pytest.mark.parametrize("repeat", [None, 3], ids=["sequence", "repeat3"])
def test_torch_compile_fullgraph_matches_eager(device, repeat):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).to(device)
    lif = fastsnn.LIF()

    def net(x):  # x [T, B, 2, H, W], or [B, 2, H, W] with repeat
        if repeat:
            return lif(model(x), repeat=repeat)
        T, B = x.shape[:2]
        return lif(model(x.flatten(0, 1)).view(T, B, 4, *x.shape[3:]))

    x = torch.randn(*(() if repeat else (3,)), 2, 2, 5, 5, device=device, requires_grad=True)
    eager = net(x)
    g_eager = torch.autograd.grad(eager.sum(), x)[0]
    compiled = torch.compile(net, fullgraph=True)(x)
    g_compiled = torch.autograd.grad(compiled.sum(), x)[0]
    assert torch.equal(compiled, eager)
    assert_close(g_compiled, g_eager)


def test_torch_compile_dynamic_shapes_and_arguments(device):
    """torch.compile(dynamic=True): shapes and the Python scalars (tau, v_threshold) traced as symbols."""
    torch._dynamo.reset()

    def step(x, tau, v_threshold):
        return fastsnn.lif_multistep(x * 2.0, tau=tau, v_threshold=v_threshold, backend="triton")

    compiled_step = torch.compile(step, fullgraph=True, dynamic=True)
    for shape, tau, v_threshold in (((3, 2, 5), 2.0, 1.0), ((4, 3, 7), 3.0, 0.5)):
        x = torch.randn(shape, requires_grad=True)
        eager = step(x, tau, v_threshold)
        compiled = compiled_step(x, tau, v_threshold)
        assert torch.equal(compiled, eager)
        g = torch.randn(shape)
        assert_close(torch.autograd.grad(compiled, x, g)[0], torch.autograd.grad(eager, x, g)[0])


def test_ops_are_registered_with_fake_kernels(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = ("lif", 2.0, 1.0, 0.0, "atan", 2.0, False)
    with FakeTensorMode():
        x = torch.empty(4, 2, 3, device=device)
        spikes, v, checkpoints = torch.ops.fastsnn.lif(x, None, None, *args, True, 0)
    assert spikes.shape == (4, 2, 3) and v.shape == (2, 3) and checkpoints.numel() == 0
    for x, repeat in ((torch.randn(3, 2, 5, device=device, requires_grad=True), 0),
                      (torch.randn(2, 5, device=device, requires_grad=True), 12)):
        torch.library.opcheck(torch.ops.fastsnn.lif.default, (x, None, None, *args, True, repeat))


def test_host_path_constants_match_the_kernels():
    """The neuron ops decide "no membrane checkpoints" without calling into the kernels module; they agree
    with it. The kinds the spec knows are the kernels' codes."""
    from fastsnn import spec
    from fastsnn.kernels import neuron as kernels
    from fastsnn.ops import _common

    assert _common.MAX_CHUNK == kernels.MAX_CHUNK
    assert spec.KINDS == tuple(kernels.NEURON_CODES) and spec.PARAMETRIC == kernels.PARAMETRIC
    for T in (1, 7, 8, 9, 17):
        x = torch.zeros(T, 2, 3)
        checkpoints = _common.membrane_checkpoints(x)
        assert (checkpoints is None) == (kernels.checkpoints_for(T) == 0)
        if checkpoints is not None:
            assert checkpoints.shape == (kernels.checkpoints_for(T), 2, 3)
