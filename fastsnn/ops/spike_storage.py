"""Convolution and max-pooling whose input is spikes, saving that input for backward in 1 bit per value
(or 1 byte for the small integer sums of SEW "ADD" blocks) instead of 2-4 bytes.

    spike_conv2d      (fastsnn.SpikeConv2d, an nn.Conv2d) saves its input packed. The gradient w.r.t. the
                      input needs only the weight; the weight gradient unpacks the input.
    spike_max_pool2d  (fastsnn.SpikeMaxPool2d, an nn.MaxPool2d) saves its binary input as bits (nn.MaxPool2d
                      saves it at full width plus int64 indices, 8 bytes per output); the backward re-pools the
                      unpacked input to find the first maximal position of each window, exactly as
                      nn.MaxPool2d does.

Eager calls run torch.autograd.Functions; under torch.compile the same work runs as torch.library custom ops
(the convolution or pool and the packing in one, the unpacking and aten's backward in another), so a compiled
network keeps the bits and has no graph break.

Exactness is a contract: storage "bits" holds 0/1 only, "uint8" integers 0…255. In checked mode (the
`check` argument, or FASTSNN_CHECK_SPIKES=1 in the environment, which the test suite sets) a value that is
not representable raises ValueError, at the cost of one host sync per call. Unchecked mode is safe when the
input is the output of a fastsnn neuron (always 0/1) or of a SEW ADD connect of such spikes (integers ≤ the
number of blocks + 1); anything else stored unchecked is silently changed: bits store any nonzero value as 1,
uint8 truncates toward zero and wraps modulo 256 (2.7 → 2, 300 → 44, −1 → 255).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve_backend
from ._autograd import refused
from ._declare import Args
from ._layout import kernels_loader, same_layout

STORAGES = ("bits", "uint8")
CHECK_DEFAULT = os.environ.get("FASTSNN_CHECK_SPIKES", "0") == "1"


_kernels = kernels_loader("spike_pack")


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
        k = _kernels()
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
    out = torch.empty_strided(shape, strides, dtype=dtype, device=packed.device)
    flat = _flat(out)
    if storage == "uint8":
        flat.copy_(packed)
    elif resolve_backend(op, "auto", packed.device, dtype) == "triton":
        _kernels().unpack_bits(packed, flat)
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


@torch.library.custom_op("fastsnn::unpack_spikes", mutates_args=())
def unpack_op(packed: Tensor, shape: list[int], strides: list[int], dtype: torch.dtype, storage: str) -> Tensor:
    """unpack as a custom op (for backward graphs under torch.compile); the layout as layout() gives it."""
    return unpack("unpack_spikes", packed, storage, (shape, strides, dtype))


@unpack_op.register_fake
def _(packed, shape, strides, dtype, storage):
    return packed.new_empty_strided(shape, strides, dtype=dtype)


def packed_size(numel, storage: str):
    """Bytes `pack` returns for `numel` values (numel may be symbolic under torch.compile)."""
    return (numel + 7) // 8 if storage == "bits" else numel


class _SpikeConv2dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, conv, storage, check, with_packed=False, packed=None):
        out = F.conv2d(x, weight, bias, *conv)
        if packed is None and (ctx.needs_input_grad[1] or with_packed):
            packed = pack("SpikeConv2d", x, storage, check)
        ctx.save_for_backward(weight, packed)
        ctx.x_layout, ctx.storage, ctx.conv, ctx.has_bias = layout(x), storage, conv, bias is not None
        if with_packed:  # the packed input, for a recompute of out (fastsnn.ops.recompute)
            ctx.mark_non_differentiable(packed)
            return out, packed
        return out

    @staticmethod
    def backward(ctx, grad_out, _packed=None):
        weight, packed = ctx.saved_tensors
        grads = _conv_grads(ctx, _CONV_FUNCTION_ARGS, lambda mask: _conv_backward(
            grad_out, packed, weight, ctx.x_layout, ctx.conv, ctx.storage, mask))
        return refused("SpikeConv2d", grads) if torch.is_grad_enabled() else grads


_CONV_FUNCTION_ARGS = Args(_SpikeConv2dFunction.forward)


def _conv_grads(ctx, args: Args, backward) -> tuple:
    """The gradients of x, weight and bias (a convolution's Function or custom op, `args` its inputs), each
    where asked for: backward(mask) gives the three, None where the mask says not needed."""
    n = ctx.needs_input_grad
    mask = [n[args.index("x")], n[args.index("weight")], ctx.has_bias and n[args.index("bias")]]
    grad_x, grad_weight, grad_bias = (g if need else None for g, need in zip(backward(mask), mask))
    return args.grads(x=grad_x, weight=grad_weight, bias=grad_bias)


def _conv_backward(grad_out, packed, weight, x_layout, conv, storage, mask):
    """(grad_x, grad_weight, grad_bias), None where mask says not needed: one aten.convolution_backward on the
    unpacked input (only its shape when the weight gradient is not needed)."""
    stride, padding, dilation, groups = conv
    if packed is not None and mask[1]:
        x = unpack("SpikeConv2d", packed, storage, x_layout)
    else:  # the input gradient needs only x's shape
        x = grad_out.new_empty(1, dtype=x_layout[2]).expand(x_layout[0])
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, False,
                                               [0, 0], groups, mask)


# ---- the same as custom ops, for torch.compile (a traced autograd.Function could not keep the bits) ----

def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fastsnn::spike_conv2d", mutates_args=())
def _spike_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, storage: str, check: bool) -> tuple[Tensor, Tensor]:
    """(the convolution, x packed for the backward)."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups), pack("SpikeConv2d", x, storage, check)


@_spike_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, storage, check):
    return (F.conv2d(x, weight, bias, stride, padding, dilation, groups),
            x.new_empty(packed_size(x.numel(), storage), dtype=torch.uint8))


@torch.library.custom_op("fastsnn::spike_conv2d_backward", mutates_args=())
def _spike_conv2d_backward_op(grad_out: Tensor, packed: Tensor, weight: Tensor, x_shape: list[int],
                              x_strides: list[int], x_dtype: torch.dtype, stride: list[int], padding: list[int],
                              dilation: list[int], groups: int, storage: str, mask: list[bool]) -> list[Tensor]:
    grads = _conv_backward(grad_out, packed, weight, (x_shape, x_strides, x_dtype),
                           (stride, padding, dilation, groups), storage, mask)
    # in the layouts the fake kernel declares
    likes = (torch.empty_strided(x_shape, x_strides, dtype=x_dtype, device=grad_out.device), weight,
             weight.new_empty(weight.shape[0]))
    return [_absent(grad_out) if g is None else same_layout(g, like) for g, like in zip(grads, likes)]


@_spike_conv2d_backward_op.register_fake
def _(grad_out, packed, weight, x_shape, x_strides, x_dtype, stride, padding, dilation, groups, storage, mask):
    likes = (grad_out.new_empty_strided(x_shape, x_strides, dtype=x_dtype), torch.empty_like(weight),
             weight.new_empty(weight.shape[0]))
    return [like if need else _absent(grad_out) for like, need in zip(likes, mask)]


_CONV_OP_ARGS = Args(_spike_conv2d_op._init_fn)
_CONV_FIELDS = ("stride", "padding", "dilation", "groups")


def _conv_setup_context(ctx, inputs, output, args=_CONV_OP_ARGS, packed=None):
    a = args.bind(inputs)
    ctx.save_for_backward(a.weight, output[1] if packed is None else a[packed])
    ctx.x_layout, ctx.storage, ctx.has_bias = layout(a.x), a.storage, a.bias is not None
    ctx.conv = args.values(a, _CONV_FIELDS)
    if packed is None:
        ctx.mark_non_differentiable(output[1])


def _conv_backward_compiled(ctx, grad_out, _packed_grad=None, args=_CONV_OP_ARGS):
    weight, packed = ctx.saved_tensors
    return _conv_grads(ctx, args, lambda mask: _spike_conv2d_backward_op(
        grad_out, packed, weight, *ctx.x_layout, *ctx.conv, ctx.storage, mask))


torch.library.register_autograd("fastsnn::spike_conv2d", _conv_backward_compiled, setup_context=_conv_setup_context)


@torch.library.custom_op("fastsnn::spike_conv2d_prepacked", mutates_args=())
def _spike_conv2d_prepacked_op(x: Tensor, packed: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                               padding: list[int], dilation: list[int], groups: int, storage: str) -> Tensor:
    """The convolution of x, whose `packed` form (another convolution's of the same x) its backward keeps."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@_spike_conv2d_prepacked_op.register_fake
def _(x, packed, weight, bias, stride, padding, dilation, groups, storage):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


_PREPACKED_ARGS = Args(_spike_conv2d_prepacked_op._init_fn)
torch.library.register_autograd(
    "fastsnn::spike_conv2d_prepacked", functools.partial(_conv_backward_compiled, args=_PREPACKED_ARGS),
    setup_context=functools.partial(_conv_setup_context, args=_PREPACKED_ARGS, packed="packed"))


class _SpikeMaxPool2dFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, pool, check):
        out = F.max_pool2d(x, *pool)
        ctx.save_for_backward(pack("SpikeMaxPool2d", x, "bits", check))
        ctx.x_layout, ctx.pool = layout(x), pool
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        grads = _POOL_FUNCTION_GRADS(_pool_backward(grad_out, packed, ctx.x_layout, ctx.pool))
        return refused("SpikeMaxPool2d", grads) if torch.is_grad_enabled() else grads


_POOL_FUNCTION_GRADS = Args(_SpikeMaxPool2dFunction.forward).returning("x")


def _pool_backward(grad_out, packed, x_layout, pool):
    """dL/dx: the unpacked input re-pooled for the first maximal position of each window (nn.MaxPool2d's)."""
    x = unpack("SpikeMaxPool2d", packed, "bits", x_layout)
    _, indices = F.max_pool2d(x, *pool, return_indices=True)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *pool, indices)


@torch.library.custom_op("fastsnn::spike_max_pool2d", mutates_args=())
def _spike_max_pool2d_op(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                         dilation: list[int], ceil_mode: bool, check: bool) -> tuple[Tensor, Tensor]:
    """(the pool, x packed as bits for the backward)."""
    return (F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode),
            pack("SpikeMaxPool2d", x, "bits", check))


@_spike_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode, check):
    return (F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode),
            x.new_empty(packed_size(x.numel(), "bits"), dtype=torch.uint8))


@torch.library.custom_op("fastsnn::spike_max_pool2d_backward", mutates_args=())
def _spike_max_pool2d_backward_op(grad_out: Tensor, packed: Tensor, x_shape: list[int], x_strides: list[int],
                                  x_dtype: torch.dtype, kernel_size: list[int], stride: list[int],
                                  padding: list[int], dilation: list[int], ceil_mode: bool) -> Tensor:
    grad_x = _pool_backward(grad_out, packed, (x_shape, x_strides, x_dtype),
                            (kernel_size, stride, padding, dilation, ceil_mode))
    return same_layout(grad_x, torch.empty_strided(x_shape, x_strides, dtype=x_dtype, device=grad_out.device))


@_spike_max_pool2d_backward_op.register_fake
def _(grad_out, packed, x_shape, x_strides, x_dtype, kernel_size, stride, padding, dilation, ceil_mode):
    return grad_out.new_empty_strided(x_shape, x_strides, dtype=x_dtype)


_POOL_OP_ARGS = Args(_spike_max_pool2d_op._init_fn)


def _pool_setup_context(ctx, inputs, output):
    a = _POOL_OP_ARGS.bind(inputs)
    ctx.save_for_backward(output[1])
    ctx.x_layout, ctx.pool = layout(a.x), _POOL_OP_ARGS.values(a, ("kernel_size", "stride", "padding", "dilation",
                                                                   "ceil_mode"))
    ctx.mark_non_differentiable(output[1])


def _pool_backward_compiled(ctx, grad_out, _packed_grad):
    (packed,) = ctx.saved_tensors
    return _POOL_OP_ARGS.grads(x=_spike_max_pool2d_backward_op(grad_out, packed, *ctx.x_layout, *ctx.pool))


torch.library.register_autograd("fastsnn::spike_max_pool2d", _pool_backward_compiled,
                                setup_context=_pool_setup_context)


def spike_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, storage: str, check: bool) -> Tensor:
    """F.conv2d(x, weight, bias, *conv) whose input is saved for the weight gradient as `storage` (see the
    module docstring); conv = (stride, padding, dilation, groups) as lists. Eager: the autograd Function; under
    torch.compile: the custom ops."""
    if torch.compiler.is_compiling():
        return _spike_conv2d_op(x, weight, bias, *conv, storage, check)[0]
    return _SpikeConv2dFunction.apply(x, weight, bias, conv, storage, check)


def spike_conv2d_packed(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, storage: str,
                        check: bool, packed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """spike_conv2d and the packed input it keeps for its backward (the same tensor, not a copy): what a
    recompute of the output needs (fastsnn.ops.recompute). packed: x already packed as `storage` (by another
    convolution of the same x), kept instead of packing x again."""
    if packed is not None:
        if torch.compiler.is_compiling():
            return _spike_conv2d_prepacked_op(x, packed, weight, bias, *conv, storage), packed
        return _SpikeConv2dFunction.apply(x, weight, bias, conv, storage, False, False, packed), packed
    if torch.compiler.is_compiling():
        return _spike_conv2d_op(x, weight, bias, *conv, storage, check)
    return _SpikeConv2dFunction.apply(x, weight, bias, conv, storage, check, True)


def spike_max_pool2d(x: Tensor, pool: tuple, check: bool) -> Tensor:
    """F.max_pool2d(x, *pool) of spikes, saving the input as bits and no indices; pool = (kernel_size, stride,
    padding, dilation, ceil_mode) with lists."""
    if torch.compiler.is_compiling():
        return _spike_max_pool2d_op(x, *pool, check)[0]
    return _SpikeMaxPool2dFunction.apply(x, pool, check)


def check_storage(op: str, storage: str) -> str:
    if storage not in STORAGES:
        raise ValueError(f"{op}: storage must be one of {STORAGES}, got {storage!r}")
    return storage
