"""Model zoo: spiking students and ANN teachers built from one set of blocks.

    fastsnn.models.create(name, num_classes, *, T, neuron="lif", ...)  ->  nn.Module
    fastsnn.models.available()  ->  {"students": [...], "teachers": [...]}

Students take images [B, C, H, W] (direct encoding) or time-major [T, B, C, H, W] and return per-timestep
logits [T, B, classes]; teachers return [B, classes].
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..neuron import _MultistepNeuron
from ..ops.lif import check_neuron_params
from .layers import NEURONS, SEW_CONNECTS
from .zoo import VGG, VGG_CONFIGS, DigitsNet, ResNet

_RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
_WIDTHS = [64, 128, 256, 512]


def _resnet(depth, *, stem, block="basic", **kw):
    return partial(ResNet, _RESNET_BLOCKS[depth], _WIDTHS, stem=stem, block=block, **kw)


def _resnet19(**kw):
    # TET/MPBN's ResNet-19: 3×3 stem with 128 channels, BasicBlocks [3, 3, 2] at 128/256/512, strides 1/2/2
    return partial(ResNet, [3, 3, 2], [128, 256, 512], stem="cifar", **kw)


# teacher architectures (ReLU); every student is one of them with spiking neurons
TEACHERS = {
    "resnet18": lambda: _resnet(18, stem="cifar"),
    "resnet19": _resnet19,
    "resnet34": lambda: _resnet(34, stem="cifar"),
    "vgg11": lambda: partial(VGG, VGG_CONFIGS["vgg11"]),
    "vgg16": lambda: partial(VGG, VGG_CONFIGS["vgg16"]),
    "digits_ann": lambda: DigitsNet,
}
# student -> the teacher architecture it mirrors (same parameter count)
TEACHER_OF = {"spiking_resnet18": "resnet18", "spiking_resnet19": "resnet19", "spiking_resnet34": "resnet34",
              "spiking_vgg11": "vgg11", "spiking_vgg16": "vgg16", "sew_resnet18": "resnet18",
              "sew_resnet34": "resnet34", "digits_snn": "digits_ann"}
STUDENTS = {name: TEACHERS[teacher] for name, teacher in TEACHER_OF.items() if not name.startswith("sew")}
STUDENTS |= {"sew_resnet18": lambda: _resnet(18, stem="imagenet", block="sew"),
             "sew_resnet34": lambda: _resnet(34, stem="imagenet", block="sew")}
IMAGENET_DEFAULT = {"sew_resnet18", "sew_resnet34"}


def available() -> dict[str, list[str]]:
    """The registered names: {"students": [...], "teachers": [...]}."""
    return {"students": sorted(STUDENTS), "teachers": sorted(TEACHERS)}


def create(name: str, num_classes: int, *, T: int | None = None, neuron: str = "lif", tau: float = 2.0,
           v_threshold: float = 1.0, surrogate: str = "atan", alpha: float | None = None, detach_reset: bool = True,
           v_reset: float | None = 0.0, connect: str = "ADD", imagenet: bool | None = None, in_channels: int = 3,
           backend: str = "auto") -> nn.Module:
    """Builds a registered model.

    Students ("spiking_resnet18/19/34", "spiking_vgg11/16", "sew_resnet18/34", "digits_snn") need T >= 1
    and use fastsnn LIF (neuron="lif") or IF ("if") neurons with the given tau, v_threshold, v_reset,
    surrogate, alpha and detach_reset. SEW models take connect="ADD" | "AND" | "IAND".
    Teachers ("resnet18/19/34", "vgg11/16", "digits_ann") are the same networks with ReLU; T is ignored.
    imagenet: the 7×7 stride-2 stem with max-pool (default for sew_resnet*, optional for resnet18/34,
    whose module names then match torchvision's so its state_dicts load). "digits_*" default to 1 input
    channel.
    """
    names = sorted(STUDENTS) + sorted(TEACHERS)
    if name not in STUDENTS and name not in TEACHERS:
        raise ValueError(f"models.create: unknown model {name!r}; valid names: {', '.join(names)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"models.create: num_classes must be an integer >= 2, got {num_classes!r}")
    student = name in STUDENTS
    if student:
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"models.create: T must be an integer >= 1 for the student {name!r}, got {T!r}")
        if neuron not in ("lif", "if"):
            raise ValueError(f"models.create: neuron must be 'lif' or 'if' for a student, got {neuron!r}")
        check_neuron_params("models.create", tau=tau if neuron == "lif" else None, decay_input=True,
                            v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                            detach_reset=detach_reset, backend=backend)
        neuron_cfg = dict(kind=neuron, tau=tau, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                          alpha=alpha, detach_reset=detach_reset, backend=backend)
    else:
        T, neuron_cfg = 1, dict(kind="relu")
    if connect not in SEW_CONNECTS:
        raise ValueError(f"models.create: connect must be one of {SEW_CONNECTS}, got {connect!r}")
    kw = {}
    if name.startswith("digits"):
        in_channels = 1 if in_channels == 3 else in_channels
    elif "resnet" in name and name not in ("resnet19", "spiking_resnet19"):
        use_imagenet = name in IMAGENET_DEFAULT if imagenet is None else imagenet
        kw["stem"] = "imagenet" if use_imagenet else "cifar"
    if name.startswith("sew"):
        kw["connect"] = connect
    builder = (STUDENTS if student else TEACHERS)[name]()
    model = builder(num_classes, T=T, neuron=neuron_cfg, in_channels=in_channels, **kw)
    model.arch = name
    return model


def spiking_neurons(model: nn.Module) -> dict[str, _MultistepNeuron]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _MultistepNeuron)}


class FiringRates:
    """Spike counts of every neuron layer, accumulated over the forwards made while recording."""

    def __init__(self, model: nn.Module):
        self.neurons = spiking_neurons(model)

    def per_layer(self) -> dict[str, float]:
        """Mean spike rate of each layer over all recorded forwards (paper eq. 12)."""
        return {name: float(m.spike_sum / m.spike_count) for name, m in self.neurons.items() if m.spike_count}

    def mean(self) -> float:
        """Rate of all the model's spikes over all its neurons (every layer weighted by its size)."""
        total = sum(float(m.spike_sum) for m in self.neurons.values())
        count = sum(m.spike_count for m in self.neurons.values())
        return total / count if count else math.nan


@contextmanager
def record_firing_rates(model: nn.Module):
    """with record_firing_rates(model) as rates: model(x); rates.per_layer() -> {layer: rate in [0, 1]}."""
    rates = FiringRates(model)
    for m in rates.neurons.values():
        m.start_recording()
    try:
        yield rates
    finally:
        for m in rates.neurons.values():
            m.record_rate = False


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
        """[{layer, macs (per sample, all timesteps), input_rate, encoding}] in forward order."""
        return [{"layer": r["layer"], "macs": r["macs"] / samples, "input_rate": r["input_sum"] / max(1, r["input_count"]),
                 "encoding": r["encoding"]} for r in self.rows.values()]

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


__all__ = ["create", "available", "record_firing_rates", "layer_macs", "LayerActivity", "FiringRates", "NEURONS"]
