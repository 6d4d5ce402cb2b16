"""bfloat16 under Triton's interpreter, which has no bf16 arithmetic (its results would be silently wrong):
with backend="auto" every op runs its reference on bf16 CPU tensors, and backend="triton" refuses them in one
line naming the dtype and TRITON_INTERPRET."""
import pytest
import torch

import fastsnn
from fastsnn.backend import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the interpreter runs the kernels on the CPU")


def _lif(backend, x):
    return fastsnn.lif_multistep(x, backend=backend)


def _lif_v_init(backend, x):
    return fastsnn.lif_multistep(x, v_init=x[0].detach() * 0.5, backend=backend)


def _bn_lif(backend, x):
    C = x.shape[2]
    return fastsnn.bn_lif(x, torch.ones(C, dtype=torch.bfloat16), torch.zeros(C), None, None, training=True,
                          backend=backend)


def _bn_residual(backend, x):
    C = x.shape[2]
    return fastsnn.bn_lif(x.float(), torch.ones(C), torch.zeros(C), None, None, training=True, residual=x,
                          backend=backend)  # only the residual is bf16


def _loss(backend, x):
    T, B, C = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    z = x.reshape(T, B, C)
    u = torch.randn(B, C, generator=torch.Generator().manual_seed(2))  # only the student logits are bf16
    return fastsnn.tser_loss(z, u, torch.arange(B) % C, backend=backend)


OPS = {"lif_multistep": _lif, "lif_multistep-v_init": _lif_v_init, "bn_lif": _bn_lif, "bn_lif-residual": _bn_residual,
       "tser_loss": _loss}


@pytest.mark.parametrize("op", list(OPS))
def test_auto_runs_the_reference_and_triton_refuses(op):
    x = (torch.randn(3, 2, 4, 5) * 2).bfloat16()
    results = []
    for backend in ("auto", "reference"):
        leaf = x.clone().requires_grad_()
        out = OPS[op](backend, leaf)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((out.float() * weight).sum(), leaf)
        results.append((out, grad))
    (out, grad), (want, want_grad) = results
    assert torch.equal(out, want) and torch.equal(grad, want_grad) and want_grad.abs().sum() > 0
    with pytest.raises(TypeError, match=r"^(lif_multistep|bn_lif|tser_loss): bfloat16 tensors cannot run the "
                                        r"kernels under Triton's interpreter \(TRITON_INTERPRET=1"):
        OPS[op]("triton", x.clone().requires_grad_())


@pytest.mark.parametrize("layer", ["conv", "pool"])
def test_spike_layers_store_and_restore_bf16_spikes(layer):
    """SpikeConv2d / SpikeMaxPool2d with bf16 spikes pack and unpack them exactly (the interpreter wrote 9e-41
    for 1, giving a zero weight gradient): gradients equal the dense layer's."""
    spikes = (torch.rand(2, 3, 6, 6) > 0.5).bfloat16()
    if layer == "conv":
        ours = fastsnn.SpikeConv2d(3, 4, 3, padding=1).bfloat16()
        dense = torch.nn.Conv2d(3, 4, 3, padding=1).bfloat16()
        dense.load_state_dict(ours.state_dict())
    else:
        ours, dense = fastsnn.SpikeMaxPool2d(2), torch.nn.MaxPool2d(2)
    grads = []
    for module in (ours, dense):
        x = spikes.clone().requires_grad_()
        out = module(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).bfloat16())
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert grads[1][-1].abs().sum() > 0
