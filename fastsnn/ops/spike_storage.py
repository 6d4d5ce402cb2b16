"""Convolution and max-pooling whose input is spikes, saving that input for backward in 1 bit per value
(or 1 byte for the small integer sums of SEW "ADD" blocks) instead of 2-4 bytes.

    SpikeConv2d(nn.Conv2d)       same parameters and state_dict keys; saves its input packed. The gradient
                                 w.r.t. the input needs only the weight; the weight gradient unpacks the input.
    SpikeMaxPool2d(nn.MaxPool2d) saves its binary input as bits (nn.MaxPool2d saves it at full width plus
                                 int64 indices, 8 bytes per output); the backward re-pools the unpacked input to
                                 find the first maximal position of each window, exactly as nn.MaxPool2d does.

Exactness is a contract: storage "bits" holds 0/1 only, "uint8" integers 0…255. In checked mode (the
`check` argument, or FASTSNN_CHECK_SPIKES=1 in the environment, which the test suite sets) a value that is
not representable raises ValueError, at the cost of one host sync per call. Unchecked mode is safe when the
input is the output of a fastsnn neuron (always 0/1) or of a SEW ADD connect of such spikes (integers ≤ the
number of blocks + 1); anything else stored unchecked is silently rounded (bits: any nonzero value → 1).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backend import resolve_backend
from ._layout import kernels_loader

STORAGES = ("bits", "uint8")
CHECK_DEFAULT = os.environ.get("FASTSNN_CHECK_SPIKES", "0") == "1"


_kernels = kernels_loader("spike_pack")


def _dense(x: Tensor) -> Tensor:
    """x itself when its elements fill one block of memory in some dim order (contiguous, channels_last, a
    time-major view of either), else a contiguous copy."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return x.contiguous()
        expected *= size
    return x


def _flat(x: Tensor) -> Tensor:
    """The elements of a dense tensor in memory order, as a 1-D view."""
    return x.as_strided((x.numel(),), (1,))


def pack(op: str, x: Tensor, storage: str, check: bool) -> Tensor:
    """x's values in `storage`: uint8 [⌈numel/8⌉] bits, or uint8 [numel] integers, in x's memory order."""
    flat = _flat(_dense(x))
    if storage == "uint8":
        if check:
            bad = int(((flat < 0) | (flat > 255) | (flat != flat.round())).sum())
            if bad:
                raise ValueError(f"{op}: storage='uint8' holds integers 0..255, but the input has {bad} other "
                                 f"values; use a dense convolution (nn.Conv2d) for this input")
        return flat.to(torch.uint8)
    if resolve_backend(op, "auto", x.device) == "triton":
        k = _kernels()
        bits = torch.empty(k.packed_bytes(flat.numel()), dtype=torch.uint8, device=x.device)
        bad = torch.zeros(1, dtype=torch.int32, device=x.device) if check else None
        k.pack_bits(flat, bits, bad)
        bad = int(bad.item()) if check else 0
    else:
        bad = int(((flat != 0) & (flat != 1)).sum()) if check else 0
        ones = torch.nn.functional.pad((flat != 0).to(torch.uint8), (0, (-flat.numel()) % 8))
        shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
        bits = (ones.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)
    if bad:
        raise ValueError(f"{op}: storage='bits' holds spikes (0 or 1), but the input has {bad} other values; "
                         f"use storage='uint8' for small integer sums, or a dense layer")
    return bits


def unpack(op: str, packed: Tensor, storage: str, like: Tensor) -> Tensor:
    """The tensor `like` described (shape, strides, dtype, device; its data is not read) rebuilt from `packed`."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=packed.device)
    flat = _flat(out)
    if storage == "uint8":
        flat.copy_(packed)
    elif resolve_backend(op, "auto", packed.device) == "triton":
        _kernels().unpack_bits(packed, flat)
    else:
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        flat.copy_(((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:flat.numel()])
    return out


def meta(x: Tensor) -> Tensor:
    """A storage-free stand-in for x's shape, strides and dtype (kept on ctx instead of x)."""
    x = _dense(x)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


class _SpikeConv2dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, storage, check):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        packed = pack("SpikeConv2d", x, storage, check) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(weight, packed)
        ctx.x_meta, ctx.storage = meta(x), storage
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, packed = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        meta = ctx.x_meta
        if packed is not None:
            x = unpack("SpikeConv2d", packed, ctx.storage, meta)
        else:  # only the shape is needed for the input gradient
            x = grad_out.new_empty(1, dtype=meta.dtype).expand(meta.shape)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, weight, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _autocast(x: Tensor, *tensors: Tensor | None):
    """Under autocast, x and the parameters in the autocast dtype (the casts are recorded by autograd, so the
    fp32 parameters get their gradients), as nn.Conv2d would have them; else unchanged."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def _check_storage(op: str, storage: str) -> str:
    if storage not in STORAGES:
        raise ValueError(f"{op}: storage must be one of {STORAGES}, got {storage!r}")
    return storage


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
        self.storage = _check_storage("SpikeConv2d", storage)
        self.check = check

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        check = CHECK_DEFAULT if self.check is None else self.check
        unbatched = x.dim() == 3  # [C, H, W], as nn.Conv2d takes it
        x, weight, bias = _autocast(x.unsqueeze(0) if unbatched else x, self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False):
            out = _SpikeConv2dFunction.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                             self.storage, check)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", storage={self.storage}"


class _SpikeMaxPool2dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, check):
        out = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(pack("SpikeMaxPool2d", x, "bits", check))
        ctx.x_meta = meta(x)
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        x = unpack("SpikeMaxPool2d", packed, "bits", ctx.x_meta)
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool
        _, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation,
                                                                 ceil_mode, indices)
        return grad_x, None, None, None, None, None, None


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


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
        check = CHECK_DEFAULT if self.check is None else self.check
        stride = self.kernel_size if self.stride is None else self.stride
        return _SpikeMaxPool2dFunction.apply(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                             _pair(self.dilation), self.ceil_mode, check)
