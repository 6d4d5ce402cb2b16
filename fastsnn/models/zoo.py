"""The networks: CIFAR/ImageNet ResNets (spiking, SEW, ANN), VGG and the small digits pair."""
from __future__ import annotations

import torch
from torch import nn

from ..spike_layers import SpikeMaxPool2d
from .layers import BasicBlock, NeuronFactory, SEWBlock, bn_fire, conv_source, folded, spike_convs, stem_source


class TimeMajorNet(nn.Module):
    """Common input handling: images [B, C, H, W] (direct encoding: the stem runs once and its output is
    presented at all T steps, the first neuron reading it in place) or time-major [T, B, C, H, W].
    Students (T given) return [T, B, classes]; teachers (T None, ReLU) return [B, classes].

    recompute (see set_recompute): every conv → BN → [+ shortcut] → neuron unit saves no convolution output; its
    backward recomputes it from the bits the convolution keeps (the stem's from the image)."""

    recompute = False

    def __init__(self, T: int | None, fuse_bn: bool = True, pack_spikes: bool = True):
        super().__init__()
        self.T = T
        self.spiking = T is not None
        self.fuse_bn = fuse_bn  # conv → BN → [+ shortcut] → neuron as the fused op (fastsnn.bn_lif)
        # convolutions and max-pools over spikes save them as bits (SpikeConv2d, SpikeMaxPool2d)
        self.pack_spikes = self.spiking and pack_spikes

    def stem_conv(self) -> nn.Conv2d:  # the stem's convolution (its BN and neuron run in body, fused)
        raise NotImplementedError

    def stem(self, x):
        return self.stem_conv()(x)

    def body(self, x, repeat=None, source=None):
        """[T, B, ...] (or [B, ...] with repeat) after the stem's conv -> logits; source: the stem output's
        ConvSource (recompute)."""
        raise NotImplementedError

    def set_recompute(self, recompute: bool) -> "TimeMajorNet":
        """Turns the recompute of convolution outputs on or off (results and gradients are the same either way;
        see fastsnn.ops.recompute). Needs the fused units and packed spikes (fuse_bn and pack_spikes)."""
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        if recompute and not self.spiking:
            raise ValueError("recompute=True is for students (spiking networks); a teacher has no fused units")
        if recompute and not (self.fuse_bn and self.pack_spikes):
            raise ValueError(f"recompute=True rebuilds convolution outputs inside the fused BatchNorm + neuron op from "
                             f"the spikes kept as bits: it needs fuse_bn=True and pack_spikes=True, got "
                             f"fuse_bn={self.fuse_bn}, pack_spikes={self.pack_spikes}")
        for m in self.modules():
            if hasattr(m, "recompute"):
                m.recompute = recompute
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.recompute
        if x.dim() == 4:
            y, src = stem_source(self.stem_conv(), x, recompute)  # [B, ...], computed once
            out = self.body(y, repeat=self.T, source=src) if self.spiking else self.body(y.unsqueeze(0))
        elif x.dim() == 5:
            y, src = stem_source(self.stem_conv(), x.flatten(0, 1), recompute)
            out = self.body(y.unflatten(0, x.shape[:2]), source=src)
        else:
            raise ValueError(f"{type(self).__name__}: input must be images [B, C, H, W] or time-major "
                             f"[T, B, C, H, W], got shape {tuple(x.shape)}")
        return out if self.spiking else out.mean(dim=0)


class ResNet(TimeMajorNet):
    """ResNet family. cifar stem: 3×3 conv, no max-pool; imagenet stem: 7×7 stride-2 conv and max-pool.
    Module names follow torchvision (conv1, bn1, layer1..4, fc), so torchvision and SpikingJelly
    state_dicts load."""

    def __init__(self, blocks, widths, num_classes, *, T, neuron: NeuronFactory, block="basic", connect="ADD",
                 stem="cifar", in_channels=3, stem_width=None, fuse_bn=True, pack_spikes=True):
        super().__init__(T, fuse_bn, pack_spikes)
        stem_width = stem_width or widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.sn1 = neuron()
        pool = SpikeMaxPool2d if self.pack_spikes else nn.MaxPool2d  # over spikes: saves bits, no indices
        self.maxpool = pool(3, 2, 1) if stem == "imagenet" else nn.Identity()
        convs = spike_convs(self.pack_spikes, sew_add=block == "sew" and connect == "ADD")
        inplanes = stem_width
        for i, (count, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                if block == "sew":
                    layers.append(SEWBlock(inplanes, width, stride if j == 0 else 1, neuron, connect, fuse_bn, *convs))
                else:
                    layers.append(BasicBlock(inplanes, width, stride if j == 0 else 1, neuron, fuse_bn, *convs))
                inplanes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem_conv(self):
        return self.conv1

    def body(self, x, repeat=None, source=None):
        x = folded(self.maxpool, bn_fire(self.bn1, self.sn1, x, repeat=repeat, fuse=self.fuse_bn, source=source))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = folded(self.avgpool, x).flatten(2)
        return self.fc(x)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(TimeMajorNet):
    """CIFAR VGG with BN: [conv3×3-BN-neuron]×n with 2×2 max-pools, global average pool, one FC."""

    def __init__(self, config, num_classes, *, T, neuron: NeuronFactory, in_channels=3, fuse_bn=True,
                 pack_spikes=True):
        super().__init__(T, fuse_bn, pack_spikes)
        widths = [c for c in config if c != "M"]
        self.conv0 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(widths[0])
        self.features = nn.ModuleList()  # each: (conv, bn, neuron) or a pool
        self.sn0 = neuron()
        pool, (_, conv) = SpikeMaxPool2d if self.pack_spikes else nn.MaxPool2d, spike_convs(self.pack_spikes)
        inplanes = widths[0]
        for c in config[1:]:
            if c == "M":
                self.features.append(pool(2))
            else:
                self.features.append(nn.ModuleDict({"conv": conv(inplanes, c, 3, 1, 1, bias=False),
                                                    "bn": nn.BatchNorm2d(c), "sn": neuron()}))
                inplanes = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def stem_conv(self):
        return self.conv0

    def body(self, x, repeat=None, source=None):
        x = bn_fire(self.bn0, self.sn0, x, repeat=repeat, fuse=self.fuse_bn, source=source)
        for layer in self.features:
            if isinstance(layer, nn.ModuleDict):
                y, src = conv_source(layer["conv"], x, self.recompute)
                x = bn_fire(layer["bn"], layer["sn"], y, fuse=self.fuse_bn, source=src)
            else:
                x = folded(layer, x)
        return self.fc(folded(self.avgpool, x).flatten(2))


class DigitsNet(TimeMajorNet):
    """The small pair for scikit-learn's 8×8 digits: conv(16)-BN-neuron, conv(32, stride 2)-BN-neuron,
    average pool to pool×pool, FC. The mnist5k pair (28×28) is the same with pool=4 and a stride-2 stem."""

    def __init__(self, num_classes, *, T, neuron: NeuronFactory, in_channels=1, width=16, fuse_bn=True,
                 pack_spikes=True, pool=2, stem_stride=1):
        super().__init__(T, fuse_bn, pack_spikes)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.sn1 = neuron()
        self.conv2 = spike_convs(self.pack_spikes)[1](width, 2 * width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.sn2 = neuron()
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(2 * width * pool * pool, num_classes)

    def stem_conv(self):
        return self.conv1

    def body(self, x, repeat=None, source=None):
        x = bn_fire(self.bn1, self.sn1, x, repeat=repeat, fuse=self.fuse_bn, source=source)
        y, src = conv_source(self.conv2, x, self.recompute)
        x = bn_fire(self.bn2, self.sn2, y, fuse=self.fuse_bn, source=src)
        return self.fc(folded(self.avgpool, x).flatten(2))
