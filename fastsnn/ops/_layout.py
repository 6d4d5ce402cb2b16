"""Memory-layout helpers shared by the ops: kernels walk storage order, so every tensor of a call must
share one dense layout. They sit on every call's host path, so the layout decisions are memoised."""
import functools
import math

import torch

from ..backend import tracing


def _dense_time_major_of(shape: tuple, strides: tuple, allow_broadcast: bool) -> bool:
    n = math.prod(shape[1:])
    if shape[0] > 1 and strides[0] != n and not (allow_broadcast and strides[0] == 0):
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides[1:], shape[1:]) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_dense_time_major = functools.lru_cache(maxsize=1024)(_dense_time_major_of)


def is_dense_time_major(x: torch.Tensor, allow_broadcast: bool = False) -> bool:
    """True when x[T, ...] is time-outermost with each timestep one dense block, in any dim order (with
    allow_broadcast, also when every timestep is the same block: time stride 0)."""
    return (_dense_time_major_of if tracing() else _dense_time_major)(tuple(x.shape), x.stride(), allow_broadcast)


def time_major_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised [T, ...] tensor, time stride N, each timestep laid out like x[0]."""
    if x.is_contiguous():  # the common case, and the cheapest call
        return torch.empty_like(x) if dtype is None else torch.empty_like(x, dtype=dtype)
    strides = x.stride()
    return torch.empty_strided(x.shape, (math.prod(x.shape[1:]), *strides[1:]), dtype=dtype or x.dtype,
                               device=x.device)


def as_time_major_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t ([T, ...], x's shape) itself when it already has time_major_like(x)'s strides, else a copy with them."""
    if t.is_contiguous() and x.is_contiguous():  # the common case, and the cheapest test
        return t
    strides = x.stride()
    if t.stride() == (math.prod(x.shape[1:]), *strides[1:]):
        return t
    return time_major_like(x, dtype=t.dtype).copy_(t)


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t, copied if needed so that its strides are those of `like` (same shape)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


class LazyKernels:
    """fastsnn.kernels.<name>, imported on the first attribute read (importing fastsnn does not import Triton).
    From then on this object's namespace is the module's own (its __dict__ is the module's __dict__): a read such
    as `_kernels.lif_forward` is one dictionary lookup on every call, no function call, and a change made to the
    module (a test's monkeypatch) is seen."""

    def __init__(self, name: str):
        self._fastsnn_kernels = name

    def __getattr__(self, attr):  # only for a name the namespace lacks: before the import, or a missing one
        name = self.__dict__.get("_fastsnn_kernels")
        if name is None:
            raise AttributeError(f"fastsnn.kernels has no attribute {attr!r}")
        import importlib

        module = importlib.import_module(f"fastsnn.kernels.{name}")
        self.__dict__ = module.__dict__
        return getattr(module, attr)
