"""What the neuron ops (lif, bn_lif) share on their host path: the time-broadcast view of a repeated input,
the membrane checkpoints a long sequence keeps, and the custom ops' flattened spec and empty placeholders."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..spec import NeuronSpec
from ._layout import kernels_loader, time_major_like

MAX_CHUNK = 8  # fastsnn.kernels.neuron.MAX_CHUNK (asserted equal by tests/test_lif.py), kept here to skip a call
_neuron_kernels = kernels_loader("neuron")


def repeated(x_step: Tensor, repeat: int) -> Tensor:
    """One timestep [...] presented at `repeat` steps: a [repeat, ...] view with time stride 0."""
    return x_step.unsqueeze(0).expand(repeat, *x_step.shape)


def membrane_checkpoints(x_seq: Tensor) -> Tensor | None:
    """fp32 membrane checkpoints [n, ...] laid out like x_seq's timesteps, or None when T needs none."""
    if x_seq.shape[0] <= MAX_CHUNK:  # the common case, decided without a call into the kernels module
        return None
    n = _neuron_kernels().checkpoints_for(x_seq.shape[0])
    return time_major_like(x_seq[:n], dtype=torch.float32)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(NeuronSpec))  # a custom op's spec arguments, in order


def spec_args(spec: NeuronSpec) -> tuple:
    """A spec's fields in the custom ops' argument order (kind, tau, v_threshold, v_reset, surrogate, alpha,
    detach_reset)."""
    return (spec.kind, spec.tau, spec.v_threshold, spec.v_reset, spec.surrogate, spec.alpha, spec.detach_reset)


def op_settings(spec: NeuronSpec, *more) -> tuple:
    """spec_args(spec) + more, as a derived eager Function takes an op's settings (fastsnn.ops._declare): made once
    per spec and `more`, kept on the spec (not under torch.compile, which calls the custom op with spec_args)."""
    cache = spec.__dict__.get("_settings")
    if cache is None:
        cache = {}
        object.__setattr__(spec, "_settings", cache)
    settings = cache.get(more)
    if settings is None:
        settings = cache[more] = spec_args(spec) + more
    return settings


_SPECS: dict = {}


def spec_of(*fields) -> NeuronSpec:
    """The NeuronSpec of a custom op's (or a derived Function's) spec arguments, made once per distinct set (a
    dict lookup on every call; the fields come from a spec built and validated at the call site)."""
    spec = _SPECS.get(fields)
    if spec is None:
        if len(_SPECS) >= 1024:
            _SPECS.clear()
        spec = _SPECS[fields] = NeuronSpec(*fields)
    return spec


def empty_f32(x: Tensor) -> Tensor:
    """An empty fp32 tensor on x's device: a custom op's output standing for "none"."""
    return x.new_empty(0, dtype=torch.float32)
