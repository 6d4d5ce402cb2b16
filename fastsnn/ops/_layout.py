"""Memory-layout helpers shared by the ops: kernels walk storage order, so every tensor of a call must
share one dense layout."""
import torch


def is_dense_time_major(x: torch.Tensor, allow_broadcast: bool = False) -> bool:
    """True when x[T, ...] is time-outermost with each timestep one dense block, in any dim order (with
    allow_broadcast, also when every timestep is the same block: time stride 0)."""
    n = x[0].numel() if x.shape[0] else 0
    if x.shape[0] > 1 and x.stride(0) != n and not (allow_broadcast and x.stride(0) == 0):
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride()[1:], x.shape[1:]) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def time_major_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised [T, ...] tensor, time stride N, each timestep laid out like x[0]."""
    step = x[0]
    return torch.empty_strided(x.shape, (step.numel(), *step.stride()), dtype=dtype or x.dtype, device=x.device)


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t, copied if needed so that its strides are those of `like` (same shape)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)
