"""Spiking neuron modules over time-major inputs x[T, ...], backed by fastsnn's fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from .ops.lif import check_neuron_params, if_multistep, lif_multistep


class _MultistepNeuron(nn.Module):
    """Shared state of LIF and IF: the firing-rate record and SpikingJelly-style conventions.

    The neuron is stateless between calls: every forward starts from v_reset (a whole sequence is one
    call). When `record_rate` is True, each forward stores the mean of its spikes in `spike_rate` (a
    detached fp32 scalar; paper eq. 12) and adds to the `spike_sum` / `spike_count` totals.
    """

    step_mode = "m"

    def __init__(self, *, tau, decay_input, v_threshold, v_reset, surrogate, alpha, detach_reset, backend):
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
        """SpikingJelly's functional.reset_net hook; there is no membrane state to clear."""
        self.spike_rate = None

    def _common_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate!r}, "
                f"alpha={self.alpha}, detach_reset={self.detach_reset}")


class LIF(_MultistepNeuron):
    """Leaky integrate-and-fire neuron; forward(x[T, ...]) → spikes [T, ...]. See fastsnn.lif_multistep."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                 detach_reset: bool = False, backend: str = "auto"):
        super().__init__(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)
        self.tau = tau
        self.decay_input = decay_input

    def _spikes(self, x):
        return lif_multistep(x, tau=self.tau, decay_input=self.decay_input, v_threshold=self.v_threshold,
                             v_reset=self.v_reset, surrogate=self.surrogate, alpha=self.alpha,
                             detach_reset=self.detach_reset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + self._common_repr()


class IF(_MultistepNeuron):
    """Integrate-and-fire neuron (no leak); forward(x[T, ...]) → spikes [T, ...]. See fastsnn.if_multistep."""

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "auto"):
        super().__init__(tau=None, decay_input=True, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)

    def _spikes(self, x):
        return if_multistep(x, v_threshold=self.v_threshold, v_reset=self.v_reset, surrogate=self.surrogate,
                            alpha=self.alpha, detach_reset=self.detach_reset, backend=self.backend)

    def extra_repr(self) -> str:
        return self._common_repr()
