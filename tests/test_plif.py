"""The parametric LIF neuron (fastsnn.plif_multistep, bn_plif, PLIF, BNPLIF): the kernels against the reference
on every device of this process (spikes exactly, dL/dx, dL/dw and dL/dv_init), the reference against
SpikingJelly's ParametricLIFNode (multistep, torch backend), hostile layouts, the bytes saved, a deterministic
dL/dw, and the PLIF of the model zoo."""
import pytest
import torch

import fastsnn
from fastsnn import models, reference
from fastsnn.ops.lif import rate_of
from fastsnn.spec import NeuronSpec
from helpers import assert_close, product_cases

SJ_SURROGATES = {"atan": "ATan", "sigmoid": "Sigmoid", "piecewise_quadratic": "PiecewiseQuadratic", "erf": "Erf"}
KW = ("decay_input", "v_reset", "surrogate", "alpha", "detach_reset")


def _options(decay_input, v_reset, surrogate, detach_reset, alpha=None):
    return dict(decay_input=decay_input, v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)


def _sj(options, init_tau):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    fn = getattr(sj_surrogate, SJ_SURROGATES[options["surrogate"]])
    fn = fn() if options["alpha"] is None else fn(alpha=options["alpha"])
    return sj_neuron.ParametricLIFNode(init_tau=float(init_tau), decay_input=options["decay_input"],
                                       v_reset=options["v_reset"], surrogate_function=fn,
                                       detach_reset=options["detach_reset"], step_mode="m")


def _grads(out, inputs, weight):
    return torch.autograd.grad((out.float() * weight).sum(), inputs)


@pytest.mark.parametrize("T,decay_input,v_reset,surrogate,detach_reset,init_tau,v_init", product_cases(
    T=[1, 3, 8, 11], decay_input={"decay": True, "no-decay": False},
    v_reset={"hard": 0.0, "soft": None, "vr-0.3": -0.3},
    surrogate=list(SJ_SURROGATES), detach_reset={"detach": True, "": False}, init_tau={"tau2": 2.0, "tau5": 5.0},
    v_init={"": False, "v_init": True}))
def test_plif_matches_spikingjelly(T, decay_input, v_reset, surrogate, detach_reset, init_tau, v_init):
    """Our PLIF (kernels under the interpreter, the reference) against SpikingJelly's ParametricLIFNode on the
    CPU: spikes bit for bit, dL/dx, dL/dw and dL/dv_init to tolerance."""
    options = _options(decay_input, v_reset, surrogate, detach_reset)
    node = _sj(options, init_tau)
    with torch.no_grad():
        node.w.add_(0.37)  # not the initial value
    x = (torch.randn(T, 3, 29) * 1.5 + 0.3).requires_grad_()
    v0 = (torch.randn(3, 29) * 0.4).requires_grad_() if v_init else None
    if v_init:
        node.v = v0
    weight = torch.randn(T, 3, 29)
    sj_spikes = node(x)
    sj_grads = _grads(sj_spikes, [x, node.w] + ([v0] if v_init else []), weight)
    for backend in ("reference", "triton" if fastsnn.backend.INTERPRET else "reference"):
        w = node.w.detach().clone().requires_grad_()
        ours = fastsnn.plif_multistep(x, w, v_init=v0, backend=backend, **options)
        grads = _grads(ours, [x, w] + ([v0] if v_init else []), weight)
        assert torch.equal(ours, sj_spikes), f"{backend}: {(ours != sj_spikes).sum().item()} spikes differ"
        for a, b in zip(grads, sj_grads):
            assert_close(a, b, torch.float32, scale=max(1.0, b.abs().max().item()))
    if T > 1 or decay_input or v_init:  # else h = x at the one step: dh/dk = 0
        assert sj_grads[1].abs() > 0


def _layout(x, layout):
    """x [T, B, C, L] in a hostile layout, values unchanged: sliced (an offset view), transposed, or broadcast
    over time (x[0] at every step)."""
    if layout == "sliced":
        wide = torch.randn(x.shape[0], x.shape[1], x.shape[2] + 2, x.shape[3])
        wide[:, :, 1:-1] = x
        return wide[:, :, 1:-1]
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "time-broadcast":
        return x[:1].expand(x.shape)
    return x


DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 cases run on CUDA only (see conftest)


@pytest.mark.parametrize("dtype,T,decay_input,v_reset,surrogate,detach_reset,layout,state", product_cases(
    dtype=DTYPES, T=[1, 4, 9, 17], decay_input={"decay": True, "no-decay": False},
    v_reset={"hard": 0.0, "soft": None}, surrogate=list(SJ_SURROGATES), detach_reset={"detach": True, "": False},
    layout=["contiguous", "sliced", "transposed", "time-broadcast"], state=["plain", "v_init", "repeat"]))
def test_kernels_match_the_reference(device, dtype, T, decay_input, v_reset, surrogate, detach_reset, layout,
                                     state):
    options = _options(decay_input, v_reset, surrogate, detach_reset)
    x = _layout((torch.randn(T, 2, 5, 24) * 1.5 + 0.3).to(device), layout).to(dtype)
    if state == "repeat":
        x = x[0]
    v0 = (torch.randn(x.shape if state == "repeat" else x.shape[1:]) * 0.3) if state == "v_init" else None
    w0 = torch.tensor(-0.4)
    weight = torch.randn((T, *x.shape) if state == "repeat" else x.shape)
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.detach().clone().requires_grad_(), w0.clone().requires_grad_()]
        if v0 is not None:
            leaves.append(v0.clone().requires_grad_())
        out = fastsnn.plif_multistep(leaves[0].float() if backend == "reference" else leaves[0], leaves[1],
                                     v_init=leaves[2] if v0 is not None else None, return_v=v0 is not None,
                                     repeat=T if state == "repeat" else None, backend=backend, **options)
        spikes, v_final = out if v0 is not None else (out, None)
        loss = (spikes.float() * weight).sum() + (0.0 if v_final is None else (v_final * 0.7).sum())
        results.append((spikes.to(dtype), v_final, torch.autograd.grad(loss, leaves)))
    (spikes, v_final, grads), (r_spikes, r_v_final, r_grads) = results
    assert spikes.dtype == dtype and torch.equal(spikes, r_spikes), f"{(spikes != r_spikes).sum().item()} differ"
    if v_final is not None:
        assert_close(v_final, r_v_final, torch.float32)
    for got, want in zip(grads, r_grads):
        assert_close(got.float(), want.to(got.dtype).float(), dtype, scale=max(1.0, want.abs().max().item()))
    if T > 1 or decay_input or v0 is not None:  # else h = x at the one step: dh/dk = 0
        assert r_grads[1].abs() > 0  # dL/dw is not trivially zero


def test_rate_gradient_is_deterministic_and_needs_no_second_read(device):
    """dL/dw from the programs' partial sums and one sum: the same bits on every run; the backward reads x once
    (saved bytes: x and the one-element rate, as lif_multistep saves x)."""
    x = (torch.randn(6, 64, 257) * 1.5).requires_grad_()
    w = torch.tensor(0.2, requires_grad=True)
    weight = torch.randn(x.shape)
    grads = [torch.autograd.grad((fastsnn.plif_multistep(x, w, backend="triton") * weight).sum(), w)[0]
             for _ in range(3)]
    assert all(torch.equal(g, grads[0]) for g in grads)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastsnn.plif_multistep(x, w, backend="triton")
    kernel_saved = [t for t in saved if t.numel() > 1]
    assert sum(t.numel() * t.element_size() for t in kernel_saved) == x.numel() * x.element_size()


BN_CASES = product_cases(dtype=[torch.float32, torch.float16, torch.bfloat16], T=[1, 4, 9],
                         decay_input={"decay": True, "no-decay": False}, v_reset={"hard": 0.0, "soft": None},
                         residual={"": None, "residual": "add", "residual_bn": "bn"},
                         layout={"nchw": False, "channels_last": True}, training={"train": True, "eval": False})


@pytest.mark.parametrize("dtype,T,decay_input,v_reset,residual,channels_last,training", BN_CASES)
def test_bn_plif_matches_the_reference(device, dtype, T, decay_input, v_reset, residual, channels_last, training):
    B, C, H, W = 3, 4, 5, 6
    x = torch.randn(T, B, C, H, W) * 1.7 + 0.5
    if channels_last:
        x = x.flatten(0, 1).to(memory_format=torch.channels_last).view(x.shape)
    x = x.to(dtype)
    r = None if residual is None else (torch.randn(T, B, C, H, W) * 0.5).to(dtype)
    params = [torch.rand(C) + 0.5, torch.randn(C) * 0.3, torch.tensor(0.6)]
    r_params = [torch.rand(C) + 0.5, torch.randn(C) * 0.3] if residual == "bn" else []
    weight = torch.randn(x.shape)
    stats = [torch.randn(C) * 0.1, torch.rand(C) + 0.5, torch.randn(C) * 0.1, torch.rand(C) + 0.5]
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in [x] + params + r_params]
        running, r_running = [t.clone() for t in stats[:2]], [t.clone() for t in stats[2:]]
        xin = leaves[0] if backend == "triton" else leaves[0].float()
        rin = None if r is None else (r if backend == "triton" else r.float())
        r_bn = (*leaves[4:6], *r_running) if residual == "bn" else None
        spikes = fastsnn.bn_plif(xin, leaves[1], leaves[2], *running, leaves[3], training=training, residual=rin,
                                 residual_bn=r_bn, decay_input=decay_input, v_reset=v_reset, backend=backend)
        results.append((spikes.to(dtype), running, torch.autograd.grad((spikes.float() * weight).sum(), leaves)))
    (spikes, running, grads), (r_spikes, r_running, r_grads) = results
    assert torch.equal(spikes, r_spikes), f"{(spikes != r_spikes).sum().item()} spikes differ"
    for a, b in zip(running, r_running):
        assert_close(a, b, torch.float32)
    for got, want in zip(grads, r_grads):
        assert_close(got.float(), want.float(), dtype, scale=max(1.0, want.abs().max().item()))
    if T > 1 or decay_input:  # else h = y at the one step: dh/dk = 0
        assert r_grads[3].abs() > 0


def test_the_modules_carry_w_and_match_the_functions(device):
    plif = fastsnn.PLIF(init_tau=3.0, v_reset=None, surrogate="sigmoid")
    assert set(dict(plif.named_parameters())) == {"w"} and torch.allclose(1 / torch.sigmoid(plif.w), torch.tensor(3.0))
    x = torch.randn(4, 2, 30) * 2
    assert torch.equal(plif(x), fastsnn.plif_multistep(x, plif.w, v_reset=None, surrogate="sigmoid"))
    bn = fastsnn.BNPLIF(5, init_tau=4.0)
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "w"}
    xb = torch.randn(3, 2, 5, 4, 4)
    spikes = bn(xb)
    bn2 = torch.nn.BatchNorm2d(5)
    plif2 = fastsnn.PLIF(init_tau=4.0)
    assert torch.equal(spikes, plif2(xb, bn=bn2))  # the module pair: the same op
    assert torch.equal(bn.running_var, bn2.running_var) and int(bn.num_batches_tracked) == 1


def test_models_take_plif_fused_and_unfused_alike(device):
    torch.manual_seed(0)
    fused = models.create("spiking_resnet19", 10, T=2, neuron="plif", tau=3.0)
    plain = models.create("spiking_resnet19", 10, T=2, neuron="plif", tau=3.0, fuse_bn=False, pack_spikes=False)
    plain.load_state_dict(fused.state_dict())
    images = torch.randn(2, 3, 8, 8)
    outs = [m(images) for m in (fused, plain)]
    assert torch.equal(outs[0], outs[1])
    for out in outs:
        out.square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert_close(a.grad, b.grad, torch.float32, scale=max(1.0, b.grad.abs().max().item()))
    assert sum(name.endswith(".w") or name == "sn1.w" for name, _ in fused.named_parameters()) > 10


@pytest.mark.parametrize("w,exc,words", [
    (None, TypeError, "w must be a torch.Tensor of one element"),
    (torch.zeros(2), ValueError, "w must hold one element"),
    (torch.zeros((), dtype=torch.int64), TypeError, "w must have a floating dtype"),
    (torch.zeros((), device="meta"), ValueError, "w must be on x's device"),
])
def test_bad_w_names_the_argument(w, exc, words):
    with pytest.raises(exc, match=f"^plif_multistep: {words}"):
        fastsnn.plif_multistep(torch.zeros(2, 3), w)
    with pytest.raises(ValueError, match="lif_multistep: w is the learnable weight of a parametric neuron"):
        fastsnn.ops.lif.apply_neuron("lif_multistep", torch.zeros(2, 3), NeuronSpec(), w=torch.zeros(()))


def test_rate_is_sigmoid_of_w_in_fp32():
    w = torch.tensor(0.25, dtype=torch.float16, requires_grad=True)
    rate = rate_of(w)
    assert rate.dtype == torch.float32 and rate.shape == () and torch.equal(rate, w.float().sigmoid())


def test_reference_charge_is_spikingjellys_formula():
    """The reference itself, against the formula written out: h = v + (x − (v − v_reset))·k."""
    spec = NeuronSpec.create("test", kind="plif", v_reset=0.0)
    x = torch.tensor([[0.9], [0.9]])
    k = torch.tensor(0.5)
    out, v = reference.lif_multistep(x, spec, rate=k, return_v=True)
    # h1 = 0 + 0.9·0.5 = 0.45 (no spike); h2 = 0.45 + (0.9 − 0.45)·0.5 = 0.675
    assert out.tolist() == [[0.0], [0.0]] and torch.allclose(v, torch.tensor([0.675]))


def test_plif_ops_pass_opcheck(device):
    args = ("plif", 2.0, 1.0, 0.0, "atan", 2.0, False)
    rate = torch.tensor(0.4, device=device, requires_grad=True)
    for x, repeat in ((torch.randn(3, 2, 5, device=device, requires_grad=True), 0),
                      (torch.randn(2, 5, device=device, requires_grad=True), 4)):
        torch.library.opcheck(torch.ops.fastsnn.lif.default, (x, None, rate, *args, True, repeat))
    x = torch.randn(3, 2, 4, 5, device=device, requires_grad=True)
    w, b = torch.rand(4, device=device, requires_grad=True), torch.randn(4, device=device, requires_grad=True)
    stats = torch.ops.fastsnn.bn_statistics(x.detach(), w.detach(), b.detach(), None, None, True, 0.1, 1e-5, 0)
    torch.library.opcheck(torch.ops.fastsnn.bn_neuron.default,
                          (x, w, b, None, None, None, rate, stats, None, *(None,) * 6, *args, True, 0, None, None,
                           False, None))


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    x = torch.randn(4, 2, 3, 5, device=device) * 2
    bn = (torch.rand(3, device=device) + 0.5, torch.randn(3, device=device))
    weight = torch.randn(x.shape, device=device)

    def plif(t, w):
        return fastsnn.plif_multistep(t, w, v_reset=None)

    def bn_plif(t, w):
        return fastsnn.bn_plif(t, *bn, None, None, w, training=True)
    for fn in (plif, bn_plif):
        results = []
        for run in (fn, torch.compile(fn, fullgraph=True)):
            xl, wl = x.clone().requires_grad_(), torch.tensor(0.3, device=device, requires_grad=True)
            out = run(xl, wl)
            results.append((out, torch.autograd.grad((out * weight).sum(), (xl, wl))))
        (eager, grads), (compiled, c_grads) = results
        assert torch.equal(eager, compiled)
        for a, b in zip(c_grads, grads):
            assert_close(a, b, torch.float32, scale=max(1.0, b.abs().max().item()))
