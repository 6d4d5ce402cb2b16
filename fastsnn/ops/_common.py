"""What the neuron ops (lif, bn_lif) share on their host path: the time-broadcast view of a repeated input,
and the membrane checkpoints a long sequence keeps."""
from __future__ import annotations

import torch
from torch import Tensor

from ._layout import LazyKernels, time_major_like

MAX_CHUNK = 8  # fastsnn.kernels.neuron.MAX_CHUNK (asserted equal by tests/test_lif.py), kept here to skip a call
_neuron_kernels = LazyKernels("neuron")


def repeated(x_step: Tensor, repeat: int) -> Tensor:
    """One timestep [...] presented at `repeat` steps: a [repeat, ...] view with time stride 0."""
    return x_step.unsqueeze(0).expand(repeat, *x_step.shape)


def membrane_checkpoints(x_seq: Tensor) -> Tensor | None:
    """fp32 membrane checkpoints [n, ...] laid out like x_seq's timesteps, or None when T needs none."""
    if x_seq.shape[0] <= MAX_CHUNK:  # the common case, decided without a call into the kernels module
        return None
    n = _neuron_kernels.checkpoints_for(x_seq.shape[0])
    return time_major_like(x_seq[:n], dtype=torch.float32)
