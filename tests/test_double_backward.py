"""Double backward: every fused op's gradient, taken with create_graph=True, refuses a second differentiation
with an error naming the op (it has no graph behind it, so second-order terms would otherwise vanish
silently); the reference backends are twice differentiable."""
import pytest
import torch

import fastsnn


def _lif(backend, plain=True):
    x = torch.randn(3, 2, 8) * 2
    if plain:
        return x, lambda t: fastsnn.lif_multistep(t, backend=backend)
    v0 = torch.rand(2, 8)
    return x, lambda t: fastsnn.lif_multistep(t, v_init=v0, return_v=True, backend=backend)[0]


def _bn(backend, residual_bn=False):
    x = torch.randn(3, 2, 4, 5) * 2
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    r = torch.randn(3, 2, 4, 5)
    if residual_bn:
        return x, lambda t: fastsnn.bn_lif(t, w, b, None, None, training=True, residual=r,
                                           residual_bn=(w, b, None, None), backend=backend)
    return x, lambda t: fastsnn.bn_if(t, w, b, torch.zeros(4), torch.ones(4), training=True, residual=r,
                                      backend=backend)


def _conv(_backend):
    conv = fastsnn.SpikeConv2d(3, 4, 3, padding=1)
    return (torch.rand(2, 3, 6, 6) > 0.5).float(), conv


def _pool(_backend):
    return (torch.rand(2, 3, 6, 6) > 0.5).float(), fastsnn.SpikeMaxPool2d(2)


def _loss(backend, terms=False):
    u, y = torch.randn(2, 10), torch.tensor([1, 7])
    if terms:
        return torch.randn(3, 2, 10), lambda z: fastsnn.tser_loss(z, u, y, return_terms=True, backend=backend)[0]
    return torch.randn(3, 2, 10), lambda z: fastsnn.tser_loss(z, u, y, backend=backend)


def _plif(backend):
    w = torch.tensor(0.1, requires_grad=True)
    return torch.randn(3, 2, 8) * 2, lambda t: fastsnn.plif_multistep(t, w, backend=backend)


OPS = {"lif_multistep": _lif, "plif_multistep": _plif, "lif_multistep-v_init": lambda b: _lif(b, plain=False),
       "bn_lif": lambda b: _bn(b, residual_bn=True), "bn_if-residual": _bn, "SpikeConv2d": _conv,
       "SpikeMaxPool2d": _pool, "tser_loss": _loss, "tser_loss-terms": lambda b: _loss(b, terms=True)}
NAMES = {"lif_multistep-v_init": "lif_multistep", "plif_multistep": "lif_multistep", "bn_if-residual": "bn_lif",
         "tser_loss-terms": "tser_loss"}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("use", ["backward", "penalty-beside-a-loss"])
def test_double_backward_through_a_fused_op_is_refused_naming_it(device, op, use):
    x, fn = OPS[op]("triton")
    x.requires_grad_()
    out = fn(x)
    weight = torch.randn(out.shape)
    (grad,) = torch.autograd.grad((out * weight).sum(), x, create_graph=True)
    assert grad.requires_grad  # it does not pass for a constant
    # second order: a gradient penalty; beside a loss that does differentiate, it must not vanish silently
    penalty = (grad ** 2).sum() + (x ** 2).sum() if use == "penalty-beside-a-loss" else grad.sum()
    with pytest.raises(RuntimeError, match=f"{NAMES.get(op, op)}: its gradient cannot be differentiated again"):
        penalty.backward()


def test_first_order_gradients_under_create_graph_are_unchanged(device):
    x, fn = OPS["bn_lif"]("triton")
    x.requires_grad_()
    weight = torch.randn(x.shape)
    plain = torch.autograd.grad((fn(x) * weight).sum(), x)[0]
    graphed = torch.autograd.grad((fn(x) * weight).sum(), x, create_graph=True)[0]
    assert torch.equal(plain, graphed.detach())


@pytest.mark.parametrize("op", ["lif_multistep", "bn_lif", "tser_loss"])
def test_the_reference_backend_is_twice_differentiable(op):
    x, fn = OPS[op]("reference")
    x.requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad((out * torch.randn(out.shape, dtype=out.dtype)).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad((grad ** 2).sum(), x)
    assert torch.isfinite(second).all() and second.abs().sum() > 0
