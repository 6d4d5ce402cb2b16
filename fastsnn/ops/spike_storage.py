"""Convolution and max-pooling whose input is spikes, saving that input for backward in 1 bit per value
(or 1 byte for the small integer sums of SEW "ADD" blocks) instead of 2-4 bytes.

    spike_conv2d      (fastsnn.SpikeConv2d, an nn.Conv2d) saves its input packed. The gradient w.r.t. the
                      input needs only the weight; the weight gradient unpacks the input.
    spike_max_pool2d  (fastsnn.SpikeMaxPool2d, an nn.MaxPool2d) saves its binary input as bits (nn.MaxPool2d
                      saves it at full width plus int64 indices, 8 bytes per output); the backward re-pools the
                      unpacked input to find the first maximal position of each window, exactly as
                      nn.MaxPool2d does.

Each op (SPIKE_CONV2D, SPIKE_MAX_POOL2D) is declared once (fastsnn.ops._declare): eager calls run the autograd
Function derived from it, torch.compile the derived torch.library custom ops (the convolution or pool and the
packing in one, the unpacking and aten's backward in another), so a compiled network keeps the bits and has no
graph break. The input is packed only when a gradient that needs it may be asked for (the weight's, under
grad mode): inference packs nothing.

Exactness is a contract: storage "bits" holds 0/1 only, "uint8" integers 0…255. In checked mode (the
`check` argument, or FASTSNN_CHECK_SPIKES=1 in the environment, which the test suite sets) a value that is
not representable raises ValueError, at the cost of one host sync per call. Unchecked mode is safe when the
input is the output of a fastsnn neuron (always 0/1) or of a SEW ADD connect of such spikes (integers ≤ the
number of blocks + 1); anything else stored unchecked is silently changed: bits store any nonzero value as 1,
uint8 truncates toward zero and wraps modulo 256 (2.7 → 2, 300 → 44, −1 → 255).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve_backend
from ._declare import Op
from ._layout import LazyKernels, same_layout

STORAGES = ("bits", "uint8")
CHECK_DEFAULT = os.environ.get("FASTSNN_CHECK_SPIKES", "0") == "1"


_kernels = LazyKernels("spike_pack")


def _fills_its_memory(shape, strides) -> bool:
    """True when the elements fill one block of memory in some dim order (contiguous, channels_last, a
    time-major view of either)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides, shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(x: Tensor) -> Tensor:
    """x itself when its elements fill one block of memory, else a contiguous copy."""
    return x if _fills_its_memory(x.shape, x.stride()) else x.contiguous()


def layout(x: Tensor) -> tuple[list, list, torch.dtype]:
    """(shape, strides, dtype) of the tensor `pack` reads (x, or its contiguous copy), found without copying:
    what `unpack` rebuilds. Kept on ctx instead of x."""
    if _fills_its_memory(x.shape, x.stride()):
        return list(x.shape), list(x.stride()), x.dtype
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return list(x.shape), strides, x.dtype


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
    if resolve_backend(op, "auto", x.device, x.dtype) == "triton":
        k = _kernels
        bits = torch.empty(k.packed_bytes(flat.numel()), dtype=torch.uint8, device=x.device)
        bad = torch.zeros(1, dtype=torch.int32, device=x.device) if check else None
        k.pack_bits(flat, bits, bad)
        bad = int(bad.item()) if check else 0
    else:
        bad = int(((flat != 0) & (flat != 1)).sum()) if check else 0
        bits = pack_bits_torch(flat)
    if bad:
        instead = ("use storage='uint8' for small integer sums, or a dense layer (nn.Conv2d)" if op == "SpikeConv2d"
                   else "use nn.MaxPool2d for this input" if op == "SpikeMaxPool2d"
                   else "use residual_storage='uint8' for small integer sums, or None")
        raise ValueError(f"{op}: spikes are stored as bits (0 or 1), but the input has {bad} other values; {instead}")
    return bits


def unpack(op: str, packed: Tensor, storage: str, x_layout) -> Tensor:
    """The tensor of `x_layout` (shape, strides, dtype, as layout() gives them) rebuilt from `packed`, on its
    device."""
    shape, strides, dtype = x_layout
    if packed is None or packed.numel() < packed_size(math.prod(shape), storage):  # never read past the buffer
        raise RuntimeError(f"{op}: the backward needs the input's packed values, which the forward did not keep (it "
                           f"keeps them when a gradient that needs them may be asked for, under grad mode)")
    out = torch.empty_strided(shape, strides, dtype=dtype, device=packed.device)
    flat = _flat(out)
    if storage == "uint8":
        flat.copy_(packed)
    elif resolve_backend(op, "auto", packed.device, dtype) == "triton":
        _kernels.unpack_bits(packed, flat)
    else:
        unpack_bits_torch(packed, flat)
    return out


def pack_bits_torch(flat: Tensor) -> Tensor:
    """The bits of a 1-D tensor (nonzero → 1), 8 per byte, in PyTorch ops: the CPU path (and the benchmarks'
    baseline)."""
    ones = torch.nn.functional.pad((flat != 0).to(torch.uint8), (0, (-flat.numel()) % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (ones.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits_torch(packed: Tensor, flat: Tensor) -> Tensor:
    """flat (1-D, numel values) written 0/1 from `packed`, in PyTorch ops."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return flat.copy_(((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:flat.numel()])


def packed_size(numel, storage: str):
    """Bytes `pack` returns for `numel` values (numel may be symbolic under torch.compile)."""
    return (numel + 7) // 8 if storage == "bits" else numel


# ---- the ops, declared once (fastsnn.ops._declare): eager Functions and custom ops derived ----

def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], packed: Optional[Tensor], stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, storage: str, check: bool,
                  keep: bool) -> tuple[Tensor, Tensor]:
    """(the convolution, x packed for the backward, or None). packed: x already packed as `storage` (by another
    convolution of the same x), kept instead of packing again; keep=False (no weight gradient will be asked
    for and nobody needs the bits) packs nothing."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return out, pack("SpikeConv2d", x, storage, check) if keep and packed is None else None


def _conv_fake(x, weight, bias, packed, stride, padding, dilation, groups, storage, check, keep):
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if keep and packed is None:
        return out, x.new_empty(packed_size(x.numel(), storage), dtype=torch.uint8)
    return out, None


def _conv_save(ctx, a, outputs):
    ctx.save_for_backward(a.weight, a.packed if a.packed is not None else outputs[1])
    ctx.x_layout, ctx.storage, ctx.has_bias = layout(a.x), a.storage, a.bias is not None
    ctx.conv = a[_CONV]
    if outputs[1] is not None:
        ctx.mark_non_differentiable(outputs[1])


def _conv_backward(grad_out: Tensor, packed: Optional[Tensor], weight: Tensor, x_shape: list[int],
                   x_strides: list[int], x_dtype: torch.dtype, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, storage: str,
                   mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias), None where mask says not needed, in x's and the weight's layouts: one
    aten.convolution_backward on the unpacked input (only its shape when the weight gradient is not needed)."""
    if mask[1]:
        x = unpack("SpikeConv2d", packed, storage, (x_shape, x_strides, x_dtype))
    else:  # the input gradient needs only x's shape
        x = grad_out.new_empty(1, dtype=x_dtype).expand(x_shape)
    bias_sizes = [weight.shape[0]] if mask[2] else None
    grads = torch.ops.aten.convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, False,
                                                [0, 0], groups, mask)
    grad_x, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, mask))
    if grad_x is not None and list(grad_x.stride()) != list(x_strides):
        grad_x = torch.empty_strided(x_shape, x_strides, dtype=x_dtype, device=grad_out.device).copy_(grad_x)
    return grad_x, None if grad_weight is None else same_layout(grad_weight, weight), grad_bias


def _conv_backward_fake(grad_out, packed, weight, x_shape, x_strides, x_dtype, stride, padding, dilation, groups,
                        storage, mask):
    likes = (grad_out.new_empty_strided(x_shape, x_strides, dtype=x_dtype), torch.empty_like(weight),
             weight.new_empty(weight.shape[0]))
    return tuple(like if need else None for like, need in zip(likes, mask))


def _conv_formula(ctx, backward, grad_out, _grad_packed):
    weight, packed = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[_X], n[_WEIGHT], ctx.has_bias and n[_BIAS]]
    grads = backward(grad_out, packed, weight, *ctx.x_layout, *ctx.conv, ctx.storage, mask)
    return tuple(g if need else None for g, need in zip(grads, mask))  # compiled: empty for none


SPIKE_CONV2D = Op("spike_conv2d", _conv_forward, fake=_conv_fake, save=_conv_save, backward=_conv_backward,
                  backward_fake=_conv_backward_fake, formula=_conv_formula, differentiable=("x", "weight", "bias"),
                  label="SpikeConv2d")
_CONV = SPIKE_CONV2D.args.span("stride", "groups")
_X, _WEIGHT, _BIAS = (SPIKE_CONV2D.args.index(n) for n in ("x", "weight", "bias"))


def _pool_forward(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                  ceil_mode: bool, check: bool, keep: bool) -> tuple[Tensor, Tensor]:
    """(the pool, x packed as bits for the backward, or None without keep)."""
    out = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return out, pack("SpikeMaxPool2d", x, "bits", check) if keep else None


def _pool_fake(x, kernel_size, stride, padding, dilation, ceil_mode, check, keep):
    out = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return out, x.new_empty(packed_size(x.numel(), "bits"), dtype=torch.uint8) if keep else None


def _pool_save(ctx, a, outputs):
    ctx.save_for_backward(outputs[1])
    ctx.x_layout, ctx.pool = layout(a.x), a[_POOL]
    if outputs[1] is not None:
        ctx.mark_non_differentiable(outputs[1])


def _pool_backward(grad_out: Tensor, packed: Tensor, x_shape: list[int], x_strides: list[int], x_dtype: torch.dtype,
                   kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                   ceil_mode: bool) -> Tensor:
    """dL/dx in x's layout: the unpacked input re-pooled for the first maximal position of each window
    (nn.MaxPool2d's)."""
    x = unpack("SpikeMaxPool2d", packed, "bits", (x_shape, x_strides, x_dtype))
    pool = (kernel_size, stride, padding, dilation, ceil_mode)
    _, indices = F.max_pool2d(x, *pool, return_indices=True)
    return same_layout(torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *pool, indices), x)


def _pool_backward_fake(grad_out, packed, x_shape, x_strides, x_dtype, kernel_size, stride, padding, dilation,
                        ceil_mode):
    return grad_out.new_empty_strided(x_shape, x_strides, dtype=x_dtype)


def _pool_formula(ctx, backward, grad_out, _grad_packed):
    (packed,) = ctx.saved_tensors
    return (backward(grad_out, packed, *ctx.x_layout, *ctx.pool),)


SPIKE_MAX_POOL2D = Op("spike_max_pool2d", _pool_forward, fake=_pool_fake, save=_pool_save, backward=_pool_backward,
                      backward_fake=_pool_backward_fake, formula=_pool_formula, differentiable=("x",),
                      label="SpikeMaxPool2d")
_POOL = SPIKE_MAX_POOL2D.args.span("kernel_size", "ceil_mode")


def _needs_bits(weight: Tensor) -> bool:
    """Whether a backward may ask for the weight gradient (then the input is packed)."""
    return weight.requires_grad and torch.is_grad_enabled()


def spike_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, storage: str, check: bool) -> Tensor:
    """F.conv2d(x, weight, bias, *conv) whose input is saved for the weight gradient as `storage` (see the
    module docstring); conv = (stride, padding, dilation, groups) as lists. Eager: the derived autograd
    Function; under torch.compile: the custom ops."""
    return SPIKE_CONV2D(x, weight, bias, None, *conv, storage, check, _needs_bits(weight))[0]


def spike_conv2d_packed(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, storage: str,
                        check: bool, packed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """spike_conv2d and the packed input it keeps for its backward (the same tensor, not a copy): what a
    recompute of the output needs (fastsnn.ops.recompute). packed: x already packed as `storage` (by another
    convolution of the same x), kept instead of packing x again."""
    if packed is not None:
        return SPIKE_CONV2D(x, weight, bias, packed, *conv, storage, False, False)[0], packed
    out, packed = SPIKE_CONV2D(x, weight, bias, None, *conv, storage, check, True)
    return out, packed


def spike_max_pool2d(x: Tensor, pool: tuple, check: bool) -> Tensor:
    """F.max_pool2d(x, *pool) of spikes, saving the input as bits and no indices; pool = (kernel_size, stride,
    padding, dilation, ceil_mode) with lists."""
    keep = x.requires_grad and torch.is_grad_enabled()
    return SPIKE_MAX_POOL2D(x, *pool, check, keep)[0]


def check_storage(op: str, storage: str) -> str:
    if storage not in STORAGES:
        raise ValueError(f"{op}: storage must be one of {STORAGES}, got {storage!r}")
    return storage
