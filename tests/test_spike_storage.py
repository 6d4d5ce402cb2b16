"""Spikes saved for backward as bits (SpikeConv2d, SpikeMaxPool2d, the pack/unpack kernels): round trips,
gradients equal to nn.Conv2d / nn.MaxPool2d bit for bit, the checked mode, saved bytes per layer type."""
import pytest
import torch

from fastsnn import models
from fastsnn import SpikeConv2d, SpikeMaxPool2d
from fastsnn.ops.spike_storage import layout, pack, unpack
from helpers import product_cases


def _spikes(shape, device, channels_last=False, rate=0.3):
    x = (torch.rand(shape, device=device) < rate).float()
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("numel_shape", [(1,), (7,), (8,), (9,), (3, 5, 7, 11), (2, 16, 4, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pack_unpack_round_trip(device, numel_shape, dtype):
    x = _spikes(numel_shape, device).to(dtype)
    bits = pack("test", x, "bits", check=True)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-x.numel() // 8)
    assert torch.equal(unpack("test", bits, "bits", layout(x)), x)
    flat = x.flatten()  # bit j of byte i is element 8i + j in memory order
    assert int(bits[0]) == sum(int(flat[j]) << j for j in range(min(8, flat.numel())))


def test_round_trip_keeps_channels_last_and_uint8_sums(device):
    x = _spikes((2, 6, 5, 3), device, channels_last=True)
    back = unpack("test", pack("test", x, "bits", check=True), "bits", layout(x))
    assert torch.equal(back, x) and back.stride() == x.stride()
    sums = x * torch.randint(0, 5, x.shape, device=device)
    assert torch.equal(unpack("test", pack("test", sums, "uint8", check=True), "uint8", layout(sums)), sums)


@pytest.mark.parametrize("storage,stride,groups,bias,channels_last,dtype", product_cases(
    storage=["bits", "uint8"], stride=[1, 2], groups=[1, 2], bias={"bias": True, "": False},
    layout={"nchw": False, "channels_last": True}, dtype=[torch.float32, torch.float16]))
def test_spike_conv_equals_conv2d(device, storage, stride, groups, bias, channels_last, dtype):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("fp16 convolutions are CUDA-only")
    conv = SpikeConv2d(6, 4, 3, stride, 1, groups=groups, bias=bias, storage=storage, check=True).to(device, dtype)
    plain = torch.nn.Conv2d(6, 4, 3, stride, 1, groups=groups, bias=bias).to(device, dtype)
    plain.load_state_dict(conv.state_dict())
    x = _spikes((3, 6, 9, 7), device, channels_last).to(dtype)
    if storage == "uint8":
        x = x * torch.randint(0, 4, x.shape, device=device).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = conv(xa), plain(xb)
    g = torch.randn_like(out_a)
    params_a = [xa] + list(conv.parameters())
    params_b = [xb] + list(plain.parameters())
    assert torch.equal(out_a, out_b)
    for a, b in zip(torch.autograd.grad((out_a * g).sum(), params_a), torch.autograd.grad((out_b * g).sum(), params_b)):
        assert torch.equal(a, b)  # the same aten backward on the same (unpacked) values: bit for bit


@pytest.mark.parametrize("layer", ["conv", "pool"])
@pytest.mark.parametrize("shape", [(6, 9, 7), (0, 6, 9, 7)], ids=["unbatched", "batch0"])
def test_unbatched_and_empty_inputs_as_the_dense_layers_take_them(device, layer, shape):
    """nn.Conv2d and nn.MaxPool2d take [C, H, W] and an empty batch; so do the spike layers, with the same
    results and gradients."""
    if layer == "conv":
        spike, plain = SpikeConv2d(6, 4, 3, padding=1, check=True), torch.nn.Conv2d(6, 4, 3, padding=1)
        plain.load_state_dict(spike.state_dict())
    else:
        spike, plain = SpikeMaxPool2d(2, check=True), torch.nn.MaxPool2d(2)
    spike, plain = spike.to(device), plain.to(device)
    x = _spikes(shape, device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = spike(xa), plain(xb)
    assert out_a.shape == out_b.shape and torch.equal(out_a, out_b)
    g = torch.randn_like(out_a)
    grads_a = torch.autograd.grad((out_a * g).sum(), [xa, *spike.parameters()])
    grads_b = torch.autograd.grad((out_b * g).sum(), [xb, *plain.parameters()])
    for a, b in zip(grads_a, grads_b):
        assert a.shape == b.shape and torch.equal(a, b)

@pytest.mark.parametrize("layer", ["bits", "uint8", "pool"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_under_torch_compile_the_layers_trace_whole_and_equal_the_dense_ones(device, layer, channels_last):
    torch._dynamo.reset()
    if layer == "pool":
        spike, plain = SpikeMaxPool2d(3, 2, 1, check=True), torch.nn.MaxPool2d(3, 2, 1)
    else:
        spike = SpikeConv2d(6, 4, 3, 2, 1, storage=layer, check=True)
        plain = torch.nn.Conv2d(6, 4, 3, 2, 1)
        plain.load_state_dict(spike.state_dict())
    spike, plain = spike.to(device), plain.to(device)
    x = _spikes((3, 6, 9, 7), device, channels_last)
    if layer == "uint8":
        x = x * torch.randint(0, 4, x.shape, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = torch.compile(spike, fullgraph=True)(xa), plain(xb)
    assert torch.equal(out_a, out_b)
    g = torch.randn_like(out_a)
    grads_a = torch.autograd.grad((out_a * g).sum(), [xa, *spike.parameters()])
    grads_b = torch.autograd.grad((out_b * g).sum(), [xb, *plain.parameters()])
    assert grads_a[0].stride() == xb.stride()
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck(device):
    x = _spikes((2, 6, 5, 4), device).requires_grad_()
    weight = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    conv2d = torch.ops.fastsnn.spike_conv2d.default
    torch.library.opcheck(conv2d, (x, weight, None, None, *conv, "bits", True, True))
    torch.library.opcheck(conv2d, (x, weight, weight[:, 0, 0, 0].detach(), None, *conv, "uint8", False, True))
    frozen = weight.detach()
    torch.library.opcheck(conv2d, (x, frozen, None, None, *conv, "bits", False, False))  # no weight gradient
    packed = pack("test", x.detach(), "bits", check=True)
    torch.library.opcheck(conv2d, (x, weight, None, packed, *conv, "bits", False, False))  # bits kept elsewhere
    pool = torch.ops.fastsnn.spike_max_pool2d.default
    torch.library.opcheck(pool, (x, [2, 2], [2, 2], [0, 0], [1, 1], True, True, True))
    torch.library.opcheck(pool, (x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False, True, False))  # no gradient
    with pytest.raises(RuntimeError, match="did not keep"):  # a misuse is an error, never a read past the buffer
        torch.ops.fastsnn.spike_max_pool2d_backward(torch.ones(2, 6, 2, 2), torch.empty(0, dtype=torch.uint8),
                                                    *layout(x), [2, 2], [2, 2], [0, 0], [1, 1], False)

@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 0, True),
                                                             (2, 1, 0, False)])
@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0], ids=["silent", "rate0.3", "all-ties"])
def test_spike_max_pool_equals_max_pool2d_including_ties(device, kernel, stride, padding, ceil_mode, rate):
    pool = SpikeMaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode, check=True)
    plain = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    x = _spikes((2, 3, 9, 10), device, rate=rate)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = pool(xa), plain(xb)
    g = torch.randn_like(out_a)
    assert torch.equal(out_a, out_b)
    assert torch.equal(torch.autograd.grad((out_a * g).sum(), xa)[0], torch.autograd.grad((out_b * g).sum(), xb)[0])


@pytest.mark.parametrize("layer", ["bits", "uint8", "pool"])
def test_checked_mode_refuses_values_that_do_not_fit(device, layer):
    x = torch.full((1, 2, 4, 4), 0.5 if layer != "uint8" else 256.0, device=device, requires_grad=True)
    module = SpikeMaxPool2d(2, check=True) if layer == "pool" else SpikeConv2d(2, 3, 3, storage=layer, check=True)
    module = module.to(device)
    with pytest.raises(ValueError) as info:
        module(x)
    message = str(info.value)
    assert "32 other values" in message and "\n" not in message
    if layer == "uint8":
        assert message.startswith("SpikeConv2d: storage='uint8' holds integers 0..255") and "nn.Conv2d" in message
    elif layer == "bits":
        assert message.startswith("SpikeConv2d: spikes are stored as bits") and "storage='uint8'" in message
    else:  # SpikeMaxPool2d has no storage argument: its way out is the dense layer
        assert message.startswith("SpikeMaxPool2d: spikes are stored as bits") and "nn.MaxPool2d" in message
        assert "storage" not in message


def test_bad_storage_is_refused():
    with pytest.raises(ValueError, match=r"SpikeConv2d: storage must be one of \('bits', 'uint8'\)"):
        SpikeConv2d(2, 3, 3, storage="int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_saved_bytes_per_layer_type(device, dtype):
    x = _spikes((4, 8, 6, 6), device).to(dtype).requires_grad_()
    cases = {
        "bits": (SpikeConv2d(8, 4, 3, padding=1, storage="bits"), x.numel() // 8),
        "uint8": (SpikeConv2d(8, 4, 3, padding=1, storage="uint8"), x.numel()),
        "pool": (SpikeMaxPool2d(2), x.numel() // 8),
    }
    for name, (module, expected) in cases.items():
        module = module.to(device, dtype)
        saved = []

        def pack_hook(t):
            if not isinstance(t, torch.nn.Parameter):
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            module(x)
        assert sum(saved) == expected, name  # nn.Conv2d: x.numel()·element_size; nn.MaxPool2d adds int64 indices


def test_zoo_students_save_spikes_as_bits_with_the_same_results():
    packed = models.create("sew_resnet18", 10, T=2, imagenet=True, backend="reference")
    dense = models.create("sew_resnet18", 10, T=2, imagenet=True, backend="reference", pack_spikes=False)
    dense.load_state_dict(packed.state_dict())
    assert isinstance(packed.layer1[0].conv2, SpikeConv2d) and packed.layer1[0].conv1.storage == "uint8"
    assert isinstance(packed.maxpool, SpikeMaxPool2d) and type(dense.layer1[0].conv2) is torch.nn.Conv2d
    assert type(models.create("resnet18", 10).layer1[0].conv1) is torch.nn.Conv2d  # teachers: ReLU, dense
    x = torch.rand(2, 3, 32, 32)
    out_p, out_d = packed(x), dense(x)
    assert torch.equal(out_p, out_d)
    for a, b in zip(torch.autograd.grad(out_p.square().sum(), list(packed.parameters())),
                    torch.autograd.grad(out_d.square().sum(), list(dense.parameters()))):
        assert torch.equal(a, b)
