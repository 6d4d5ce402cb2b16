"""Fused BatchNorm + residual + neuron (fastsnn.bn_lif / bn_if, BNLIF/BNIF, the zoo's fused blocks): the Triton
kernels against torch.nn.functional.batch_norm + fastsnn.reference on every device of this process."""
import pytest
import torch

import fastsnn
from fastsnn import models, reference
from fastsnn.ops.bn_lif import apply_bn_neuron
from fastsnn.spec import NeuronSpec
from helpers import assert_close, count_launches, product_cases, saved_activation_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 cases run on CUDA only (see conftest)
SHAPES = {"3x7x7": (3, 7, 7), "64x5x5": (64, 5, 5), "5x4x6": (5, 4, 6), "bn1d-10": (10,)}
NEURONS = {"lif": dict(), "lif-soft-sigmoid": dict(v_reset=None, surrogate="sigmoid"),
           "lif-nodecay-pq": dict(decay_input=False, surrogate="piecewise_quadratic", detach_reset=True),
           "if-erf": dict(kind="if", surrogate="erf"), "lif-tau3-vr": dict(tau=3.0, v_threshold=0.8, v_reset=-0.2)}


def _spec(options):
    options = dict(options)
    kind = options.pop("kind", "lif" if options.pop("decay_input", True) else "lif_no_decay")
    return NeuronSpec.create("test", kind=kind, **options)


def _layout(x, channels_last):
    """x [T, B, C, H, W] with each timestep's [B, C, H, W] in channels_last, values unchanged."""
    if not channels_last or x.dim() != 5:
        return x
    return x.flatten(0, 1).to(memory_format=torch.channels_last).view(x.shape)


def _case(T, B, per_sample, dtype, channels_last, residual, device):
    C = per_sample[0]
    x = _layout(torch.randn(T, B, *per_sample, device=device) * 1.7 + 0.6, channels_last).to(dtype)
    weight = torch.rand(C, device=device) + 0.5
    bias = torch.randn(C, device=device) * 0.4 + 0.6
    r = _layout(torch.randn(T, B, *per_sample, device=device) * 0.5, channels_last).to(dtype) if residual else None
    stats = (torch.randn(C, device=device) * 0.2, torch.rand(C, device=device) + 0.5)
    return x, weight, bias, r, stats


def _run(fn, x, weight, bias, r, running, grad_spikes, **kw):
    """fn(...) -> (spikes, running_mean, running_var, grads of x, weight, bias[, residual]) on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    r_leaf = None if r is None else r.detach().clone().requires_grad_()
    running = [t.clone() for t in running]
    spikes = fn(*leaves, *running, residual=r_leaf, **kw)
    grads = torch.autograd.grad((spikes.float() * grad_spikes).sum(), leaves + ([r_leaf] if r is not None else []))
    return spikes, running, grads


def _reference(x, weight, bias, rm, rv, *, spec, training, residual=None, residual_bn=None, repeat=None,
               momentum=0.1, eps=1e-5):
    """The oracle in fp32 (x and residual upcast), the result cast back to x's dtype."""
    r = None if residual is None else residual.float()
    return reference.bn_lif_multistep(x.float(), weight, bias, rm, rv, spec, training=training, momentum=momentum,
                                      eps=eps, residual=r, residual_bn=residual_bn, repeat=repeat).to(x.dtype)


def _compare(got, want, dtype):
    spikes, running, grads = got
    w_spikes, w_running, w_grads = want
    assert spikes.dtype == dtype and spikes.shape == w_spikes.shape
    assert torch.equal(spikes, w_spikes), f"{(spikes != w_spikes).sum().item()} spikes differ"
    for a, b in zip(running, w_running):
        assert_close(a, b, torch.float32)
    for a, b in zip(grads, w_grads):
        # BN's backward subtracts per-channel means of g: compare at the scale of the largest gradient
        assert_close(a.float(), b.float(), dtype, scale=max(1.0, b.abs().max().item()))
    assert w_grads[0].abs().sum() > 0 and w_grads[1].abs().sum() > 0  # a test that cannot fail is a defect


@pytest.mark.parametrize("dtype,T,per_sample,neuron,channels_last,residual,training", product_cases(
    dtype=DTYPES, T=[1, 2, 4, 7], shape=SHAPES, neuron=NEURONS, layout={"nchw": False, "channels_last": True},
    residual={"residual": True, "": False}, mode={"train": True, "eval": False}))
def test_bn_neuron_kernels_match_batch_norm_and_the_reference(device, dtype, T, per_sample, neuron, channels_last,
                                                              residual, training):
    x, weight, bias, r, running = _case(T, 3, per_sample, dtype, channels_last, residual, device)
    spec = _spec(neuron)
    grad_spikes = torch.randn(x.shape, device=device)
    got = _run(lambda *a, **kw: apply_bn_neuron("test", *a, spec, training=training, backend="triton", **kw),
               x, weight, bias, r, running, grad_spikes)
    want = _run(lambda *a, **kw: _reference(*a, spec=spec, training=training, **kw), x, weight, bias, r, running,
                grad_spikes)
    _compare(got, want, dtype)
    if channels_last:
        assert got[0].stride() == x.stride()


@pytest.mark.parametrize("T", [9, 17], ids=lambda T: f"T{T}")  # chunks restarted from membrane checkpoints
def test_long_sequences(device, T):
    x, weight, bias, r, running = _case(T, 2, (6, 3, 5), torch.float32, False, True, device)
    spec = _spec(NEURONS["lif-tau3-vr"])
    g = torch.randn(x.shape, device=device)
    got = _run(lambda *a, **kw: fastsnn.bn_lif(*a, training=True, tau=3.0, v_threshold=0.8, v_reset=-0.2,
                                               backend="triton", **kw), x, weight, bias, r, running, g)
    _compare(got, _run(lambda *a, **kw: _reference(*a, spec=spec, training=True, **kw), x, weight, bias, r, running,
                       g), torch.float32)


@pytest.mark.parametrize("neuron", ["lif-tau3-vr", "lif-nodecay-pq", "lif-soft-sigmoid"])
@pytest.mark.parametrize("T,residual", [(4, True), (11, False)], ids=["T4-residual", "T11"])
def test_gpu_arithmetic_matches_the_reference(device, neuron, T, residual):
    """The CUDA code path (the FMA-corrected division, the BatchNorm affine as one fused fma) on the CPU, run by
    the interpreter with a GPU's rounding (fastsnn.testing.gpu_arithmetic; on CUDA the kernels themselves)."""
    import contextlib

    from fastsnn.testing import gpu_arithmetic

    x, weight, bias, r, running = _case(T, 3, (5, 4, 6), torch.float32, False, residual, device)
    options = dict(NEURONS[neuron])
    spec = _spec(options)
    g = torch.randn(x.shape, device=device)
    with gpu_arithmetic() if device == "cpu" else contextlib.nullcontext():
        got = _run(lambda *a, **kw: apply_bn_neuron("test", *a, spec, training=True, backend="triton", **kw),
                   x, weight, bias, r, running, g)
    want = _run(lambda *a, **kw: _reference(*a, spec=spec, training=True, **kw), x, weight, bias, r, running, g)
    _compare(got, want, torch.float32)

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_repeat_normalises_one_timestep_and_sums_its_gradient(device, channels_last, training):
    T, C = 5, 6
    step = torch.randn(3, C, 4, 5, device=device) * 1.5 + 0.5
    step = step.to(memory_format=torch.channels_last) if channels_last else step
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device) * 0.3 + 0.7
    running = (torch.zeros(C, device=device), torch.ones(C, device=device))
    g = torch.randn(T, *step.shape, device=device)
    spec = _spec({})
    got = _run(lambda *a, **kw: fastsnn.bn_lif(*a, training=training, repeat=T, backend="triton", **kw), step,
               weight, bias, None, running, g)
    want = _run(lambda *a, **kw: _reference(*a, spec=spec, training=training, repeat=T, **kw), step, weight, bias,
                None, running, g)
    _compare(got, want, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fastsnn.bn_lif(step.requires_grad_(), weight, bias, *running, training=training, repeat=T, backend="triton")
    # one timestep of x, [mean, 1/std, scale, shift] per channel, and the weight (a parameter, for dL/dx)
    assert sum(saved) == step.numel() * 4 + 4 * C * 4 + C * 4


def test_if_and_functional_forms_agree(device):
    x, weight, bias, r, running = _case(4, 2, (5, 3, 3), torch.float32, False, True, device)
    got = fastsnn.bn_if(x, weight, bias, *[t.clone() for t in running], training=True, residual=r, v_threshold=0.7,
                        backend="triton")
    want = _reference(x, weight, bias, *[t.clone() for t in running], spec=_spec(dict(kind="if", v_threshold=0.7)),
                      training=True, residual=r)
    assert torch.equal(got, want)


def test_no_affine_and_no_running_statistics(device):
    x, _, _, _, _ = _case(3, 4, (5, 2, 3), torch.float32, False, False, device)
    g = torch.randn(x.shape, device=device)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    got = fastsnn.bn_lif(xa, None, None, None, None, training=True, backend="triton")
    want = _reference(xb, None, None, None, None, spec=_spec({}), training=True)
    assert torch.equal(got, want)
    assert_close(torch.autograd.grad((got * g).sum(), xa)[0], torch.autograd.grad((want * g).sum(), xb)[0],
                 scale=10.0)


@pytest.mark.parametrize("layout", ["sliced", "transposed-residual", "expanded-residual"])
def test_hostile_layouts(device, layout):
    T, B, C = 3, 2, 4
    base = torch.randn(T, B, C + 3, 5, 6, device=device) * 2
    x = base[:, :, 1:C + 1] if layout == "sliced" else base[:, :, :C].contiguous()
    r = torch.randn(T, B, C, 5, 6, device=device)
    if layout == "transposed-residual":
        r = torch.randn(T, B, C, 6, 5, device=device).transpose(3, 4)
    elif layout == "expanded-residual":
        r = torch.randn(1, B, C, 5, 6, device=device).expand(T, B, C, 5, 6)
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    running = (torch.zeros(C, device=device), torch.ones(C, device=device))
    g = torch.randn(x.shape, device=device)
    got = _run(lambda *a, **kw: fastsnn.bn_lif(*a, training=True, backend="triton", **kw), x, weight, bias, r,
               running, g)
    want = _run(lambda *a, **kw: _reference(*a, spec=_spec({}), training=True, **kw), x, weight, bias, r, running, g)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("unaligned", ["grad_spikes", "residual"])
def test_backward_tiling_follows_unaligned_pointers(device, unaligned, monkeypatch):
    """The backward reuses the forward's tiling (16 bytes per thread for aligned pointers) only while every
    pointer it reads is still 16-byte aligned: an incoming gradient, or a residual, 4 bytes off gets the
    unaligned tiling there (on a GPU the wide accesses would fault), and the same result as the reference."""
    from fastsnn.kernels import bn_lif as kernels

    T, B, C, H, W = 2, 4, 4, 16, 16
    x = torch.randn(T, B, C, H, W, device=device) * 2
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    running = (torch.zeros(C, device=device), torch.ones(C, device=device))

    def off_by_one_float(t):  # the same values, dense, at an address 4 bytes past a 16-byte boundary
        buffer = torch.empty(t.numel() + 1, device=device)
        buffer[1:].copy_(t.flatten())
        return buffer[1:].view(t.shape)

    r = torch.randn(T, B, C, H, W, device=device)
    g = torch.randn(T, B, C, H, W, device=device)
    if unaligned == "residual":
        r = off_by_one_float(r)
    else:
        g = off_by_one_float(g)
    assert (g.data_ptr() | r.data_ptr()) % 16 == 4
    tilings = {"forward": [], "backward": []}
    fire, fire_backward = kernels.bn_fire, kernels.bn_fire_backward
    monkeypatch.setattr(kernels, "bn_fire", lambda *a, **kw: (tilings["forward"].append(a[5]), fire(*a, **kw))[1])
    monkeypatch.setattr(kernels, "bn_fire_backward", lambda *a, **kw: (tilings["backward"].append(a[10]),
                                                                       fire_backward(*a, **kw))[1])
    xl, wl, bl, rl = (t.clone().requires_grad_() for t in (x, weight, bias, r))
    if unaligned == "residual":
        rl = off_by_one_float(r).requires_grad_()
    spikes = fastsnn.bn_lif(xl, wl, bl, *running, training=True, residual=rl, backend="triton")
    got = torch.autograd.grad(spikes, (xl, wl, bl, rl), g)

    def tiling(aligned):
        return kernels._geometry_of(x.shape, x.stride(), x.element_size(), aligned)
    assert tiling(True) is not tiling(False) and tiling(True).block != tiling(False).block
    assert tilings["forward"] == [tiling(unaligned != "residual")]
    assert tilings["backward"] == [tiling(False)]
    want_leaves = [t.clone().requires_grad_() for t in (x, weight, bias, r)]
    want_spikes = reference.bn_lif_multistep(*want_leaves[:3], *[t.clone() for t in running], _spec({}),
                                             training=True, residual=want_leaves[3])
    assert torch.equal(spikes, want_spikes)
    for a, b in zip(got, torch.autograd.grad(want_spikes, want_leaves, g)):
        assert_close(a, b, torch.float32, scale=max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["m0.1", "m0.5", "cumulative"])
def test_running_statistics_after_three_steps_equal_batchnorm2d(device, momentum):
    C = 6
    fused = fastsnn.BNLIF(C, momentum=momentum, backend="triton").to(device)
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).to(device)
    lif = fastsnn.LIF(backend="reference")
    for step in range(3):
        x = torch.randn(4, 3, C, 5, 5, device=device) * (step + 1) + step
        got = fused(x)
        want = lif(bn(x.flatten(0, 1)).unflatten(0, (4, 3)))
        assert torch.equal(got, want)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(fused, name), getattr(bn, name))
    assert int(fused.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    fused.eval()
    bn.eval()
    x = torch.randn(4, 3, C, 5, 5, device=device)
    assert torch.equal(fused(x), lif(bn(x.flatten(0, 1)).unflatten(0, (4, 3))))
    assert list(fused.state_dict()) == list(bn.state_dict())
    fused.load_state_dict(bn.state_dict())  # nn.BatchNorm2d checkpoints load unchanged


def test_launches_per_call(device):
    x, weight, bias, r, running = _case(4, 2, (8, 4, 4), torch.float32, False, True, device)
    x.requires_grad_()
    with count_launches() as fwd:
        spikes = fastsnn.bn_lif(x, weight, bias, *running, training=True, residual=r, backend="triton")
    with count_launches() as bwd:
        spikes.sum().backward()
    with count_launches() as ev:
        fastsnn.bn_lif(x, weight, bias, *running, training=False, backend="triton")
    # statistics, per-channel finalisation, fire | neuron backward, finalisation, grad_x | eval: one pass over x
    assert (len(fwd["triton"]), len(bwd["triton"]), len(ev["triton"])) == (3, 3, 2)
    assert [op for op in fwd["aten"] + ev["aten"] if "copy" in op or "batch_norm" in op] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T", [4, 12], ids=lambda T: f"T{T}")
def test_saved_bytes_are_x_and_per_channel_statistics(device, dtype, T):
    B, C, H, W = 2, 5, 3, 4
    x = torch.randn(T, B, C, H, W, device=device).to(dtype).requires_grad_()
    r = torch.randn(T, B, C, H, W, device=device).to(dtype)
    weight, bias = torch.ones(C, device=device, requires_grad=True), torch.zeros(C, device=device, requires_grad=True)
    for residual in (None, r):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fastsnn.bn_lif(x, weight, bias, None, None, training=True, residual=residual, backend="triton")
        checkpoints = 4 * B * C * H * W * (-(-T // 8) - 1)  # fp32 membrane every 8 steps when T > 8
        extra = 0 if residual is None else r.numel() * r.element_size()  # the caller's tensor, kept by reference
        assert sum(saved) == x.numel() * x.element_size() + weight.numel() * 4 + 4 * C * 4 + checkpoints + extra


def _residual_bn_case(T, per_sample, dtype, channels_last, affine, device):
    C = per_sample[0]
    r = _layout(torch.randn(T, 3, *per_sample, device=device) * 2.0 + 0.3, channels_last).to(dtype)
    params = (torch.rand(C, device=device) + 0.5, torch.randn(C, device=device) * 0.3) if affine else (None, None)
    return r, params, (torch.randn(C, device=device) * 0.2, torch.rand(C, device=device) + 0.5)


def _run_residual_bn(fn, x, weight, bias, running, r, r_params, r_running, grad_spikes):
    """fn(...) -> (spikes, both BatchNorms' running statistics, grads of x, weight, bias, r, r's weight and
    bias (those that exist))."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, r, *r_params)]
    running, r_running = [t.clone() for t in running], [t.clone() for t in r_running]
    spikes = fn(*leaves[:3], *running, residual=leaves[3], residual_bn=(*leaves[4:], *r_running))
    inputs = [t for t in leaves if t is not None]
    return spikes, running + r_running, torch.autograd.grad((spikes.float() * grad_spikes).sum(), inputs)


@pytest.mark.parametrize("dtype,T,per_sample,neuron,channels_last,training,affine", product_cases(
    dtype=DTYPES, T=[1, 4, 9], shape={k: SHAPES[k] for k in ("3x7x7", "5x4x6", "bn1d-10")},
    neuron={k: NEURONS[k] for k in ("lif", "lif-soft-sigmoid", "if-erf")}, layout={"nchw": False,
    "channels_last": True}, mode={"train": True, "eval": False}, residual_affine={"": True, "no-affine": False}))
def test_residual_batch_norm_matches_two_batch_norms_and_the_reference(device, dtype, T, per_sample, neuron,
                                                                       channels_last, training, affine):
    """y = BN(x) + BN_r(r) in one op (a ResNet block with a downsample shortcut) against two F.batch_norm and
    the reference neuron: spikes, both BatchNorms' running statistics, and the gradients of x, r and both
    BatchNorms' weight and bias."""
    x, weight, bias, _, running = _case(T, 3, per_sample, dtype, channels_last, False, device)
    r, r_params, r_running = _residual_bn_case(T, per_sample, dtype, channels_last, affine, device)
    spec = _spec(neuron)
    grad_spikes = torch.randn(x.shape, device=device)
    got = _run_residual_bn(lambda *a, **kw: apply_bn_neuron("test", *a, spec, training=training, backend="triton",
                                                            **kw), x, weight, bias, running, r, r_params, r_running,
                           grad_spikes)
    want = _run_residual_bn(lambda *a, **kw: _reference(*a, spec=spec, training=training, **kw), x, weight, bias,
                            running, r, r_params, r_running, grad_spikes)
    _compare(got, want, dtype)
    assert len(got[2]) == (6 if affine else 4) and want[2][3].abs().sum() > 0  # dL/dr is not trivially zero
    if channels_last:
        assert got[0].stride() == x.stride()


def test_residual_batch_norm_saves_its_input_and_takes_five_launches_each_way(device):
    T, B, C, H, W = 4, 2, 6, 5, 3
    x = torch.randn(T, B, C, H, W, device=device, requires_grad=True)
    r = torch.randn(T, B, C, H, W, device=device, requires_grad=True)
    params = [torch.rand(C, device=device, requires_grad=True) + 0.5 for _ in range(4)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        with count_launches() as fwd:
            spikes = fastsnn.bn_lif(x, params[0], params[1], None, None, training=True, residual=r,
                                    residual_bn=(params[2], params[3], None, None), backend="triton")
    # x and r (the shortcut convolution's output; its BatchNorm's output never exists), both [4, C] tables and
    # the two weights
    assert sum(saved) == x.numel() * 4 + r.numel() * 4 + 2 * 4 * C * 4 + 2 * C * 4
    with count_launches() as bwd:
        grads = torch.autograd.grad(spikes, [x, r, *params], torch.randn_like(spikes))
    # statistics and finalisation for each, fire | neuron backward, two finalisations, dL/dr, dL/dx
    assert (len(fwd["triton"]), len(bwd["triton"])) == (5, 5)
    assert [op for op in fwd["aten"] if "copy" in op or "batch_norm" in op] == []
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (None, 1e-5), (0.3, 1e-3)], ids=["m0.1", "cumulative",
                                                                                       "other-eps"])
def test_the_module_pair_takes_the_shortcut_batch_norm(device, momentum, eps):
    """LIF()(x, bn=bn, residual=r, residual_bn=bn_r) against bn(x) + bn_r(r) and the neuron, over three training
    steps and an eval step: results, gradients, running statistics and num_batches_tracked of both modules. A
    residual_bn with another eps than bn's runs as its own BatchNorm first (same results)."""
    C = 6
    bns = [torch.nn.BatchNorm2d(C, momentum=momentum).to(device), torch.nn.BatchNorm2d(C, eps=eps).to(device)]
    plain = [torch.nn.BatchNorm2d(C, momentum=momentum).to(device), torch.nn.BatchNorm2d(C, eps=eps).to(device)]
    lif, ref = fastsnn.LIF(backend="triton"), fastsnn.LIF(backend="reference")
    for step in range(4):
        if step == 3:
            for m in bns + plain:
                m.eval()
        x = (torch.randn(4, 3, C, 5, 5, device=device) * (step + 1) + step).requires_grad_()
        r = (torch.randn(4, 3, C, 5, 5, device=device) * 2 - step).requires_grad_()
        got = lif(x, bn=bns[0], residual=r, residual_bn=bns[1])
        want = ref((plain[0](x.flatten(0, 1)) + plain[1](r.flatten(0, 1))).unflatten(0, (4, 3)))
        assert torch.equal(got, want)
        g = torch.randn(got.shape, device=device)
        params = [x, r, *bns[0].parameters(), *bns[1].parameters()]
        for a, b in zip(torch.autograd.grad((got * g).sum(), params),
                        torch.autograd.grad((want * g).sum(), [x, r, *plain[0].parameters(),
                                                                *plain[1].parameters()])):
            assert_close(a, b, scale=max(1.0, b.abs().max().item()))
    for fused, unfused in zip(bns, plain):
        for (key, a), b in zip(fused.state_dict().items(), unfused.state_dict().values()):
            assert_close(a.float(), b.float()) if a.is_floating_point() else torch.equal(a, b), key
        assert int(fused.num_batches_tracked) == 3

@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(x=torch.zeros(2, 3)), ValueError, ["x must have shape [T, B, C, ...]", "at least 3 dims"]),
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, ["x must have a floating dtype", "int32"]),
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, ["x must have a floating dtype", "float64"]),
    (dict(weight=torch.ones(5)), ValueError, ["weight must have shape (4,)", "one value per channel"]),
    (dict(running_mean=torch.zeros(3)), ValueError, ["running_mean must have shape (4,)"]),
    (dict(running_var=None), ValueError, ["running_mean and running_var must be given together"]),
    (dict(running_mean=torch.zeros(4, device="meta")), ValueError, ["running_mean must be on x's device"]),
    (dict(eps=0.0), ValueError, ["eps must be a finite number > 0", "0.0"]),
    (dict(eps=float("nan")), ValueError, ["eps must be a finite number > 0"]),
    (dict(momentum=1.5), ValueError, ["momentum must be a number in [0, 1]", "1.5"]),
    (dict(momentum=-0.1), ValueError, ["momentum must be a number in [0, 1]"]),
    (dict(training="yes"), TypeError, ["training must be True or False"]),
    (dict(training=False, running_mean=None, running_var=None), ValueError, ["training=False", "running_mean"]),
    (dict(x=torch.zeros(1, 1, 4)), ValueError, ["more than 1 value per channel"]),
    (dict(residual=torch.zeros(2, 3, 5)), ValueError, ["residual must have x's shape (2, 3, 4)"]),
    (dict(repeat=2, x=torch.zeros(3, 4), residual=torch.zeros(2, 3, 4)), ValueError, ["residual", "repeat"]),
    (dict(repeat=0, x=torch.zeros(3, 4)), ValueError, ["repeat must be None or a number of timesteps >= 1"]),
    (dict(momentum=float("nan")), ValueError, ["momentum must be a number in [0, 1]"]),
    (dict(eps=float("inf")), ValueError, ["eps must be a finite number > 0"]),
    (dict(residual=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, ["residual must have a floating dtype"]),
    (dict(residual=torch.zeros(2, 3, 4, device="meta")), ValueError, ["residual is on meta"]),
    (dict(bias=torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))), TypeError, ["bias must have a floating"]),
    (dict(tau=0.5), ValueError, ["tau must be a finite number > 1"]),
    (dict(surrogate="relu"), ValueError, ["surrogate"]),
    (dict(residual_bn=(None, None, None, None)), ValueError, ["residual_bn normalises the residual",
                                                               "residual is None"]),
    (dict(residual=torch.zeros(2, 3, 4), residual_bn=torch.ones(4)), TypeError,
     ["residual_bn must be None or (weight, bias, running_mean, running_var)", "Tensor"]),
    (dict(residual=torch.zeros(2, 3, 4), residual_bn=(torch.ones(5), None, None, None)), ValueError,
     ["residual_bn's weight must have shape (4,)"]),
    (dict(residual=torch.zeros(2, 3, 4), residual_bn=(None, None, torch.zeros(4), None)), ValueError,
     ["residual_bn's running_mean and running_var must be given together"]),
    (dict(residual=torch.zeros(2, 3, 4), residual_bn=(None, None, None, None), residual_storage="bits"),
     ValueError, ["residual_storage packs spikes", "residual_bn"]),
    (dict(residual=torch.zeros(2, 3, 4), residual_bn=(None, None, None, None), training=False), ValueError,
     ["training=False", "residual_bn's running statistics"]),
])
def test_bad_input_names_the_argument(kwargs, exc, words):
    args = dict(x=torch.randn(2, 3, 4), weight=torch.ones(4), bias=torch.zeros(4), running_mean=torch.zeros(4),
                running_var=torch.ones(4), training=True)
    args.update(kwargs)
    x, weight, bias, rm, rv = (args.pop(k) for k in ("x", "weight", "bias", "running_mean", "running_var"))
    with pytest.raises(exc) as info:
        fastsnn.bn_lif(x, weight, bias, rm, rv, **args)
    message = str(info.value)
    assert message.startswith("bn_lif:") and all(w in message for w in words), message


def test_module_arguments_are_validated():
    with pytest.raises(ValueError, match="BNLIF: tau must be a finite number > 1"):
        fastsnn.BNLIF(4, tau=1.0)
    with pytest.raises(ValueError, match="BNIF: backend must be one of"):
        fastsnn.BNIF(4, backend="cuda")
    with pytest.raises(ValueError, match="stateless"):
        fastsnn.LIF(stateful=True)(torch.zeros(2, 3, 4), bn=torch.nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="bn must be a torch.nn BatchNorm module"):
        fastsnn.LIF()(torch.zeros(2, 3, 4), bn=torch.nn.Identity())


@pytest.mark.parametrize("repeat", [None, 3], ids=["sequence", "repeat3"])
def test_torch_compile_fullgraph_matches_eager(device, repeat):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(2, 4, 3, padding=1).to(device)
    bn_eager, bn_compiled = torch.nn.BatchNorm2d(4).to(device), torch.nn.BatchNorm2d(4).to(device)
    lif = fastsnn.LIF(backend="triton")

    def net(x, bn):
        if repeat:
            return lif(conv(x), repeat=repeat, bn=bn)
        return lif(conv(x.flatten(0, 1)).unflatten(0, x.shape[:2]), bn=bn)

    x = torch.randn(*(() if repeat else (3,)), 2, 2, 5, 5, device=device, requires_grad=True)
    eager = net(x, bn_eager)
    g_eager = torch.autograd.grad(eager.sum(), [x, conv.weight])
    compiled = torch.compile(net, fullgraph=True)(x, bn_compiled)
    g_compiled = torch.autograd.grad(compiled.sum(), [x, conv.weight])
    assert torch.equal(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        assert_close(a, b, scale=10.0)
    assert_close(bn_compiled.running_var, bn_eager.running_var)


@pytest.mark.parametrize("mixed_layouts", [False, True], ids=["same-layout", "channels_last-x-nchw-residual"])
def test_torch_compile_fullgraph_with_a_residual_batch_norm(device, mixed_layouts):
    import copy

    torch._dynamo.reset()
    C = 4
    bns = [torch.nn.BatchNorm2d(C).to(device), torch.nn.BatchNorm2d(C).to(device)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.6)
    bns_compiled = copy.deepcopy(bns)
    lif = fastsnn.LIF(backend="triton")

    def net(x, r, bn, bn_r):
        return lif(x * 1.5, bn=bn, residual=r + 0.5, residual_bn=bn_r)

    x = torch.randn(3, 2, C, 5, 5, device=device)
    if mixed_layouts:
        x = x.flatten(0, 1).to(memory_format=torch.channels_last).view(x.shape)
    r = torch.randn(3, 2, C, 5, 5, device=device)
    results = []
    for fn, modules in ((net, bns), (torch.compile(net, fullgraph=True), bns_compiled)):
        leaves = [x.clone().requires_grad_(), r.clone().requires_grad_()]
        spikes = fn(*leaves, *modules)
        params = leaves + [p for m in modules for p in m.parameters()]
        results.append((spikes, torch.autograd.grad(spikes, params, torch.ones_like(spikes) * 0.7)))
    (eager, g_eager), (compiled, g_compiled) = results
    assert torch.equal(compiled, eager) and eager.float().mean() > 0
    for a, b in zip(g_compiled, g_eager):
        assert a.stride() == b.stride()
        assert_close(a, b, scale=10.0)
    for a, b in zip(bns_compiled, bns):
        assert_close(a.running_mean, b.running_mean)
        assert_close(a.running_var, b.running_var)

def test_torch_compile_dynamic_shapes_and_arguments(device):
    """torch.compile(dynamic=True): shapes and the Python scalars (momentum, eps, tau) traced as symbols."""
    torch._dynamo.reset()

    def step(x, weight, bias, running_mean, running_var, momentum, tau):
        return fastsnn.bn_lif(x * 2.0, weight, bias, running_mean, running_var, training=True, momentum=momentum,
                              tau=tau, backend="triton")

    compiled_step = torch.compile(step, fullgraph=True, dynamic=True)
    for T, B, C, H, momentum, tau in ((3, 2, 4, 5, 0.1, 2.0), (2, 3, 4, 6, 0.3, 3.0)):
        x = torch.randn(T, B, C, H, H, requires_grad=True)
        weight, bias = torch.rand(C) + 0.5, torch.randn(C)
        running = [torch.zeros(C), torch.ones(C)]
        running_compiled = [t.clone() for t in running]
        eager = step(x, weight, bias, *running, momentum, tau)
        compiled = compiled_step(x, weight, bias, *running_compiled, momentum, tau)
        assert torch.equal(compiled, eager)
        for a, b in zip(running_compiled, running):
            assert_close(a, b)
        g = torch.randn(x.shape)
        assert_close(torch.autograd.grad(compiled, x, g)[0], torch.autograd.grad(eager, x, g)[0], scale=10.0)


def test_ops_pass_opcheck(device):
    args = ("lif", 2.0, 1.0, 0.0, "atan", 2.0, False)
    x = torch.randn(3, 2, 4, 5, device=device, requires_grad=True)
    w, b = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    stats = torch.ops.fastsnn.bn_statistics(x.detach(), w.detach(), b.detach(), None, None, True, 0.1, 1e-5, 0)
    fire = torch.ops.fastsnn.bn_neuron.default
    no_sources = (None,) * 6
    torch.library.opcheck(fire, (x, w, b, None, None, None, None, stats, None, *no_sources, *args, True, 0, None,
                                 None, False, None))
    spike_residual = (torch.rand(x.shape, device=device) < 0.3).float().requires_grad_()
    torch.library.opcheck(fire, (x, w, b, spike_residual, None, None, None, stats, None, *no_sources, *args, True, 0,
                                 None, "bits", True, None))
    residual = torch.randn(x.shape, device=device, requires_grad=True)
    wr, br = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    residual_stats = torch.ops.fastsnn.bn_statistics(residual.detach(), wr.detach(), br.detach(), None, None, True,
                                                     0.1, 1e-5, 0)
    torch.library.opcheck(fire, (x, w, b, residual, wr, br, None, stats, residual_stats, *no_sources, *args, True, 0,
                                 None, None, False, None))
    torch.library.opcheck(torch.ops.fastsnn.bn_statistics.default,
                          (x.detach(), w.detach(), b.detach(), torch.zeros(4, device=device),
                           torch.ones(4, device=device), True, 0.1, 1e-5, 0))


# ---- the zoo: fused and unfused models agree ----

def _tiny(name, fuse_bn, device, **kw):
    from functools import partial

    from fastsnn.models.zoo import VGG, DigitsNet, ResNet

    neuron = partial(fastsnn.MultistepNeuron.from_spec, NeuronSpec.create("test", detach_reset=True),
                     backend="triton")
    if name == "resnet":
        model = ResNet([1, 1], [4, 8], 5, T=2, neuron=neuron, fuse_bn=fuse_bn, stem_width=4, **kw)
    elif name == "sew":
        model = ResNet([1, 1], [4, 8], 5, T=2, neuron=neuron, block="sew", fuse_bn=fuse_bn, stem="imagenet", **kw)
    elif name == "vgg":
        model = VGG([4, "M", 8], 5, T=2, neuron=neuron, fuse_bn=fuse_bn)
    else:
        model = DigitsNet(5, T=2, neuron=neuron, in_channels=3, width=4, fuse_bn=fuse_bn)
    return model.to(device)


@pytest.mark.parametrize("name", ["resnet", "sew", "vgg", "digits"])
@pytest.mark.parametrize("time_major", [False, True], ids=["images", "time-major"])
def test_fused_model_equals_unfused(device, name, time_major):
    fused, plain = _tiny(name, True, device), _tiny(name, False, device)
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(2, 2, 3, 12, 12, device=device) if time_major else torch.rand(2, 3, 12, 12, device=device)
    out_f, out_p = fused(x), plain(x)
    assert torch.equal(out_f, out_p)
    params_f, params_p = list(fused.parameters()), list(plain.parameters())
    for a, b in zip(torch.autograd.grad(out_f.square().sum(), params_f),
                    torch.autograd.grad(out_p.square().sum(), params_p)):
        assert_close(a, b, scale=max(1.0, b.abs().max().item()))
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert_close(a.float(), b.float()) if a.is_floating_point() else torch.equal(a, b), key


@pytest.mark.parametrize("name", ["resnet", "sew", "vgg", "resnet-channels_last"])
def test_compiled_zoo_model_has_no_graph_break_keeps_its_bits_and_matches_eager(device, name):
    """torch.compile(fullgraph=True) of a student: the spike convolutions and pools, the fused BatchNorm + neuron
    and its packed residual run as custom ops, so the compiled step saves what the eager one saves (it saved 44%
    more for spiking_resnet19, dense residuals and spike inputs, across 38 graph breaks); compiling it prints no
    warning that comes from fastsnn's code (Dynamo warned about tracing through fastsnn's lru caches)."""
    import copy
    import warnings

    torch._dynamo.reset()
    name, _, layout = name.partition("-")
    eager_model = _tiny(name, True, device)
    x = torch.rand(2, 3, 12, 12, device=device)
    if layout == "channels_last":  # the fused op's backward then has a layout of its own to declare
        eager_model, x = eager_model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x), eager_model(x)  # traced and compiled outside the count (the running statistics move alike)
    ours = [str(w.message) for w in caught if "fastsnn" in str(w.message) or "fastsnn" in w.filename]
    assert not ours, ours[0][:500]
    out_e, saved_e = saved_activation_bytes(eager_model, lambda: eager_model(x))
    out_c, saved_c = saved_activation_bytes(compiled_model, lambda: compiled(x))
    assert torch.equal(out_c, out_e)
    params_e, params_c = list(eager_model.parameters()), list(compiled_model.parameters())
    g = torch.randn(out_e.shape, device=device)
    for a, b in zip(torch.autograd.grad(out_c, params_c, g), torch.autograd.grad(out_e, params_e, g)):
        assert_close(a, b, scale=max(1.0, b.abs().max().item()))
    for a, b in zip(compiled_model.state_dict().values(), eager_model.state_dict().values()):
        assert_close(a.float(), b.float())
    assert saved_c <= saved_e

def test_models_create_takes_fuse_bn():
    model = models.create("digits_snn", 10, T=2, fuse_bn=False)
    assert model.fuse_bn is False and models.create("digits_snn", 10, T=2).fuse_bn is True
    with pytest.raises(TypeError, match="fuse_bn must be True or False"):
        models.create("digits_snn", 10, T=2, fuse_bn="no")


@pytest.mark.parametrize("storage", ["bits", "uint8"])
def test_residual_kept_packed_gives_the_same_result_and_saves_its_bytes(device, storage):
    T, B, C = 4, 2, 6
    x = torch.randn(T, B, C, 5, 3, device=device) * 1.5
    r = (torch.rand(T, B, C, 5, 3, device=device) < 0.4).float()
    if storage == "uint8":
        r = r * torch.randint(0, 3, r.shape, device=device)
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    g = torch.randn(x.shape, device=device)
    results, saved_bytes = [], []
    for residual_storage in (None, storage):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, r)]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            spikes = fastsnn.bn_lif(*leaves[:3], None, None, training=True, residual=leaves[3],
                                    residual_storage=residual_storage, backend="triton")
        results.append((spikes, torch.autograd.grad((spikes * g).sum(), leaves)))
        saved_bytes.append(sum(saved))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    packed = r.numel() // 8 if storage == "bits" else r.numel()
    assert saved_bytes[0] - saved_bytes[1] == r.numel() * 4 - packed


def test_bad_residual_storage_is_refused():
    with pytest.raises(ValueError, match=r"bn_lif: residual_storage must be None or one of \('bits', 'uint8'\)"):
        fastsnn.bn_lif(torch.randn(2, 3, 4), None, None, None, None, training=True, residual=torch.zeros(2, 3, 4),
                       residual_storage="int4")


SENTINEL = 7.0  # the values around a strided or offset argument, which nothing may write


def _placed(values, layout, requires_grad=True):
    """(the argument: `values` in `layout`, its leaf for gradients, the buffer around it or None).
    Vectors: "strided" every 2nd element of a buffer, "offset" a slice starting at element 3, "expanded" one
    element broadcast (stride 0). Activations [T, ...]: "strided" a slice of a wider channel dim, "offset" a
    view 3 elements in, "expanded" one timestep broadcast over T (time stride 0)."""
    if layout == "expanded":
        leaf = values.detach()[:1].clone().requires_grad_(requires_grad)
        return leaf.expand(values.shape), leaf, None
    n = values.numel()
    if values.dim() == 1:
        buffer = torch.full((2 * n + 3,), SENTINEL, device=values.device)
        view = buffer[:2 * n:2] if layout == "strided" else buffer[3:3 + n]
    elif layout == "strided":
        shape = list(values.shape)
        shape[2] += 2
        buffer = torch.full(shape, SENTINEL, device=values.device, dtype=values.dtype)
        view = buffer[:, :, 1:values.shape[2] + 1]
    else:
        buffer = torch.full((n + 3,), SENTINEL, device=values.device, dtype=values.dtype)
        view = buffer[3:].view(values.shape)
    with torch.no_grad():
        view.copy_(values)
    return view, buffer.requires_grad_(requires_grad), buffer


ARGUMENTS = ("x", "weight", "bias", "running_mean", "running_var", "residual", "r_weight", "r_bias",
             "r_running_mean", "r_running_var")


@pytest.mark.parametrize("layout", ["strided", "offset", "expanded"])
@pytest.mark.parametrize("argument", ARGUMENTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_tensor_argument_in_every_layout(device, argument, layout, training):
    """Each tensor argument of bn_lif given strided, offset into a buffer or expanded (stride 0, over time for
    x and the residual), the others dense: the same spikes, running statistics and gradients as dense copies
    given to the reference; nothing outside the argument is written; an expanded running statistic, which
    training updates in place, is refused in one line."""
    T, B, C = 3, 2, 4
    if argument == "x" and layout == "expanded":
        values = dict(x=(torch.randn(1, B, C, 5, 3, device=device) * 2 + 0.5).expand(T, B, C, 5, 3))
    else:
        values = dict(x=torch.randn(T, B, C, 5, 3, device=device) * 2 + 0.5)
    values["residual"] = torch.randn(T, B, C, 5, 3, device=device)
    for prefix in ("", "r_"):
        values[prefix + "weight"] = torch.rand(C, device=device) + 0.5
        values[prefix + "bias"] = torch.randn(C, device=device)
        values[prefix + "running_mean"] = torch.randn(C, device=device) * 0.2
        values[prefix + "running_var"] = torch.rand(C, device=device) + 0.5
    if layout == "expanded" and argument != "x":  # an expanded vector holds one value: give every entry it
        values[argument] = values[argument][:1].expand(values[argument].shape).contiguous()
    grad_spikes = torch.randn(T, B, C, 5, 3, device=device)
    running = [n for n in ARGUMENTS if "running" in n]

    def call(backend, args):
        return fastsnn.bn_lif(args["x"], args["weight"], args["bias"], args["running_mean"], args["running_var"],
                              training=training, residual=args["residual"], backend=backend,
                              residual_bn=tuple(args["r_" + k] for k in ("weight", "bias", "running_mean",
                                                                         "running_var")))

    # the oracle: the reference on dense leaves
    dense = {k: (v.detach().clone() if "running" in k else v.detach().clone().requires_grad_())
             for k, v in values.items()}
    want_spikes = call("reference", dense)
    differentiable = [k for k in ARGUMENTS if "running" not in k]
    want_grads = dict(zip(differentiable, torch.autograd.grad((want_spikes * grad_spikes).sum(),
                                                              [dense[k] for k in differentiable])))
    given = {k: (v.detach().clone() if "running" in k else v.detach().clone().requires_grad_())
             for k, v in values.items()}
    given[argument], leaf, buffer = _placed(values[argument], layout, requires_grad="running" not in argument)
    if "running" in argument:
        leaf = None
    if "running" in argument and layout == "expanded" and training:
        with pytest.raises(ValueError, match=f"bn_lif: .*{argument.removeprefix('r_')} is updated in place in "
                                             "training mode, so it cannot be an expanded tensor"):
            call("triton", given)
        return
    got_spikes = call("triton", given)
    assert torch.equal(got_spikes, want_spikes), f"{(got_spikes != want_spikes).sum().item()} spikes differ"
    for k in running:
        assert_close(given[k], dense[k], torch.float32)
    inputs = [given[k] for k in differentiable if k != argument] + ([leaf] if leaf is not None else [])
    grads = torch.autograd.grad((got_spikes * grad_spikes).sum(), inputs)
    for k, g in zip([k for k in differentiable if k != argument], grads):
        assert_close(g, want_grads[k], torch.float32, scale=max(1.0, want_grads[k].abs().max().item()))
    if leaf is not None:  # the argument's own gradient, through its view
        want = want_grads[argument]
        expected = torch.zeros_like(leaf)
        if layout == "expanded":
            expected = want.sum(0, keepdim=True) if argument in ("x", "residual") else want.sum().reshape(1)
        else:
            expected.as_strided(given[argument].shape, given[argument].stride(),
                                given[argument].storage_offset()).copy_(want)
        assert_close(grads[-1], expected, torch.float32, scale=max(1.0, expected.abs().max().item()))
    if buffer is not None:  # nothing written around the argument
        outside = torch.ones_like(buffer, dtype=torch.bool)
        outside.as_strided(given[argument].shape, given[argument].stride(), given[argument].storage_offset()).fill_(
            False)
        assert (buffer.detach()[outside] == SENTINEL).all()


@pytest.mark.parametrize("running", [True, False], ids=["running-stats", "no-running-stats"])
def test_torch_compile_of_the_op_alone(device, running):
    """bn_lif compiled on its own (no other op in the graph), with and without running statistics: Inductor
    failed on the mutating statistics op when it had nothing to mutate."""
    torch._dynamo.reset()
    x = torch.randn(4, 2, 3, 5, device=device) * 2
    g = torch.randn(x.shape, device=device)
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    results = []
    for compile_it in (False, True):
        stats = (torch.zeros(3, device=device), torch.ones(3, device=device)) if running else (None, None)

        def fn(t):
            return fastsnn.bn_lif(t, weight, bias, *stats, training=True)
        xl = x.clone().requires_grad_()
        out = (torch.compile(fn, fullgraph=True) if compile_it else fn)(xl)
        results.append((out, torch.autograd.grad((out * g).sum(), xl)[0], stats))
    (eager, g_eager, s_eager), (compiled, g_compiled, s_compiled) = results
    assert torch.equal(eager, compiled)
    assert_close(g_compiled, g_eager, scale=10.0)
    if running:
        assert_close(s_compiled[1], s_eager[1])
