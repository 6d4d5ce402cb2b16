"""What a model does while it runs, for the paper's Table 4: firing rates (forward hooks on the neuron
modules) and per-layer MACs with the energy estimate (forward hooks on conv/linear layers)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..neuron import MultistepNeuron


def spiking_neurons(model: nn.Module) -> dict[str, MultistepNeuron]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultistepNeuron)}


class FiringRates:
    """Spike counts of every neuron layer, accumulated by forward hooks over the forwards made while it is
    attached (see record_firing_rates)."""

    def __init__(self, model: nn.Module):
        self.neurons = spiking_neurons(model)
        self.sums = {name: 0.0 for name in self.neurons}
        self.counts = {name: 0 for name in self.neurons}
        self._hooks = []

    def _hook(self, name, module, inputs, spikes):
        self.sums[name] += float(spikes.detach().float().sum())
        self.counts[name] += spikes.numel()

    def attach(self) -> "FiringRates":
        self._hooks = [m.register_forward_hook(partial(self._hook, name)) for name, m in self.neurons.items()]
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def per_layer(self) -> dict[str, float]:
        """Mean spike rate of each layer over all recorded forwards (paper eq. 12)."""
        return {name: self.sums[name] / self.counts[name] for name in self.neurons if self.counts[name]}

    def mean(self) -> float:
        """Rate of all the model's spikes over all its neurons (every layer weighted by its size)."""
        count = sum(self.counts.values())
        return sum(self.sums.values()) / count if count else math.nan


@contextmanager
def record_firing_rates(model: nn.Module):
    """with record_firing_rates(model) as rates: model(x); rates.per_layer() -> {layer: rate in [0, 1]}."""
    rates = FiringRates(model).attach()
    try:
        yield rates
    finally:
        rates.detach()


class LayerActivity:
    """Forward hooks on every conv/linear layer, accumulated over forwards: MACs and the summed input.

    For the paper's energy estimate (Table 4): the encoding layer (the first, which sees the analog
    image) costs MACs; every other layer costs accumulates = its input's mean (the firing rate when that
    input is spikes) × its MACs. E = 4.6 pJ·MAC + 0.9 pJ·AC."""

    E_MAC_PJ = 4.6
    E_AC_PJ = 0.9

    def __init__(self, model: nn.Module):
        self.rows: dict[str, dict] = {}
        self.hooks = [m.register_forward_hook(partial(self._hook, name)) for name, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))]

    def _hook(self, name, module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        row = self.rows.setdefault(name, {"layer": name, "macs": 0, "input_sum": 0.0, "input_count": 0,
                                          "encoding": not self.rows})
        row["macs"] += output.numel() * per_output
        row["input_sum"] += float(x.detach().float().sum())
        row["input_count"] += x.numel()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def per_layer(self, samples: int) -> list[dict]:
        """[{layer, macs (per sample, all timesteps), input_rate, input_mean, encoding}] in forward order.
        input_mean is the mean of the layer's input; input_rate is the same for the layers whose input is spikes
        (a firing rate; a mean spike count after a SEW ADD block) and None for the encoding layer, whose input
        is the analog image (its mean may be negative and is not a rate)."""
        rows = []
        for r in self.rows.values():
            mean = r["input_sum"] / max(1, r["input_count"])
            rows.append({"layer": r["layer"], "macs": r["macs"] / samples,
                         "input_rate": None if r["encoding"] else mean, "input_mean": mean, "encoding": r["encoding"]})
        return rows

    def energy(self, samples: int) -> dict:
        layers = self.per_layer(samples)
        macs = sum(r["macs"] for r in layers if r["encoding"])
        acs = sum(r["input_rate"] * r["macs"] for r in layers if not r["encoding"])
        return {"layers": layers, "encoding_macs": macs, "acs": acs,
                "energy_mJ": (self.E_MAC_PJ * macs + self.E_AC_PJ * acs) * 1e-9}


def layer_macs(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """LayerActivity.per_layer for one forward of `example` (images [B, ...] or time-major [T, B, ...])."""
    meter = LayerActivity(model)
    try:
        with torch.no_grad():
            model(example)
    finally:
        meter.remove()
    return meter.per_layer(example.shape[0] if example.dim() == 4 else example.shape[1])
