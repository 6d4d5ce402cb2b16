"""Model zoo: spiking students and ANN teachers built from one set of blocks, read from one registry.

    fastsnn.models.create(name, num_classes, *, T, neuron="lif", ...)  ->  nn.Module
    fastsnn.models.available()  ->  {"students": [...], "teachers": [...]}
    fastsnn.models.REGISTRY[name]  ->  ModelSpec (role, paired teacher, stems, input channels)

Students take images [B, C, H, W] (direct encoding) or time-major [T, B, C, H, W] and return per-timestep
logits [T, B, classes]; teachers return [B, classes].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from ..neuron import MultistepNeuron
from ..spec import KINDS, NeuronSpec
from .activity import FiringRates, LayerActivity, layer_macs, record_firing_rates, spiking_neurons
from .layers import SEW_CONNECTS
from .zoo import VGG, VGG_CONFIGS, DigitsNet, ResNet

_RESNET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
_WIDTHS = [64, 128, 256, 512]


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture."""
    name: str
    role: str  # "student" or "teacher"
    build: Callable[..., nn.Module]  # build(num_classes, T=, neuron=, in_channels=, [stem=], [connect=])
    teacher: str | None = None  # a student's teacher architecture (same network with ReLU, same parameters)
    stems: tuple[str, ...] = ()  # the stems it can be built with, default first (empty: fixed)
    in_channels: int = 3
    takes_connect: bool = False  # SEW blocks: connect="ADD" | "AND" | "IAND"

    @property
    def default_stem(self) -> str | None:
        return self.stems[0] if self.stems else None


def _resnet(depth, block="basic"):
    return partial(ResNet, _RESNET_BLOCKS[depth], _WIDTHS, block=block)


# TET/MPBN's ResNet-19: 3×3 stem with 128 channels, BasicBlocks [3, 3, 2] at 128/256/512, strides 1/2/2
_resnet19 = partial(ResNet, [3, 3, 2], [128, 256, 512], stem="cifar")

_TEACHERS = [
    ModelSpec("resnet18", "teacher", _resnet(18), stems=("cifar", "imagenet")),
    ModelSpec("resnet19", "teacher", _resnet19),
    ModelSpec("resnet34", "teacher", _resnet(34), stems=("cifar", "imagenet")),
    ModelSpec("vgg11", "teacher", partial(VGG, VGG_CONFIGS["vgg11"])),
    ModelSpec("vgg16", "teacher", partial(VGG, VGG_CONFIGS["vgg16"])),
    ModelSpec("digits_ann", "teacher", DigitsNet, in_channels=1),
    ModelSpec("mnist_ann", "teacher", partial(DigitsNet, pool=4, stem_stride=2, width=32), in_channels=1),
]
_T = {m.name: m for m in _TEACHERS}
_STUDENTS = [
    ModelSpec("spiking_resnet18", "student", _resnet(18), "resnet18", stems=("cifar", "imagenet")),
    ModelSpec("spiking_resnet19", "student", _resnet19, "resnet19"),
    ModelSpec("spiking_resnet34", "student", _resnet(34), "resnet34", stems=("cifar", "imagenet")),
    ModelSpec("spiking_vgg11", "student", _T["vgg11"].build, "vgg11"),
    ModelSpec("spiking_vgg16", "student", _T["vgg16"].build, "vgg16"),
    ModelSpec("sew_resnet18", "student", _resnet(18, "sew"), "resnet18", stems=("imagenet", "cifar"),
              takes_connect=True),
    ModelSpec("sew_resnet34", "student", _resnet(34, "sew"), "resnet34", stems=("imagenet", "cifar"),
              takes_connect=True),
    ModelSpec("digits_snn", "student", DigitsNet, "digits_ann", in_channels=1),
    ModelSpec("mnist_snn", "student", partial(DigitsNet, pool=4, stem_stride=2), "mnist_ann", in_channels=1),
]
REGISTRY: dict[str, ModelSpec] = {m.name: m for m in _TEACHERS + _STUDENTS}


def available() -> dict[str, list[str]]:
    """The registered names: {"students": [...], "teachers": [...]}."""
    return {"students": sorted(n for n, m in REGISTRY.items() if m.role == "student"),
            "teachers": sorted(n for n, m in REGISTRY.items() if m.role == "teacher")}


def model_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        names = available()
        raise ValueError(f"models.create: unknown model {name!r}; valid names: "
                         f"{', '.join(names['students'] + names['teachers'])}")
    return REGISTRY[name]


def create(name: str, num_classes: int, *, T: int | None = None, neuron: str = "lif", tau: float = 2.0,
           v_threshold: float = 1.0, surrogate: str = "atan", alpha: float | None = None, detach_reset: bool = True,
           v_reset: float | None = 0.0, connect: str = "ADD", imagenet: bool | None = None,
           in_channels: int | None = None, backend: str = "auto", fuse_bn: bool = True,
           pack_spikes: bool = True, recompute: bool = False) -> nn.Module:
    """Builds a registered model.

    Students ("spiking_resnet18/19/34", "spiking_vgg11/16", "sew_resnet18/34", "digits_snn", "mnist_snn") need T >= 1
    and use fastsnn neurons: neuron="lif" (or "lif_no_decay", decay_input=False) or "if", with the given tau,
    v_threshold, v_reset, surrogate, alpha and detach_reset. SEW models take connect="ADD" | "AND" | "IAND".
    Teachers ("resnet18/19/34", "vgg11/16", "digits_ann", "mnist_ann") are the same networks with ReLU; T is ignored.
    imagenet: the 7×7 stride-2 stem with max-pool (the default for sew_resnet*, optional for the 18/34-layer
    ResNets, whose module names then match torchvision's so its state_dicts load). in_channels defaults to
    the model's (1 for digits_* and mnist_*, else 3).
    fuse_bn: every conv → BatchNorm → [+ shortcut] → neuron of a student runs as the fused op fastsnn.bn_lif
    (the BN output and the neuron input are never stored); False runs the modules one after the other, for
    comparison. Parameters, state_dict keys and results are the same either way.
    pack_spikes: a student's convolutions and max-pools whose input is spikes save it for backward as bits
    (SEW ADD block inputs, small integer sums, as bytes): fastsnn.SpikeConv2d / SpikeMaxPool2d, with
    nn.Conv2d's keys and identical results; False keeps nn.Conv2d / nn.MaxPool2d.
    recompute: a student's conv → BN → [+ shortcut] → neuron units (the downsample shortcuts' convolutions too)
    save no convolution output: the backward recomputes it from the bits the convolution keeps anyway (the
    stem's from the image), one extra convolution forward per unit. Every gradient, running statistic, logit and
    loss equals recompute=False bit for bit on the CPU (see fastsnn.ops.recompute for CUDA). Needs fuse_bn and
    pack_spikes; eval mode and torch.no_grad cost nothing extra. model.set_recompute(flag) switches it later.
    """
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"models.create: num_classes must be an integer >= 2, got {num_classes!r}")
    if spec.role == "student":
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"models.create: T must be an integer >= 1 for the student {name!r}, got {T!r}")
        neuron_spec = NeuronSpec.create("models.create", kind=neuron if neuron in KINDS else _bad_kind(neuron),
                                        tau=tau, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                                        alpha=alpha, detach_reset=detach_reset)
        factory = partial(MultistepNeuron.from_spec, neuron_spec, backend=backend)
    else:
        T, factory = None, partial(nn.ReLU, inplace=False)
    kw = {}
    if spec.stems:
        stem = spec.default_stem if imagenet is None else "imagenet" if imagenet else "cifar"
        if stem not in spec.stems:
            raise ValueError(f"models.create: {name} has no {stem} stem (it has {', '.join(spec.stems)})")
        kw["stem"] = stem
    elif imagenet:
        raise ValueError(f"models.create: imagenet=True is for the 18/34-layer ResNets, not {name}")
    if spec.takes_connect:
        if connect not in SEW_CONNECTS:
            raise ValueError(f"models.create: connect must be one of {SEW_CONNECTS}, got {connect!r}")
        kw["connect"] = connect
    for flag, value in (("fuse_bn", fuse_bn), ("pack_spikes", pack_spikes), ("recompute", recompute)):
        if not isinstance(value, bool):
            raise TypeError(f"models.create: {flag} must be True or False, got {value!r}")
    model = spec.build(num_classes, T=T, neuron=factory, in_channels=in_channels or spec.in_channels,
                       fuse_bn=fuse_bn, pack_spikes=pack_spikes, **kw)
    if recompute:
        if spec.role != "student":
            raise ValueError(f"models.create: recompute=True is for students (spiking networks), not the teacher "
                             f"{name!r}")
        if not (fuse_bn and pack_spikes):
            raise ValueError(f"models.create: recompute=True needs fuse_bn=True and pack_spikes=True (it rebuilds "
                             f"convolution outputs from the spikes kept as bits inside the fused op), got "
                             f"fuse_bn={fuse_bn}, pack_spikes={pack_spikes}")
        model.set_recompute(True)
    model.arch = name
    return model


def _bad_kind(neuron):
    raise ValueError(f"models.create: neuron must be one of {KINDS} for a student, got {neuron!r}")


__all__ = ["create", "available", "model_spec", "REGISTRY", "ModelSpec", "record_firing_rates", "layer_macs",
           "LayerActivity", "FiringRates", "spiking_neurons"]
