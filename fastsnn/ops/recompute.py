"""Recompute instead of store: a convolution's output rebuilt in the backward from what is already kept.

A student's conv → BN → [+ shortcut] → neuron unit keeps the convolution's input for the weight gradient
anyway, as bits (fastsnn.SpikeConv2d) or, for the stem, the image itself. Given a ConvSource for its input x
(and for a downsample shortcut's residual), the fused BatchNorm + neuron op (fastsnn.bn_lif) saves the source
instead of x and, in its backward, runs the same convolution again on the same values in the same layout:
one extra convolution forward per unit, no plan search, and the gradients of recompute=False.

Exactness: on the CPU a convolution of the same values, strides and dtype is computed the same way twice, so
the recomputed output is bit-identical and so is every gradient. On CUDA it is bit-identical when cuDNN runs
deterministically (torch.backends.cudnn.deterministic = True, benchmark off); otherwise cuDNN may choose
another algorithm (or an atomics-based one) for the recompute, whose output can differ from the forward's in
the last bits, so BatchNorm's backward and the surrogate gradients see an input a rounding away from the
forward's (the forward's spikes, statistics and running statistics are never affected).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import spike_storage

# storage of a source's kept input: packed spikes (spike_storage's) or the tensor itself ("dense": an image)
SOURCE_STORAGES = spike_storage.STORAGES + ("dense",)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ConvSource(NamedTuple):
    """How to rebuild out = F.conv2d(x, weight, bias, *conv) from what the network keeps anyway.

    kept: x packed (storage "bits"/"uint8", as fastsnn.SpikeConv2d keeps it: the same tensor, counted once) or x
    itself ("dense"); x_layout: x's (shape, strides, dtype) as spike_storage.layout gives them; dtype: the
    convolution's compute dtype (autocast's, when it ran under autocast); out: (shape, strides[, address]) of
    the output (the address, eager only, tells the fused op that it was given that output)."""
    kept: Tensor
    weight: Tensor
    bias: Tensor | None
    conv: tuple  # (stride, padding, dilation, groups), lists
    x_layout: tuple
    storage: str
    dtype: torch.dtype
    out: tuple

    def tensors(self) -> tuple:
        return self.kept, self.weight, self.bias

    def meta(self) -> tuple:
        """Everything but the tensors, for a ctx."""
        return self.conv, self.x_layout, self.storage, self.dtype, self.out


def source(kept: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, x_layout: tuple, storage: str,
           out: Tensor) -> ConvSource:
    return ConvSource(kept, weight, bias, tuple(conv), x_layout, storage, out.dtype,
                      (tuple(out.shape), tuple(out.stride()), out.data_ptr()))


def dense_source(x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, out: Tensor) -> ConvSource:
    """The source of a convolution of a real-valued input (the stem's image): x kept as it is."""
    return source(x, weight, bias, conv, spike_storage.layout(x), "dense", out)


def rebuild(op: str, tensors: tuple, meta: tuple, shape, strides) -> Tensor:
    """The convolution's output, recomputed, viewed as the op saw it (shape, strides): the same values as the
    forward's (see the module docstring for CUDA). Runs inside the fused op's backward (its custom op when
    compiled, so the joint graph cannot merge it with the forward's convolution and save the output after all)."""
    kept, weight, bias = tensors
    conv, x_layout, storage, dtype, _ = meta
    x = kept if storage == "dense" else spike_storage.unpack(op, kept, storage, x_layout)
    x, weight = x.to(dtype), weight.to(dtype)
    out = F.conv2d(x, weight, None if bias is None else bias.to(dtype), *conv).view(shape)
    if tuple(out.stride()) != tuple(strides):  # not expected (matches() checked the view); kept exact regardless
        out = torch.empty_strided(shape, strides, dtype=out.dtype, device=out.device).copy_(out)
    return out


def keep(sources, x: Tensor, residual: Tensor | None) -> tuple:
    """(the recompute plan, x or None, residual or None, six tensors or Nones): x (the residual) is not saved when
    its ConvSource matches it, its source's (kept, weight, bias) are; the plan says how to rebuild each (None: it
    was saved)."""
    plan, kept, tensors = [], [], []
    for src, t in zip(sources, (x, residual)):
        if matches(src, t):
            plan.append((src.meta(), tuple(t.shape), tuple(t.stride())))
            tensors += src.tensors()
            kept.append(None)
        else:
            plan.append(None)
            tensors += (None, None, None)
            kept.append(t)
    return (None if plan == [None, None] else plan), kept[0], kept[1], tuple(tensors)


def restore(plan, x: Tensor | None, residual: Tensor | None, tensors: tuple) -> tuple:
    """(x, residual) for the backward: as saved, or rebuilt from their sources' tensors (see keep)."""
    restored = []
    for k, (step, t) in enumerate(zip(plan, (x, residual))):
        if step is not None:
            t = rebuild("bn_lif", tensors[3 * k:3 * k + 3], *step)
        restored.append(t)
    return tuple(restored)


def encode_plan(plan) -> list[int]:
    """A keep() plan as ints, for a custom op's schema (decode_plan is the inverse)."""
    ints = []
    for step in plan:
        if step is None:
            ints.append(0)
            continue
        meta, shape, strides = step
        m = encode_meta(meta)
        ints += [len(m), *m, len(shape), *shape, *strides]
    return ints


def decode_plan(ints: list[int]) -> list:
    plan, k = [], 0
    for _ in range(2):
        n = ints[k]
        k += 1
        if n == 0:
            plan.append(None)
            continue
        meta = decode(ints[k:k + n])
        k += n
        d = ints[k]
        plan.append((meta, tuple(ints[k + 1:k + 1 + d]), tuple(ints[k + 1 + d:k + 1 + 2 * d])))
        k += 1 + 2 * d
    return plan


def matches(src: ConvSource | None, t: Tensor | None) -> bool:
    """True when t is the source's output as the fused op will save it (the same elements, viewed [T, B, ...]
    or as it is): only then does the op save the source in t's place."""
    if src is None or t is None:
        return False
    shape, strides = src.out[:2]
    if t.dtype != src.dtype or t.numel() != _numel(shape):
        return False
    if len(src.out) > 2 and not torch.compiler.is_compiling() and t.data_ptr() != src.out[2]:
        return False  # not the convolution's output (eager: its memory is known)
    try:
        return t.stride() == torch.empty_strided(shape, strides, device="meta").view(t.shape).stride()
    except RuntimeError:
        return False


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_source(op: str, name: str, src) -> None:
    if src is not None and not isinstance(src, ConvSource):
        raise TypeError(f"{op}: {name} must be None or a fastsnn.ops.recompute.ConvSource (from "
                        f"fastsnn.SpikeConv2d(x, source_into=[...])), got {type(src).__name__}")


# ---- a source through a custom op's schema (torch.compile): tensors as inputs, the rest as ints ----

def encode(src: ConvSource) -> list[int]:
    return encode_meta(src.meta())


def encode_meta(meta: tuple) -> list[int]:
    """A ConvSource's meta() as ints (decode is the inverse)."""
    (stride, padding, dilation, groups), (shape, strides, x_dtype), storage, dtype, out = meta
    out_shape, out_strides = out[:2]
    return [*stride, *padding, *dilation, groups, SOURCE_STORAGES.index(storage), _DTYPES.index(dtype),
            _DTYPES.index(x_dtype) if x_dtype in _DTYPES else -1, len(shape), *shape, *strides, len(out_shape),
            *out_shape, *out_strides]


def decode(ints: list[int]) -> tuple:
    """encode's inverse: a ConvSource's meta()."""
    conv = (list(ints[0:2]), list(ints[2:4]), list(ints[4:6]), ints[6])
    storage, dtype = SOURCE_STORAGES[ints[7]], _DTYPES[ints[8]]
    x_dtype = torch.uint8 if ints[9] < 0 else _DTYPES[ints[9]]
    n = ints[10]
    shape, strides = list(ints[11:11 + n]), list(ints[11 + n:11 + 2 * n])
    k = 11 + 2 * n
    m = ints[k]
    out = (tuple(ints[k + 1:k + 1 + m]), tuple(ints[k + 1 + m:k + 1 + 2 * m]))  # (compiled: no address)
    return conv, (shape, strides, x_dtype), storage, dtype, out


def encoded_pair(sources) -> tuple:
    """((x_kept, x_conv_weight, x_conv_bias, residual_kept, residual_conv_weight, residual_conv_bias), ints or
    None): (x's source, the residual's source), either None, as the fused op takes them."""
    if sources is None or sources == (None, None):
        return (None, None, None) * 2, None  # (kept, weight, bias) twice, the ints
    tensors, ints = [], []
    for src in sources:
        tensors += src.tensors() if src is not None else (None, None, None)
        ints.append(encode(src) if src is not None else [])
    return tuple(tensors), [len(ints[0]), *ints[0], *ints[1]]


def decoded_pair(ints: list[int], x_tensors: tuple, residual_tensors: tuple) -> tuple:
    """encoded_pair's inverse: (x's ConvSource or None, the residual's)."""
    n = ints[0]
    parts = (ints[1:1 + n], ints[1 + n:])
    return tuple(None if not part else ConvSource(*tensors, *decode(part))
                 for part, tensors in zip(parts, (x_tensors, residual_tensors)))
