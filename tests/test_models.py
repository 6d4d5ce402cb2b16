"""Model zoo: shapes, parameter parity, SpikingJelly/torchvision checkpoint parity, firing rates, gradients."""
import pytest
import torch
from torch import nn

import fastsnn
from fastsnn import models
from helpers import assert_close

STUDENTS = models.available()["students"]
TEACHERS = models.available()["teachers"]


def _images(name, B=2, size=32):
    if name.startswith("digits"):
        return torch.randn(B, 1, 8, 8)
    if name.startswith("mnist"):
        return torch.randn(B, 1, 28, 28)
    return torch.randn(B, 3, size, size)


# Tests of a model's structure (shapes, gradient flow, hooks) run its neurons on the PyTorch reference: the
# kernels are checked against it in test_lif.py, and whole models with the kernels in test_interop.py,
# test_cuda.py and the training tests; interpreting them over every large model here would cost minutes.
STRUCTURE = "reference"


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("name", STUDENTS)
def test_student_output_shape(name, T):
    model = models.create(name, 10, T=T, backend=STRUCTURE)
    x = _images(name, size=32 if "vgg" in name else 16)
    assert model(x).shape == (T, 2, 10)
    # time-major input gives the same shape
    assert model(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).shape == (T, 2, 10)


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_output_shape(name):
    assert models.create(name, 7)(_images(name)).shape == (2, 7)


@pytest.mark.parametrize("student", STUDENTS)
def test_student_has_its_teachers_parameter_count(student):
    teacher = models.REGISTRY[student].teacher
    kw = {"imagenet": True} if student.startswith("sew") else {}
    s = models.create(student, 100, T=2)
    t = models.create(teacher, 100, **kw)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if student == "mnist_snn":  # the one pair whose teacher is wider on purpose (32 channels against 16)
        assert count(t) > 2 * count(s) > 0
    else:
        assert count(s) == count(t) > 0


def test_resnet19_layout():
    m = models.create("spiking_resnet19", 10, T=1)
    assert m.conv1.out_channels == 128 and m.conv1.kernel_size == (3, 3)
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 2]
    assert [getattr(m, f"layer{i}")[0].conv1.stride[0] for i in (1, 2, 3)] == [1, 2, 2]
    assert m.fc.in_features == 512 and not hasattr(m, "layer4")


def test_every_parameter_gets_a_gradient():
    for name in ("spiking_resnet19", "spiking_vgg11", "sew_resnet18", "digits_snn"):
        model = models.create(name, 10, T=2, backend="auto" if name == "digits_snn" else STRUCTURE)
        # 64×64 for the ImageNet stem, so that layer4 is not 1×1 (where a silent layer gives exact zeros)
        out = model(_images(name, size=64 if name.startswith("sew") else 32))
        (out * torch.randn_like(out)).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (name, missing[:5])


def test_firing_rates_match_a_direct_computation():
    model = models.create("spiking_resnet18", 10, T=2, backend=STRUCTURE)
    outputs = {}
    for name, m in models.spiking_neurons(model).items():
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.setdefault(name, []).append(out.detach()))
    with models.record_firing_rates(model) as rates:
        model(_images("x"))
        model(_images("x"))
    per_layer = rates.per_layer()
    assert set(per_layer) == set(outputs)
    for name, outs in outputs.items():
        direct = torch.cat([o.flatten() for o in outs]).float().mean()
        assert 0.0 <= per_layer[name] <= 1.0
        assert per_layer[name] == pytest.approx(float(direct), rel=1e-6)
    all_spikes = torch.cat([o.flatten() for outs in outputs.values() for o in outs]).float()
    assert rates.mean() == pytest.approx(float(all_spikes.mean()), rel=1e-5)


def test_layer_macs_of_a_linear_model():
    model = models.create("digits_snn", 10, T=2)
    images = torch.randn(4, 1, 8, 8) - 0.5  # a negative mean: not a rate
    rows = models.layer_macs(model, images)
    assert rows[0]["layer"] == "conv1" and rows[0]["encoding"]
    assert rows[0]["input_rate"] is None and rows[0]["input_mean"] == pytest.approx(float(images.mean()), abs=1e-6)
    assert rows[0]["macs"] == 16 * 8 * 8 * 1 * 9  # the stem runs once per sample
    conv2 = next(r for r in rows if r["layer"] == "conv2")
    assert conv2["macs"] == 2 * 32 * 4 * 4 * 16 * 9 and 0 <= conv2["input_rate"] <= 1
    assert rows[-1]["layer"] == "fc" and rows[-1]["macs"] == 2 * 10 * 128


@pytest.mark.parametrize("connect", ["ADD", "IAND", "AND"])
def test_sew_connect_functions(connect):
    model = models.create("sew_resnet18", 10, T=2, connect=connect)
    assert model.layer1[0].connect == connect
    assert model(_images("x")).shape == (2, 2, 10)


@pytest.mark.parametrize("depth", [18, 34])
def test_sew_resnet_matches_spikingjelly(depth):
    sj_model_mod = pytest.importorskip("spikingjelly.activation_based.model.sew_resnet")
    from spikingjelly.activation_based import functional, neuron, surrogate

    T = 2
    sj = getattr(sj_model_mod, f"sew_resnet{depth}")(spiking_neuron=neuron.LIFNode, cnf="ADD", num_classes=10,
                                                     surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(sj, "m")
    ours = models.create(f"sew_resnet{depth}", 10, T=T, surrogate="atan", detach_reset=True)
    assert set(ours.state_dict()) == set(sj.state_dict())
    ours.load_state_dict(sj.state_dict())
    sj.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        getattr(sj, mode)(), getattr(ours, mode)()
        functional.reset_net(sj)
        expected = sj(x.unsqueeze(0).repeat(T, 1, 1, 1, 1))
        got = ours(x)
        assert_close(got, expected, torch.float32, scale=10)


def test_imagenet_teacher_loads_a_torchvision_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(tv.state_dict(), path)
    teacher = models.create("resnet18", 10, imagenet=True).eval()
    teacher.load_state_dict(torch.load(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(teacher(x), tv(x))


def test_channels_last_and_bf16_autocast_end_to_end():
    model = models.create("spiking_resnet18", 10, T=2, backend="reference").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 2, 10) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


def test_channels_last_gives_the_same_logits():
    model = models.create("sew_resnet18", 10, T=2).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert_close(model(x.to(memory_format=torch.channels_last)), expected, torch.float32, scale=10)


def test_neurons_carry_the_model_arguments():
    model = models.create("spiking_vgg11", 10, T=2, tau=3.0, v_threshold=0.5, surrogate="sigmoid", alpha=3.0,
                          detach_reset=False)
    lifs = list(models.spiking_neurons(model).values())
    assert lifs and all(isinstance(m, fastsnn.LIF) for m in lifs)
    assert all((m.tau, m.v_threshold, m.surrogate, m.alpha, m.detach_reset) == (3.0, 0.5, "sigmoid", 3.0, False)
               for m in lifs)
    ifs = models.spiking_neurons(models.create("spiking_vgg11", 10, T=2, neuron="if")).values()
    assert all(isinstance(m, fastsnn.IF) for m in ifs)
    assert not any(isinstance(m, fastsnn.LIF) for m in models.create("vgg11", 10).modules())
    assert any(isinstance(m, nn.ReLU) for m in models.create("vgg11", 10).modules())


@pytest.mark.parametrize("args,kwargs,words", [
    (("resnet50", 10), dict(T=2), "unknown model 'resnet50'; valid names: digits_snn"),
    (("spiking_resnet18", 1), dict(T=2), "num_classes must be an integer >= 2, got 1"),
    (("spiking_resnet18", 10), dict(T=0), "T must be an integer >= 1"),
    (("spiking_resnet18", 10), {}, "T must be an integer >= 1"),
    (("spiking_resnet18", 10), dict(T=2, neuron="relu"), "neuron must be one of ('if', 'lif', 'lif_no_decay', 'plif',"),
    (("sew_resnet18", 10), dict(T=2, connect="OR"), "connect must be one of ('ADD', 'AND', 'IAND')"),
    (("spiking_resnet18", 10), dict(T=2, tau=0.5), "tau must be"),
])
def test_bad_arguments(args, kwargs, words):
    with pytest.raises(ValueError) as info:
        models.create(*args, **kwargs)
    assert words in str(info.value)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"input must be images \[B, C, H, W\] or time-major"):
        models.create("digits_snn", 10, T=2)(torch.randn(3, 64))
