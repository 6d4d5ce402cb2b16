"""Spiking neuron modules over time-major inputs x[T, ...], backed by fastsnn's fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from .ops.lif import check_neuron_params, if_multistep, lif_multistep


class _MultistepNeuron(nn.Module):
    """Shared state of LIF and IF: the firing-rate record and SpikingJelly-style conventions.

    By default the neuron is stateless between calls: every forward starts from v_reset (a whole
    sequence is one call). With `stateful=True` (SpikingJelly's convention, which conversion keeps) the
    final membrane of a call is the next call's initial one, gradients flowing through it, until
    `reset()` (e.g. from spikingjelly's functional.reset_net). When `record_rate` is True, each forward stores the mean of its spikes in `spike_rate` (a
    detached fp32 scalar; paper eq. 12) and adds to the `spike_sum` / `spike_count` totals.
    """

    step_mode = "m"

    def __init__(self, *, tau, decay_input, v_threshold, v_reset, surrogate, alpha, detach_reset, backend,
                 stateful=False):
        super().__init__()
        check_neuron_params(type(self).__name__, tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                            v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset,
                            backend=backend)
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.surrogate = surrogate
        self.alpha = alpha
        self.detach_reset = detach_reset
        self.backend = backend
        self.stateful = stateful
        self.v: torch.Tensor | None = None
        self.record_rate = False
        self.spike_rate: torch.Tensor | None = None
        self.spike_sum: torch.Tensor | float = 0.0
        self.spike_count = 0

    def _spikes(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode != "m":
            raise RuntimeError(f"{type(self).__name__}: only step_mode='m' (input [T, ...]) is supported, "
                               f"got step_mode={self.step_mode!r}")
        if self.stateful:
            spikes, self.v = self._spikes(x, v_init=self.v, return_v=True)
        else:
            spikes = self._spikes(x)
        if self.record_rate:
            total = spikes.detach().float().sum()
            self.spike_rate = total / spikes.numel()
            self.spike_sum = self.spike_sum + total
            self.spike_count += spikes.numel()
        return spikes

    def start_recording(self) -> None:
        """Clears the spike counters and records each forward's spike rate (see spike_rate, spike_sum)."""
        self.record_rate = True
        self.spike_sum, self.spike_count = 0.0, 0

    def reset(self) -> None:
        """Clears the membrane kept by a stateful neuron (SpikingJelly's functional.reset_net calls this)."""
        self.v = None
        self.spike_rate = None

    def _common_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate!r}, "
                f"alpha={self.alpha}, detach_reset={self.detach_reset}" + (", stateful=True" if self.stateful else ""))


class LIF(_MultistepNeuron):
    """Leaky integrate-and-fire neuron; forward(x[T, ...]) → spikes [T, ...]. See fastsnn.lif_multistep."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                 detach_reset: bool = False, backend: str = "auto", stateful: bool = False):
        super().__init__(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend,
                         stateful=stateful)
        self.tau = tau
        self.decay_input = decay_input

    def _spikes(self, x, **state):
        return lif_multistep(x, tau=self.tau, decay_input=self.decay_input, v_threshold=self.v_threshold,
                             v_reset=self.v_reset, surrogate=self.surrogate, alpha=self.alpha,
                             detach_reset=self.detach_reset, backend=self.backend, **state)

    @classmethod
    def from_spikingjelly(cls, node) -> "LIF":
        """The fastsnn LIF equivalent to a SpikingJelly LIFNode (multi-step, stateful like it); raises
        ValueError naming what cannot be represented exactly."""
        from .interop import neuron_from_spikingjelly

        return neuron_from_spikingjelly(node, expect=cls)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + self._common_repr()


class IF(_MultistepNeuron):
    """Integrate-and-fire neuron (no leak); forward(x[T, ...]) → spikes [T, ...]. See fastsnn.if_multistep."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto",
                 stateful: bool = False):
        super().__init__(tau=None, decay_input=True, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend,
                         stateful=stateful)

    def _spikes(self, x, **state):
        return if_multistep(x, v_threshold=self.v_threshold, v_reset=self.v_reset, surrogate=self.surrogate,
                            alpha=self.alpha, detach_reset=self.detach_reset, backend=self.backend, **state)

    @classmethod
    def from_spikingjelly(cls, node) -> "IF":
        """The fastsnn IF equivalent to a SpikingJelly IFNode (multi-step, stateful like it)."""
        from .interop import neuron_from_spikingjelly

        return neuron_from_spikingjelly(node, expect=cls)

    def extra_repr(self) -> str:
        return self._common_repr()
