"""Building blocks shared by the students (spiking) and teachers (ReLU) of the zoo.

Activations travel time-major, [T, B, C, H, W]; convolutions, BN and pooling run on the folded batch
[T·B, C, H, W] (no Python loop over time, BN statistics over T·B); neurons run on [T, B, ...]. A teacher
is the same network with ReLU in place of the neuron and T = 1.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from ..neuron import MultistepNeuron
from ..ops import recompute as recompute_ops
from ..spike_layers import SpikeConv2d

SEW_CONNECTS = ("ADD", "AND", "IAND")
NeuronFactory = Callable[[], nn.Module]  # a new neuron module (spiking) or nn.ReLU (teacher) per call


def fire(neuron: nn.Module, x: torch.Tensor, repeat: int | None = None) -> torch.Tensor:
    """neuron(x); with repeat = T, x is one timestep [B, ...] presented at T steps: a fastsnn neuron reads it
    in place and sums its gradient over time in its kernel; any other module (e.g. a SpikingJelly node
    swapped in) gets the time-broadcast view [T, B, ...]."""
    if repeat is None:
        return neuron(x)
    if isinstance(neuron, MultistepNeuron):
        return neuron(x, repeat=repeat)
    return neuron(x.unsqueeze(0).expand(repeat, *x.shape))


def folded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module applied to x[T, B, ...] as one batch of T·B."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def conv_source(conv: nn.Module, x: torch.Tensor, recompute: bool, same_input=None):
    """(folded(conv, x), the ConvSource to recompute that output from, or None): with recompute and a
    SpikeConv2d, the source holds the bits the convolution keeps anyway (fastsnn.ops.recompute); same_input:
    the source of another convolution of x, whose bits are then shared."""
    if recompute and isinstance(conv, SpikeConv2d):
        box = []
        out = conv(x.flatten(0, 1), source_into=box, same_input=same_input)  # module hooks run as usual
        return out.unflatten(0, x.shape[:2]), box[0]
    return folded(conv, x), None


def stem_source(conv: nn.Conv2d, x: torch.Tensor, recompute: bool):
    """(conv(x), the ConvSource keeping the real-valued input x itself, or None): the stem's convolution, whose
    output a recompute rebuilds from the image (fastsnn.ops.recompute)."""
    out = conv(x)
    if not (recompute and torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)):
        return out, None
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return out, None  # rebuilt by F.conv2d with numeric zero padding only
    args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return out, recompute_ops.dense_source(x, conv.weight, conv.bias, args, out)


def bn_fire(bn: nn.Module, neuron: nn.Module, x: torch.Tensor, *, residual: torch.Tensor | None = None,
            residual_storage: str | None = None, residual_bn: nn.Module | None = None, repeat: int | None = None,
            fuse: bool = True, source=None, residual_source=None) -> torch.Tensor:
    """neuron(bn(x) [+ residual, or + residual_bn(residual)]) over x[T, B, C, ...] (or one timestep [B, C, ...]
    presented T = repeat times). With fuse and a stateless fastsnn neuron this is one fused op (fastsnn.bn_lif:
    the normalised tensors and the neuron input are never stored); otherwise the modules run one after the
    other (a teacher's ReLU, a SpikingJelly node swapped in, fuse=False for comparison). residual_storage: how
    the fused op keeps the residual for its backward (see fastsnn.bn_lif). source / residual_source: the
    ConvSources of x and the residual (conv_source), which the fused op saves and recomputes from instead."""
    if fuse and isinstance(neuron, MultistepNeuron) and not neuron.stateful:
        if source is None and residual_source is None:  # the plain call
            return neuron(x, repeat=repeat, bn=bn, residual=residual, residual_storage=residual_storage,
                          residual_bn=residual_bn)
        return neuron(x, repeat=repeat, bn=bn, residual=residual, residual_storage=residual_storage,
                      residual_bn=residual_bn, source=source, residual_source=residual_source)
    y = bn(x) if repeat is not None else folded(bn, x)
    if residual is not None:
        y = y + (residual if residual_bn is None else folded(residual_bn, residual))
    return fire(neuron, y, repeat)


ConvFactory = Callable[..., nn.Module]  # nn.Conv2d's signature: nn.Conv2d, or SpikeConv2d for spike inputs


def spike_convs(pack: bool, sew_add: bool = False) -> tuple[ConvFactory, ConvFactory]:
    """(conv for a block's input, conv for a neuron's output): in a student (pack) both see spikes and save
    them as bits, except a SEW ADD block's input (integer sums: one byte each); else nn.Conv2d."""
    if not pack:
        return nn.Conv2d, nn.Conv2d
    bits = partial(SpikeConv2d, storage="bits")
    return (partial(SpikeConv2d, storage="uint8") if sew_add else bits), bits


class _TwoConvBlock(nn.Module):
    """conv1-bn1-sn1-conv2-bn2-sn2 and a conv1x1-BN downsample where the shape changes; torchvision's names.
    conv_in builds the convolutions of the block input (conv1, downsample), conv_mid conv2 (see spike_convs).
    recompute (set by the network): the fused units save no convolution output (see conv_source)."""

    recompute = False

    def __init__(self, inplanes: int, planes: int, stride: int, neuron: NeuronFactory, fuse_bn: bool = True,
                 conv_in: ConvFactory = nn.Conv2d, conv_mid: ConvFactory = nn.Conv2d):
        super().__init__()
        self.fuse_bn = fuse_bn
        self.conv1 = conv_in(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sn1 = neuron()
        self.conv2 = conv_mid(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.sn2 = neuron()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv_in(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(_TwoConvBlock):
    """Spiking ResNet block: sn2(bn2(conv2(sn1(bn1(conv1(x))))) + shortcut(x)); with ReLU, torchvision's."""

    def forward(self, x):
        y, input_src = conv_source(self.conv1, x, self.recompute)  # input_src: the block input's bits, shared
        out = bn_fire(self.bn1, self.sn1, y, fuse=self.fuse_bn, source=input_src)
        y, src = conv_source(self.conv2, out, self.recompute)
        if self.downsample is None:
            # the identity is the block input, spikes: kept as bits when the block's convolutions keep them so
            storage = "bits" if isinstance(self.conv1, SpikeConv2d) else None
            return bn_fire(self.bn2, self.sn2, y, residual=x, residual_storage=storage, fuse=self.fuse_bn,
                           source=src)
        # the shortcut's BatchNorm runs inside the same op: its output is never stored
        conv, bn = self.downsample
        residual, residual_src = conv_source(conv, x, self.recompute, input_src)
        return bn_fire(self.bn2, self.sn2, y, residual=residual, residual_bn=bn, fuse=self.fuse_bn, source=src,
                       residual_source=residual_src)


class SEWBlock(_TwoConvBlock):
    """Spike-element-wise block (Fang et al. 2021), SpikingJelly's layout and state_dict keys:
    out = sn2(bn2(conv2(sn1(bn1(conv1(x)))))), shortcut = downsample_sn(downsample(x)) or x,
    result = connect(shortcut, out) with ADD: s + o, AND: s·o, IAND: s·(1 − o)."""

    def __init__(self, inplanes: int, planes: int, stride: int, neuron: NeuronFactory, connect: str,
                 fuse_bn: bool = True, conv_in: ConvFactory = nn.Conv2d, conv_mid: ConvFactory = nn.Conv2d):
        super().__init__(inplanes, planes, stride, neuron, fuse_bn, conv_in, conv_mid)
        self.connect = connect
        if self.downsample is not None:
            self.downsample_sn = neuron()

    def forward(self, x):
        y, input_src = conv_source(self.conv1, x, self.recompute)  # input_src: the block input's bits, shared
        out = bn_fire(self.bn1, self.sn1, y, fuse=self.fuse_bn, source=input_src)
        y, src = conv_source(self.conv2, out, self.recompute)
        out = bn_fire(self.bn2, self.sn2, y, fuse=self.fuse_bn, source=src)
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            y, src = conv_source(conv, x, self.recompute, input_src)
            identity = bn_fire(bn, self.downsample_sn, y, fuse=self.fuse_bn, source=src)
        if self.connect == "ADD":
            return identity + out
        if self.connect == "AND":
            return identity * out
        return identity * (1.0 - out)

    def extra_repr(self) -> str:
        return f"connect={self.connect}"
