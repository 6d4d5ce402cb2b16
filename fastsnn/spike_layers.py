"""nn.Conv2d and nn.MaxPool2d for spike inputs, saving their input for backward as bits (see
fastsnn.ops.spike_storage for the storage contract and the autograd paths)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops import recompute, spike_storage


def _autocast(x: Tensor, *tensors: Tensor | None):
    """Under autocast, x and the parameters in the autocast dtype (the casts are recorded by autograd, so the
    fp32 parameters get their gradients), as nn.Conv2d would have them; else unchanged."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


class SpikeConv2d(nn.Conv2d):
    """nn.Conv2d whose input is spikes (storage="bits": 0/1) or small integer spike sums (storage="uint8":
    0…255, e.g. SEW ADD block outputs): the input is saved for the weight gradient in 1 bit (1 byte) per value
    instead of 2-4 bytes; results and gradients equal nn.Conv2d's. Same constructor arguments plus `storage`
    and `check` (None: the FASTSNN_CHECK_SPIKES default; True raises on an input that does not fit)."""

    def __init__(self, *args, storage: str = "bits", check: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"SpikeConv2d: only padding_mode='zeros' is supported, got {self.padding_mode!r}")
        if isinstance(self.padding, str):
            raise ValueError(f"SpikeConv2d: padding must be numbers, got {self.padding!r}")
        self.storage = spike_storage.check_storage("SpikeConv2d", storage)
        self.check = check

    def forward(self, x: Tensor, source_into: list | None = None,
                same_input: recompute.ConvSource | None = None) -> Tensor:
        """nn.Conv2d's forward. source_into: a list that receives the ConvSource to recompute the output from
        (the packed input this layer keeps anyway, its weight and arguments; None where nothing is kept, without
        gradients), for the fused BatchNorm + neuron op that consumes the output (fastsnn.bn_lif's source=),
        which then saves the source instead of the output; x batched [N, C, H, W]. same_input: the source of
        another convolution of this same x (a block's first convolution, for its downsample shortcut), whose
        packed x is kept instead of a second packing when the storage and layout agree."""
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            if source_into is not None:
                source_into.append(None)
            return super().forward(x)
        check = spike_storage.CHECK_DEFAULT if self.check is None else self.check
        if source_into is None:
            unbatched = x.dim() == 3  # [C, H, W], as nn.Conv2d takes it
            x, weight, bias = _autocast(x.unsqueeze(0) if unbatched else x, self.weight, self.bias)
            with torch.autocast(x.device.type, enabled=False):
                out = spike_storage.spike_conv2d(x, weight, bias, self._conv_args(), self.storage, check)
            return out.squeeze(0) if unbatched else out
        x, weight, bias = _autocast(x, self.weight, self.bias)
        conv, x_layout = self._conv_args(), spike_storage.layout(x)
        packed = None
        if same_input is not None and same_input.storage == self.storage and same_input.x_layout == x_layout:
            packed = same_input.kept
        with torch.autocast(x.device.type, enabled=False):
            out, packed = spike_storage.spike_conv2d_packed(x, weight, bias, conv, self.storage, check, packed)
        source_into.append(recompute.source(packed, weight, bias, conv, x_layout, self.storage, out))
        return out

    def _conv_args(self) -> tuple:
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def extra_repr(self) -> str:
        return super().extra_repr() + f", storage={self.storage}"


class SpikeMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d over spikes (0/1), saving its input as bits and no indices; identical results and
    gradients (the gradient goes to the first maximal position of each window, as nn.MaxPool2d's)."""

    def __init__(self, *args, check: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError("SpikeMaxPool2d: return_indices=True is not supported (it keeps no indices)")
        self.check = check

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        check = spike_storage.CHECK_DEFAULT if self.check is None else self.check
        stride = self.kernel_size if self.stride is None else self.stride
        pool = (_pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation), self.ceil_mode)
        return spike_storage.spike_max_pool2d(x, pool, check)


__all__ = ["SpikeConv2d", "SpikeMaxPool2d"]
