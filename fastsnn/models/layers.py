"""Building blocks shared by the students (spiking) and teachers (ReLU) of the zoo.

Activations travel time-major, [T, B, C, H, W]; convolutions, BN and pooling run on the folded batch
[T·B, C, H, W] (no Python loop over time, BN statistics over T·B); neurons run on [T, B, ...]. A teacher
is the same network with ReLU in place of the neuron and T = 1.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..neuron import MultistepNeuron

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


def bn_fire(bn: nn.Module, neuron: nn.Module, x: torch.Tensor, *, residual: torch.Tensor | None = None,
            repeat: int | None = None, fuse: bool = True) -> torch.Tensor:
    """neuron(bn(x) [+ residual]) over x[T, B, C, ...] (or one timestep [B, C, ...] presented T = repeat
    times). With fuse and a stateless fastsnn neuron this is one fused op (fastsnn.bn_lif: the normalised
    tensor and the neuron input are never stored); otherwise the modules run one after the other (a teacher's
    ReLU, a SpikingJelly node swapped in, fuse=False for comparison)."""
    if fuse and isinstance(neuron, MultistepNeuron) and not neuron.stateful:
        return neuron(x, repeat=repeat, bn=bn, residual=residual)
    y = bn(x) if repeat is not None else folded(bn, x)
    if residual is not None:
        y = y + residual
    return fire(neuron, y, repeat)


class _TwoConvBlock(nn.Module):
    """conv1-bn1-sn1-conv2-bn2-sn2 and a conv1x1-BN downsample where the shape changes; torchvision's names."""

    def __init__(self, inplanes: int, planes: int, stride: int, neuron: NeuronFactory, fuse_bn: bool = True):
        super().__init__()
        self.fuse_bn = fuse_bn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sn1 = neuron()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.sn2 = neuron()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(_TwoConvBlock):
    """Spiking ResNet block: sn2(bn2(conv2(sn1(bn1(conv1(x))))) + shortcut(x)); with ReLU, torchvision's."""

    def forward(self, x):
        out = bn_fire(self.bn1, self.sn1, folded(self.conv1, x), fuse=self.fuse_bn)
        identity = x if self.downsample is None else folded(self.downsample, x)
        return bn_fire(self.bn2, self.sn2, folded(self.conv2, out), residual=identity, fuse=self.fuse_bn)


class SEWBlock(_TwoConvBlock):
    """Spike-element-wise block (Fang et al. 2021), SpikingJelly's layout and state_dict keys:
    out = sn2(bn2(conv2(sn1(bn1(conv1(x)))))), shortcut = downsample_sn(downsample(x)) or x,
    result = connect(shortcut, out) with ADD: s + o, AND: s·o, IAND: s·(1 − o)."""

    def __init__(self, inplanes: int, planes: int, stride: int, neuron: NeuronFactory, connect: str,
                 fuse_bn: bool = True):
        super().__init__(inplanes, planes, stride, neuron, fuse_bn)
        self.connect = connect
        if self.downsample is not None:
            self.downsample_sn = neuron()

    def forward(self, x):
        out = bn_fire(self.bn1, self.sn1, folded(self.conv1, x), fuse=self.fuse_bn)
        out = bn_fire(self.bn2, self.sn2, folded(self.conv2, out), fuse=self.fuse_bn)
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = bn_fire(bn, self.downsample_sn, folded(conv, x), fuse=self.fuse_bn)
        if self.connect == "ADD":
            return identity + out
        if self.connect == "AND":
            return identity * out
        return identity * (1.0 - out)

    def extra_repr(self) -> str:
        return f"connect={self.connect}"
