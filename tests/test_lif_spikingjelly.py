"""The reference agrees with SpikingJelly's LIFNode/IFNode (step_mode='m', CPU): spikes and gradients."""
import itertools

import pytest
import torch

from fastsnn import reference
from helpers import assert_close, product_cases

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")

SJ_SURROGATES = {"atan": "ATan", "sigmoid": "Sigmoid", "piecewise_quadratic": "PiecewiseQuadratic", "erf": "Erf"}


def _sj_node(neuron, surrogate, alpha, **kw):
    fn = getattr(sj_surrogate, SJ_SURROGATES[surrogate])(alpha=alpha)
    if neuron == "if":
        kw.pop("tau"), kw.pop("decay_input")
        return sj_neuron.IFNode(surrogate_function=fn, step_mode="m", **kw)
    return sj_neuron.LIFNode(surrogate_function=fn, step_mode="m", **kw)


NEURONS = {f"{n}-{'hard' if r == 0.0 else 'soft'}{'' if d else '-nodecay'}{'-detach' if det else ''}": (n, r, d, det)
           for n, r, d, det in [("lif", r, d, det) for r, d, det in itertools.product([0.0, None], [True, False],
                                                                                       [True, False])]
           + [("if", r, True, det) for r, det in itertools.product([0.0, None], [True, False])]}


# tiered (helpers.product_cases): every value once by default with --quick, all pairs by default, all with --full
@pytest.mark.parametrize("T,surrogate_alpha,neuron_options", product_cases(
    T=[1, 2, 4, 7], surrogate_alpha={"atan": ("atan", 2.0), "sigmoid": ("sigmoid", 4.0),
                                     "pq": ("piecewise_quadratic", 1.0), "erf": ("erf", 2.0),
                                     "atan3.5": ("atan", 3.5)}, neuron_options=NEURONS))
def test_reference_matches_spikingjelly(T, surrogate_alpha, neuron_options):
    (surrogate, alpha), (neuron, v_reset, decay_input, detach_reset) = surrogate_alpha, neuron_options
    shape = (3, 37)
    kw = dict(tau=2.0 if neuron == "if" else 3.0, decay_input=decay_input, v_threshold=1.0, v_reset=v_reset,
              detach_reset=detach_reset)
    x = (torch.randn(T, *shape) * 1.5 + 0.4).requires_grad_()
    v_init = (torch.randn(*shape) * 0.5).requires_grad_()
    grad_spikes = torch.randn(T, *shape)

    node = _sj_node(neuron, surrogate, alpha, **dict(kw))
    node.v = v_init
    sj_spikes = node(x)
    sj_grads = torch.autograd.grad((sj_spikes * grad_spikes).sum(), [x, v_init])

    ours = reference.lif_multistep(x, neuron=neuron, surrogate=surrogate, alpha=alpha, v_init=v_init, **kw)
    our_grads = torch.autograd.grad((ours * grad_spikes).sum(), [x, v_init])
    assert torch.equal(ours, sj_spikes)
    assert_close(our_grads[0], sj_grads[0])
    assert_close(our_grads[1], sj_grads[1])
