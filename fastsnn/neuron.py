"""Spiking neuron modules over time-major inputs x[T, ...], backed by fastsnn's fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from .backend import BACKENDS
from .ops.lif import apply_neuron
from .spec import NeuronSpec, kind_of


class MultistepNeuron(nn.Module):
    """A multistep neuron module holding one validated NeuronSpec (see fastsnn.NeuronSpec).

    forward(x[T, ...]) -> spikes [T, ...]; forward(x_step, repeat=T) presents one timestep [...] at all T
    steps (direct encoding; see fastsnn.lif_multistep). By default the neuron is stateless between calls:
    every forward starts from v_reset (a whole sequence is one call). With `stateful=True` (SpikingJelly's
    convention, which conversion keeps) the final membrane of a call is the next call's initial one,
    gradients flowing through it, until `reset()` (e.g. from spikingjelly's functional.reset_net).
    """

    step_mode = "m"

    def __init__(self, spec: NeuronSpec, *, backend: str = "auto", stateful: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.backend = backend
        self.stateful = stateful
        self.v: torch.Tensor | None = None

    @staticmethod
    def from_spec(spec: NeuronSpec, *, backend: str = "auto", stateful: bool = False) -> "MultistepNeuron":
        """The LIF module of a spec (IF for kind "if"), built without validating the spec again."""
        module = (IF if spec.kind == "if" else LIF).__new__(IF if spec.kind == "if" else LIF)
        MultistepNeuron.__init__(module, spec, backend=backend, stateful=stateful)
        return module

    def __getattr__(self, name):
        # the spec's fields read as attributes: neuron.tau, neuron.v_threshold, neuron.surrogate, ...
        spec = self.__dict__.get("spec")
        if spec is not None and name in NeuronSpec.__dataclass_fields__:
            return getattr(spec, name)
        return super().__getattr__(name)

    @property
    def decay_input(self) -> bool:
        """SpikingJelly's name for the charge: True for "lif" (and "if"), False for "lif_no_decay"."""
        return self.spec.kind != "lif_no_decay"

    def forward(self, x: torch.Tensor, repeat: int | None = None) -> torch.Tensor:
        if self.step_mode != "m":
            raise RuntimeError(f"{type(self).__name__}: only step_mode='m' (input [T, ...]) is supported, "
                               f"got step_mode={self.step_mode!r}")
        op = type(self).__name__
        if self.stateful:
            spikes, self.v = apply_neuron(op, x, self.spec, v_init=self.v, return_v=True, repeat=repeat,
                                          backend=self.backend)
            return spikes
        return apply_neuron(op, x, self.spec, repeat=repeat, backend=self.backend)

    def reset(self) -> None:
        """Clears the membrane kept by a stateful neuron (SpikingJelly's functional.reset_net calls this)."""
        self.v = None

    def extra_repr(self) -> str:
        s = self.spec
        tau = "" if s.kind == "if" else f"tau={s.tau}, decay_input={s.kind == 'lif'}, "
        return (tau + f"v_threshold={s.v_threshold}, v_reset={s.v_reset}, surrogate={s.surrogate!r}, "
                f"alpha={s.alpha}, detach_reset={s.detach_reset}" + (", stateful=True" if self.stateful else ""))


class LIF(MultistepNeuron):
    """Leaky integrate-and-fire neuron; forward(x[T, ...]) → spikes [T, ...]. See fastsnn.lif_multistep."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                 detach_reset: bool = False, backend: str = "auto", stateful: bool = False):
        spec = NeuronSpec.create("LIF", kind=kind_of(decay_input, "LIF"), tau=tau, v_threshold=v_threshold,
                                 v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
        super().__init__(spec, backend=backend, stateful=stateful)


class IF(MultistepNeuron):
    """Integrate-and-fire neuron (no leak); forward(x[T, ...]) → spikes [T, ...]. See fastsnn.if_multistep."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto",
                 stateful: bool = False):
        spec = NeuronSpec.create("IF", kind="if", v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                                 alpha=alpha, detach_reset=detach_reset)
        super().__init__(spec, backend=backend, stateful=stateful)
