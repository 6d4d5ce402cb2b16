"""Recompute instead of store (models.create(..., recompute=True), fastsnn.ops.recompute): a student's fused
conv → BN → [+ shortcut] → neuron units save no convolution output and rebuild it in the backward from the bits
the convolution keeps. Checked: bit-identical logits, losses, gradients and running statistics against
recompute=False over several optimiser steps (every student, SEW connects, channels_last, time-major input),
fewer saved bytes, nothing extra in eval mode or under no_grad, torch.compile in one graph saving what eager
saves, the op-level source on its own, and the refusals."""
import copy

import pytest
import torch

import fastsnn
from fastsnn import models
from fastsnn.ops import recompute
from fastsnn.spec import NeuronSpec
from helpers import product_cases, saved_activation_bytes

STUDENTS = models.available()["students"]


def _saved_bytes(model, fn, copies_of_parameters=False):
    return saved_activation_bytes(model, fn, copies_of_parameters)


def _input(name, batch, T, time_major, channels_last):
    spec = models.model_spec(name)
    # the smallest inputs the networks take: VGG's five 2x2 pools and the imagenet stem need 32 px
    size = 32 if spec.default_stem == "imagenet" or "vgg" in name else 8
    shape = (T, batch, spec.in_channels, size, size) if time_major else (batch, spec.in_channels, size, size)
    x = torch.rand(shape) * 2
    if channels_last:
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape) if time_major else \
            x.contiguous(memory_format=torch.channels_last)
    return x


def _pair(name, T, channels_last=False, **kw):
    plain = models.create(name, 10, T=T, backend="triton", **kw)
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    other = copy.deepcopy(plain)
    return plain, other.set_recompute(True)


def _steps_agree(plain, other, x, target, steps, rebuilds):
    """`steps` SGD steps on both models: logits, loss, every gradient and buffer bit-identical at each step."""
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, other)]
    for step in range(steps):
        results = []
        for model, optimiser in zip((plain, other), optimisers):
            optimiser.zero_grad()
            calls = rebuilds()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.mean(0), target)
            loss.backward()
            results.append((logits, loss, rebuilds() - calls))
        (logits_a, loss_a, rebuilt_a), (logits_b, loss_b, rebuilt_b) = results
        assert rebuilt_a == 0 and rebuilt_b > 0  # the recompute ran (and only where asked for)
        assert torch.equal(logits_a, logits_b), f"step {step}: logits differ"
        assert torch.equal(loss_a, loss_b), f"step {step}: loss differs"
        for (key, a), b in zip(plain.named_parameters(), other.parameters()):
            assert torch.equal(a.grad, b.grad), f"step {step}: gradient of {key} differs"
        for (key, a), b in zip(plain.named_buffers(), other.buffers()):
            assert torch.equal(a, b), f"step {step}: buffer {key} differs"
        for optimiser in optimisers:
            optimiser.step()


@pytest.fixture
def rebuilds(monkeypatch):
    """A counter of recomputed convolution outputs."""
    count = [0]
    original = recompute.rebuild

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(recompute, "rebuild", counted)
    return lambda: count[0]


def _student_params():
    """digits_snn in every tier; one student per block kind (spiking BasicBlock, SEW BasicBlock, VGG stack, the
    small nets) in the default run; their deeper or wider twins (the same classes with more blocks or channels:
    resnet19/34, sew_resnet34, vgg16) under --full, which the compiled re-run on CUDA uses. Interpreted, each
    takes minutes: four of them took 17 min of a CI run on 2 cores (2026-12-07)."""
    quick = {"digits_snn"}
    default = {"mnist_snn", "spiking_resnet18", "sew_resnet18", "spiking_vgg11"}
    return [pytest.param(n, marks=() if n in quick else pytest.mark.slow if n in default else pytest.mark.full)
            for n in STUDENTS]


@pytest.mark.parametrize("name", _student_params())
def test_every_student_is_bit_identical_with_recompute(name, rebuilds):
    plain, other = _pair(name, T=2)
    x = _input(name, 2, 2, time_major=False, channels_last=False)
    _steps_agree(plain, other, x, torch.randint(0, 10, (2,)), steps=2, rebuilds=rebuilds)


@pytest.mark.parametrize("connect,channels_last", product_cases(connect=["ADD", "AND", "IAND"],
                                                                  channels_last={"nchw": False, "channels_last": True}))
def test_sew_connects_and_layouts_are_bit_identical(connect, channels_last, rebuilds):
    """A small SEW ResNet (imagenet stem and max-pool, a downsample shortcut with its own neuron) per connect
    (the registry's sew_resnet18 runs ADD above), in both memory formats, three steps."""
    plain = _tiny("sew", connect=connect)
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
    other = copy.deepcopy(plain).set_recompute(True)
    x = torch.rand(2, 3, 16, 16) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _steps_agree(plain, other, x, torch.randint(0, 5, (2,)), steps=3, rebuilds=rebuilds)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spiking_resnet18", "mnist_snn"])
def test_time_major_input_and_channels_last_are_bit_identical(name, rebuilds):
    """A time-major input [T, B, C, H, W] (the stem runs on T·B images, no repeat), in channels_last."""
    plain, other = _pair(name, T=3, channels_last=True, **({"imagenet": True} if name == "spiking_resnet18" else {}))
    x = _input(name, 2, 3, time_major=True, channels_last=True)
    if name == "spiking_resnet18":
        x = torch.rand(3, 2, 3, 32, 32).flatten(0, 1).contiguous(memory_format=torch.channels_last).view(3, 2, 3, 32,
                                                                                                           32)
    _steps_agree(plain, other, x, torch.randint(0, 10, (2,)), steps=2, rebuilds=rebuilds)


@pytest.mark.parametrize("name", ["digits_snn", pytest.param("sew_resnet18", marks=pytest.mark.slow),
                                  pytest.param("spiking_resnet18", marks=pytest.mark.slow)])
def test_recompute_saves_no_convolution_output(name):
    """No convolution output (the stem's, the blocks', the downsample shortcuts') is among the saved tensors,
    and the saved bytes drop by at least their size."""
    plain, other = _pair(name, T=4)
    x = _input(name, 2, 4, time_major=False, channels_last=False)
    _, plain_bytes = _saved_bytes(plain, lambda: plain(x).sum())
    outputs, alive = {}, []  # held alive, so that no two outputs share an address

    def held(module, inputs, out):
        alive.append(out)
        outputs[out.untyped_storage().data_ptr()] = module
    hooks = [m.register_forward_hook(held) for m in other.modules() if isinstance(m, torch.nn.Conv2d)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        other(x).sum()
    for h in hooks:
        h.remove()
    assert len(outputs) == sum(isinstance(m, torch.nn.Conv2d) for m in other.modules())
    kept = [type(outputs[t.untyped_storage().data_ptr()]).__name__ for t in saved
            if t.untyped_storage().data_ptr() in outputs]
    assert not kept, f"convolution outputs saved with recompute: {kept}"
    _, other_bytes = _saved_bytes(other, lambda: other(x).sum())
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.update({id(m): out.untyped_storage().nbytes()}))
             for m in other.modules() if isinstance(m, torch.nn.Conv2d)]
    other(x)
    for h in hooks:
        h.remove()
    # every convolution output's bytes are gone (and a downsample shortcut shares its block's bits)
    assert plain_bytes - other_bytes >= sum(sizes.values())


def test_eval_mode_and_no_grad_cost_nothing_extra(rebuilds):
    plain = _tiny("sew")
    other = copy.deepcopy(plain).set_recompute(True)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), other(x))
    plain.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), other(x))
    assert rebuilds() == 0
    for model in (plain, other):
        model.requires_grad_(False)
    _, a = _saved_bytes(plain, lambda: plain(x))
    _, b = _saved_bytes(other, lambda: other(x))
    assert a == b == 0


def test_refused_in_one_line_without_the_fused_units_or_packed_spikes():
    for kw in ({"fuse_bn": False}, {"pack_spikes": False}, {"fuse_bn": False, "pack_spikes": False}):
        with pytest.raises(ValueError, match=r"^models.create: recompute=True needs fuse_bn=True and pack_spikes=True"):
            models.create("digits_snn", 10, T=2, recompute=True, **kw)
    with pytest.raises(ValueError, match="recompute=True is for students"):
        models.create("resnet18", 10, recompute=True)
    with pytest.raises(TypeError, match="recompute must be True or False"):
        models.create("digits_snn", 10, T=2, recompute=1)
    with pytest.raises(ValueError, match="fuse_bn=False"):
        models.create("digits_snn", 10, T=2, fuse_bn=False).set_recompute(True)
    assert models.create("digits_snn", 10, T=2, recompute=True).recompute is True


# ---- the op on its own: fastsnn.bn_lif with a SpikeConv2d's source ----

def _conv_bn_case(T=3, B=2, C_in=4, C=6, storage="bits"):
    conv = fastsnn.SpikeConv2d(C_in, C, 3, 1, 1, bias=True, storage=storage)
    spikes = (torch.rand(T * B, C_in, 5, 5) < 0.4).float()
    if storage == "uint8":
        spikes = spikes * torch.randint(0, 4, spikes.shape)
    return conv, spikes.requires_grad_(), torch.rand(C) + 0.5, torch.randn(C) * 0.3


@pytest.mark.parametrize("storage", ["bits", "uint8"])
@pytest.mark.parametrize("residual", [None, "bn", "packed"], ids=["plain", "residual_bn", "packed_residual"])
def test_bn_lif_with_a_source_equals_bn_lif_without(storage, residual):
    """packed_residual: x rebuilt from its source while the (identity) residual is kept packed as bits, as in a
    BasicBlock: the backward both rebuilds and unpacks."""
    T, B = 3, 2
    conv, spikes, weight, bias = _conv_bn_case(T, B, storage=storage)
    identity = (torch.rand(T, B, 6, 5, 5) < 0.3).float()
    shortcut = fastsnn.SpikeConv2d(4, 6, 1, 1, 0, bias=False, storage=storage)
    r_given = (torch.rand(6) + 0.5, torch.randn(6), torch.zeros(6), torch.ones(6))
    results = []
    for use_source in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (spikes, weight, bias, identity)]
        running = (torch.zeros(6), torch.ones(6))
        r_params = tuple(t.clone() for t in r_given)
        for p in (*conv.parameters(), *shortcut.parameters()):
            p.grad = None

        def run():
            box = []
            y = conv(leaves[0], source_into=box)
            src = box[0]
            kw = {}
            if residual == "bn":
                r = shortcut(leaves[0], source_into=box, same_input=src)
                r_src = box[1]
                kw = dict(residual=r.unflatten(0, (T, B)), residual_bn=r_params,
                          residual_source=r_src if use_source else None)
            elif residual == "packed":
                kw = dict(residual=leaves[3], residual_storage="bits")
            return fastsnn.bn_lif(y.unflatten(0, (T, B)), leaves[1], leaves[2], *running, training=True,
                                  source=src if use_source else None, **kw)
        out, nbytes = _saved_bytes(conv, run)
        out.square().sum().backward()
        grads = [t.grad for t in leaves] + [p.grad for p in (*conv.parameters(), *shortcut.parameters())]
        results.append((out, grads, running + r_params[2:], nbytes))
    (out_a, grads_a, run_a, bytes_a), (out_b, grads_b, run_b, bytes_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(run_a, run_b):
        assert torch.equal(a, b)
    per_output = T * B * 6 * 5 * 5 * 4  # the fp32 convolution output(s) no longer saved
    assert bytes_a - bytes_b >= per_output * (2 if residual == "bn" else 1)


def test_a_source_of_another_tensor_is_not_used_and_the_result_stays_right():
    """A source whose output is not the x given (here x is a copy) is ignored: x is saved as usual."""
    conv, spikes, weight, bias = _conv_bn_case()
    box = []
    y = conv(spikes, source_into=box)
    src = box[0]
    x = y.unflatten(0, (3, 2)).clone()
    out = fastsnn.bn_lif(x, weight, bias, None, None, training=True, source=src)
    expected = fastsnn.bn_lif(x, weight, bias, None, None, training=True)
    assert torch.equal(out, expected)
    assert not recompute.matches(src, x) and recompute.matches(src, y.unflatten(0, (3, 2)))


def test_a_bad_source_is_refused_naming_the_argument():
    x = torch.randn(2, 2, 3, 4, 4)
    with pytest.raises(TypeError, match=r"bn_lif: source must be None or a fastsnn.ops.recompute.ConvSource"):
        fastsnn.bn_lif(x, None, None, None, None, training=True, source="conv")
    with pytest.raises(TypeError, match=r"bn_lif: residual_source must be None or a"):
        fastsnn.bn_lif(x, None, None, None, None, training=True, residual=x.clone(), residual_source=(1, 2))
    with pytest.raises(ValueError, match=r"LIF: residual, residual_bn, source and residual_source are only taken"):
        fastsnn.LIF()(x, source=object())


def test_the_compile_encoding_round_trips():
    conv, spikes, *_ = _conv_bn_case(storage="uint8")
    box = []
    conv(spikes.contiguous(memory_format=torch.channels_last), source_into=box)
    src = box[0]
    meta = recompute.decode(recompute.encode(src))
    assert meta[:4] == src.meta()[:4] and meta[4] == src.out[:2]
    pair = recompute.decoded_pair(recompute.encoded_pair((src, None))[1], src.tensors(), (None,) * 3)
    assert pair[1] is None and pair[0].meta()[:4] == src.meta()[:4]


# ---- torch.compile ----

def _tiny(name, connect="ADD"):
    from functools import partial

    from fastsnn.models.zoo import VGG, ResNet

    neuron = partial(fastsnn.MultistepNeuron.from_spec, NeuronSpec.create("test", detach_reset=True),
                     backend="triton")
    if name == "resnet":
        return ResNet([1, 1], [4, 8], 5, T=2, neuron=neuron, stem_width=4)
    if name == "sew":
        return ResNet([1, 1], [4, 8], 5, T=2, neuron=neuron, block="sew", stem="imagenet", connect=connect)
    return VGG([4, "M", 8], 5, T=2, neuron=neuron)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "sew", "vgg"])
def test_compiled_student_with_recompute_is_one_graph_and_saves_what_eager_saves(name):
    torch._dynamo.reset()
    eager = _tiny(name).set_recompute(True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # a graph break raises
    plain = copy.deepcopy(eager).set_recompute(False)
    x = torch.rand(2, 3, 12, 12)
    compiled(x), eager(x), plain(x)  # traced outside the count; the running statistics move alike
    out_e, saved_e = _saved_bytes(eager, lambda: eager(x), copies_of_parameters=True)
    out_c, saved_c = _saved_bytes(compiled_model, lambda: compiled(x), copies_of_parameters=True)
    out_p, saved_p = _saved_bytes(plain, lambda: plain(x), copies_of_parameters=True)
    assert torch.equal(out_c, out_e) and torch.equal(out_e, out_p)
    g = torch.randn(out_e.shape)
    grads_e = torch.autograd.grad(out_e, list(eager.parameters()), g)
    grads_c = torch.autograd.grad(out_c, list(compiled_model.parameters()), g)
    grads_p = torch.autograd.grad(out_p, list(plain.parameters()), g)
    for a, b, c in zip(grads_c, grads_e, grads_p):
        torch.testing.assert_close(a, b)
        assert torch.equal(b, c)
    assert saved_c <= saved_e < saved_p


def test_the_custom_ops_pass_opcheck():
    """The compile path's ops: the fused op given sources (its backward rebuilds x), the convolution over shared
    bits."""
    conv, spikes, weight, bias = _conv_bn_case(T=2, B=2)
    box = []
    y = conv(spikes, source_into=box)
    src = box[0]
    x = y.detach().unflatten(0, (2, 2)).requires_grad_()
    stats = torch.ops.fastsnn.bn_statistics(x.detach(), weight, bias, None, None, True, 0.1, 1e-5, 0)
    args = ("lif", 2.0, 1.0, 0.0, "atan", 2.0, False, True, 0, None, None, False)
    kept = [t.detach() if t is not None else None for t in src.tensors()]
    ints = recompute.encode(src)
    # the source's output address is not part of the compiled encoding: the op trusts what it is given
    torch.library.opcheck(torch.ops.fastsnn.bn_neuron.default,
                          (x, weight.requires_grad_(), bias, None, None, None, None, stats, None, *kept,
                           None, None, None, *args, [len(ints), *ints]))
    packed = src.kept
    torch.library.opcheck(torch.ops.fastsnn.spike_conv2d.default,
                          (spikes.detach().requires_grad_(), conv.weight.detach().requires_grad_(),
                           conv.bias.detach().requires_grad_(), packed, [1, 1], [1, 1], [1, 1], 1, "bits", False,
                           False))
