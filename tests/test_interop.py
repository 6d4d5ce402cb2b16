"""fastsnn.convert_spikingjelly on SpikingJelly's own models: same outputs and gradients, kept nodes reported."""
import copy
import logging

import pytest
import torch
from torch import nn

import fastsnn
from helpers import assert_close, run_python

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402
from spikingjelly.activation_based.model import sew_resnet, spiking_resnet, spiking_vgg  # noqa: E402

BUILDERS = {
    "sew_resnet18": lambda **kw: sew_resnet.sew_resnet18(cnf="ADD", **kw),
    "spiking_resnet18": spiking_resnet.spiking_resnet18,
    "spiking_vgg11_bn": spiking_vgg.spiking_vgg11_bn,
}


def _pair(name, node, fn):
    model = BUILDERS[name](spiking_neuron=getattr(neuron, node), surrogate_function=getattr(surrogate, fn)(),
                           num_classes=10)
    functional.set_step_mode(model, "m")
    converted, summary = fastsnn.convert_spikingjelly(copy.deepcopy(model), return_summary=True)
    return model, converted, summary


@pytest.mark.parametrize("fn", ["ATan", "Sigmoid"])
@pytest.mark.parametrize("node", ["LIFNode", "IFNode", "ParametricLIFNode"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_converted_model_gives_the_same_outputs_and_gradients(name, node, fn):
    model, converted, summary = _pair(name, node, fn)
    assert not summary.kept and summary.converted
    assert not any(isinstance(m, neuron.BaseNode) for m in converted.modules())
    expected_type = {"LIFNode": fastsnn.LIF, "IFNode": fastsnn.IF, "ParametricLIFNode": fastsnn.PLIF}[node]
    if node == "ParametricLIFNode":  # each PLIF's w is a tau of its own, not the initial one
        for i, m in enumerate(m for m in model.modules() if isinstance(m, neuron.ParametricLIFNode)):
            with torch.no_grad():
                m.w.fill_(0.1 * (i % 5) - 0.2)
        model, converted, summary = model, fastsnn.convert_spikingjelly(copy.deepcopy(model)), summary
    assert sum(isinstance(m, expected_type) for m in converted.modules()) == len(summary.converted)
    x = torch.randn(2, 1, 3, 32, 32)
    torch.manual_seed(1)  # SpikingJelly's VGG has dropout: both forwards draw the same masks
    out_sj = model(x)
    torch.manual_seed(1)
    out_ours = converted(x)
    assert_close(out_ours, out_sj)
    g = torch.randn_like(out_sj)
    (out_sj * g).sum().backward()
    (out_ours * g).sum().backward()
    params = dict(converted.named_parameters())
    checked = 0
    for pname, p in model.named_parameters():
        if p.grad is None:
            assert params[pname].grad is None
            continue
        # 1e-5 of the largest entry: sums over a deep network's batch and positions reorder in the last bits
        assert_close(params[pname].grad, p.grad, scale=max(1.0, float(p.grad.abs().max())))
        checked += 1
    assert checked > 0


def test_membrane_persists_until_reset_net_like_spikingjelly():
    model, converted, _ = _pair("spiking_resnet18", "LIFNode", "ATan")
    x1, x2 = torch.randn(2, 1, 3, 32, 32), torch.randn(2, 1, 3, 32, 32)
    model.eval(), converted.eval()
    with torch.no_grad():
        model(x1), converted(x1)
        assert_close(converted(x2), model(x2))  # continues from the first call's membrane
        functional.reset_net(model)
        functional.reset_net(converted)
        assert_close(converted(x2), model(x2))  # starts afresh after reset_net


def test_layer_wrappers_keep_working():
    net = nn.Sequential(layer.Conv2d(3, 8, 3, padding=1), layer.BatchNorm2d(8),
                        neuron.LIFNode(tau=3.0, decay_input=False, v_reset=None,
                                       surrogate_function=surrogate.Erf(alpha=1.5)),
                        layer.Flatten(), layer.Linear(8 * 8 * 8, 5))
    functional.set_step_mode(net, "m")
    converted = fastsnn.convert_spikingjelly(net, inplace=False)
    lif = converted[2]
    assert isinstance(lif, fastsnn.LIF)
    assert (lif.tau, lif.decay_input, lif.v_reset, lif.surrogate, lif.alpha) == (3.0, False, None, "erf", 1.5)
    x = torch.randn(3, 2, 3, 8, 8)
    assert_close(converted(x), net(x))
    functional.set_step_mode(converted, "m")
    functional.reset_net(converted)
    assert converted[2].v is None


def test_unsupported_nodes_are_kept_and_reported(caplog):
    net = nn.Sequential(layer.Linear(4, 4), neuron.LIFNode(surrogate_function=surrogate.SoftSign()),
                        layer.Linear(4, 4), neuron.QIFNode(), layer.Linear(4, 4),
                        neuron.IFNode(store_v_seq=True), layer.Linear(4, 4), neuron.LIFNode())
    functional.set_step_mode(net, "m")
    net[7].step_mode = "m"
    with caplog.at_level(logging.WARNING, logger="fastsnn.interop"):
        converted, summary = fastsnn.convert_spikingjelly(net, inplace=False, return_summary=True)
    assert set(summary.kept) == {"1", "3", "5"} and summary.converted == ["7"]
    assert "SoftSign" in summary.kept["1"] and "QIFNode" in summary.kept["3"]
    assert "store_v_seq" in summary.kept["5"]
    assert "3 kept" in caplog.text
    x = torch.randn(2, 3, 4)
    assert_close(converted(x), net(x))  # still runs, same result


def test_single_step_nodes_are_kept():
    net = nn.Sequential(layer.Linear(4, 4), neuron.LIFNode())  # step_mode "s"
    _, summary = fastsnn.convert_spikingjelly(net, return_summary=True)
    assert "step_mode='s'" in summary.kept["1"]



def test_a_node_used_twice_becomes_one_shared_neuron():
    """A node object placed at two positions (one membrane, reset together) is converted at both, into one
    fastsnn neuron; named_modules lists it once, and the second position was left unconverted and unreported."""
    node = neuron.LIFNode(step_mode="m", surrogate_function=surrogate.ATan())
    net = nn.Sequential(layer.Linear(4, 4, step_mode="m"), node, layer.Linear(4, 4, step_mode="m"), node)
    reference = copy.deepcopy(net)
    converted, summary = fastsnn.convert_spikingjelly(net, return_summary=True)
    assert summary.converted == ["1", "3"] and not summary.kept
    assert isinstance(converted[1], fastsnn.LIF) and converted[1] is converted[3]
    for _ in range(2):  # the membrane carried across forwards, as the shared SpikingJelly node carries it
        x = torch.randn(3, 2, 4) * 3
        assert torch.equal(converted(x), reference(x))
    functional.reset_net(converted)
    functional.reset_net(reference)
    x = torch.randn(3, 2, 4) * 3
    assert torch.equal(converted(x), reference(x))


def test_the_neuron_itself_is_refused_with_the_function_to_use():
    with pytest.raises(ValueError, match=r"not the neuron itself \(use fastsnn.neuron_from_spikingjelly\)"):
        fastsnn.convert_spikingjelly(neuron.LIFNode(step_mode="m"))

def test_neuron_from_spikingjelly():
    lif = fastsnn.neuron_from_spikingjelly(neuron.LIFNode(tau=4.0, surrogate_function=surrogate.PiecewiseQuadratic(),
                                                          step_mode="m", detach_reset=True))
    assert isinstance(lif, fastsnn.LIF)
    assert (lif.tau, lif.surrogate, lif.alpha, lif.detach_reset, lif.stateful) == (4.0, "piecewise_quadratic", 1.0,
                                                                                 True, True)
    if_node = fastsnn.neuron_from_spikingjelly(neuron.IFNode(step_mode="m", v_reset=None))
    assert isinstance(if_node, fastsnn.IF) and if_node.v_reset is None
    with pytest.raises(ValueError, match="multi-step only"):
        fastsnn.neuron_from_spikingjelly(neuron.IFNode())


def test_the_core_does_not_import_the_adapter():
    """interop.py is a leaf: importing every core module leaves it (and SpikingJelly) unimported."""
    code = ("import sys; import fastsnn.neuron, fastsnn.ops, fastsnn.models, fastsnn.loss, fastsnn.reference; "
            "print(any(m in sys.modules for m in ('fastsnn.interop', 'spikingjelly')))")
    proc = run_python(code, interpret=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_a_converted_plif_keeps_the_nodes_w():
    """convert_spikingjelly gives each PLIF the ParametricLIFNode's own w Parameter: an optimizer built on the
    SpikingJelly model trains the converted one."""
    model = nn.Sequential(layer.Linear(6, 5), neuron.ParametricLIFNode(init_tau=3.0, step_mode="m"))
    functional.set_step_mode(model, "m")
    w = model[1].w
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    converted = fastsnn.convert_spikingjelly(model)
    assert isinstance(converted[1], fastsnn.PLIF) and converted[1].w is w and converted[1].stateful
    before = w.detach().clone()
    converted(torch.randn(4, 2, 6) * 3).sum().backward()
    optimizer.step()
    assert w.grad is not None and not torch.equal(w.detach(), before)
