"""Swap fastsnn's kernels into SpikingJelly models: every multi-step LIFNode / IFNode / ParametricLIFNode that
fastsnn can represent exactly becomes a fastsnn.LIF / fastsnn.IF / fastsnn.PLIF with the same parameters (a
PLIF keeps the node's own w Parameter); anything else stays and is reported. SpikingJelly is imported only here,
and only when a conversion is asked for."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .neuron import IF, LIF, PLIF, MultistepNeuron

log = logging.getLogger("fastsnn.interop")

# SpikingJelly surrogate class name -> fastsnn surrogate name
_SURROGATES = {"ATan": "atan", "Sigmoid": "sigmoid", "PiecewiseQuadratic": "piecewise_quadratic", "Erf": "erf"}


@dataclass
class ConversionSummary:
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it was left as it was

    def __str__(self) -> str:
        lines = [f"fastsnn.convert_spikingjelly: {len(self.converted)} neuron(s) converted, {len(self.kept)} kept"]
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        return "\n".join(lines)


def _unsupported(node) -> str | None:
    """Why `node` cannot become a fastsnn neuron with identical behaviour, or None when it can."""
    from spikingjelly.activation_based import neuron as sj_neuron

    kind = type(node)
    if kind not in (sj_neuron.LIFNode, sj_neuron.IFNode, sj_neuron.ParametricLIFNode):
        return (f"{kind.__name__} has no fastsnn equivalent (LIFNode, IFNode and ParametricLIFNode are "
                f"converted)")
    if getattr(node, "step_mode", "s") != "m":
        return f"step_mode={node.step_mode!r}: fastsnn neurons are multi-step only"
    if getattr(node, "store_v_seq", False):
        return "store_v_seq=True: fastsnn does not keep the membrane sequence"
    if getattr(node, "_neuron_precision", None) is not None:
        return "a custom neuron precision is set"
    fn = node.surrogate_function
    if type(fn).__name__ not in _SURROGATES or type(fn).__module__.split(".")[-1] != "surrogate":
        return f"surrogate {type(fn).__name__} is not one of {', '.join(_SURROGATES)}"
    if not getattr(fn, "spiking", True):
        return "the surrogate is in non-spiking mode"
    if kind is sj_neuron.LIFNode and not isinstance(node.tau, (int, float)):
        return "tau is not a plain number (learnable?)"
    if kind is sj_neuron.ParametricLIFNode:
        w = getattr(node, "w", None)
        if not isinstance(w, nn.Parameter) or w.numel() != 1 or not w.is_floating_point():
            return "its w is not a one-element floating-point Parameter"
    return None


def neuron_from_spikingjelly(node) -> MultistepNeuron:
    """The fastsnn neuron (LIF, IF or PLIF, stateful like SpikingJelly's) equivalent to a multi-step
    SpikingJelly LIFNode/IFNode/ParametricLIFNode; ValueError naming what cannot be represented exactly if there
    is none. A PLIF takes the node's w Parameter itself (an optimizer holding it keeps training it)."""
    from spikingjelly.activation_based import neuron as sj_neuron

    why = _unsupported(node)
    if why is not None:
        raise ValueError(f"cannot convert {type(node).__name__}: {why}")
    common = dict(v_threshold=float(node.v_threshold), v_reset=None if node.v_reset is None else float(node.v_reset),
                  surrogate=_SURROGATES[type(node.surrogate_function).__name__],
                  alpha=float(node.surrogate_function.alpha), detach_reset=bool(node.detach_reset), stateful=True)
    if type(node) is sj_neuron.LIFNode:
        return LIF(tau=float(node.tau), decay_input=bool(node.decay_input), **common)
    if type(node) is sj_neuron.ParametricLIFNode:
        plif = PLIF(decay_input=bool(node.decay_input), **common)
        plif.w = node.w
        return plif
    return IF(**common)


def convert_spikingjelly(model: nn.Module, *, inplace: bool = True, return_summary: bool = False):
    """Replaces every SpikingJelly LIFNode / IFNode / ParametricLIFNode in multi-step mode by fastsnn.LIF /
    fastsnn.IF / fastsnn.PLIF.

    The replacement carries the node's tau (a ParametricLIFNode's w Parameter itself), decay_input,
    v_threshold, v_reset, detach_reset and surrogate (ATan, Sigmoid, PiecewiseQuadratic, Erf with their alpha),
    and keeps SpikingJelly's convention that the membrane persists across forwards until functional.reset_net.
    A node that cannot be represented exactly (another surrogate, single-step mode, store_v_seq, a LIFNode tau
    that is not a number, another neuron type) stays in place and is listed in the summary, which is logged as a
    warning when anything is kept: behaviour never changes silently.

    Returns the model (a converted deep copy when inplace=False), or (model, ConversionSummary) with
    return_summary=True.
    """
    try:
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based import neuron as sj_neuron
    except ImportError as e:
        raise ImportError("convert_spikingjelly needs spikingjelly: pip install 'fastsnn[spikingjelly]'") from e
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    if isinstance(model, sj_neuron.BaseNode):
        raise ValueError("convert_spikingjelly: pass a model that contains the neuron, not the neuron itself "
                         "(use fastsnn.neuron_from_spikingjelly)")
    summary = ConversionSummary()
    replacements = {}  # id(node) -> its fastsnn neuron: a node used in several places stays one shared neuron
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, sj_neuron.BaseNode):
            continue
        why = _unsupported(module)
        if why is not None:
            summary.kept[name] = why
            continue
        if id(module) not in replacements:
            replacements[id(module)] = neuron_from_spikingjelly(module)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacements[id(module)])
        summary.converted.append(name)
    if hasattr(functional, "invalidate_reset_cache"):
        functional.invalidate_reset_cache(model)
    if summary.kept:
        log.warning("%s", summary)
    return (model, summary) if return_summary else model
