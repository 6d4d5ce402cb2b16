"""BatchNorm + optional residual + multistep neuron as one op: input checks, backend dispatch, the Triton path.

    spikes = neuron(BN(x) [+ residual])   over x[T, B, C, *spatial], BN statistics per channel over T·B·spatial

The Triton path keeps only x (plus per-channel fp32 statistics) for the backward, which recomputes the
normalised value and the membrane (see fastsnn.kernels.bn_lif for the passes and their byte counts). The ops
(STATISTICS, BN_NEURON) are declared once (fastsnn.ops._declare): eager calls run what is derived for autograd,
torch.compile the derived torch.library custom ops.
The reference backend is torch.nn.functional.batch_norm + fastsnn.reference.lif_multistep.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import (FLOAT_DTYPES, INTERPRET, check_float_tensor, check_number, check_same_device, interpreter_dtype,
                       resolve_backend)
from ..spec import PARAMETRIC, NeuronSpec, kind_of, neuron_spec
from . import recompute, spike_storage
from ._common import membrane_checkpoints, repeated
from ._declare import Host, Op
from ._layout import as_time_major_like, is_dense_time_major, LazyKernels, time_major_like
from .lif import check_w, rate_of


_kernels = LazyKernels("bn_lif")




def _backward_impl(grad_spikes, x, weight, residual, stats, checkpoints, spec, training, repeat, needs,
                   geometry=None, residual_bn=None, rate=None, group=None):
    """(grad_x, grad_weight, grad_bias, grad_residual, grad_residual_weight, grad_residual_bias, grad_rate), None
    where `needs` (6 bools) says not needed, and the residual BatchNorm's two without residual_bn = (the residual's
    statistics, its BatchNorm weight); grad_rate: None without rate. `geometry`: the forward's, reused when
    grad_spikes keeps its alignment."""
    x_seq = repeated(x, repeat) if repeat else x
    grad_spikes = as_time_major_like(grad_spikes, x_seq)
    addresses = grad_spikes.data_ptr()
    if residual is not None:
        residual = as_time_major_like(residual, x_seq)
        addresses |= residual.data_ptr()
    if geometry is None or addresses % 16:
        geometry = _kernels.geometry(x_seq, residual, grad_spikes)
    broadcast = geometry.stride_xt == 0 and geometry.T > 1
    grad_y = time_major_like(x_seq[:1] if broadcast else x_seq)
    grad_weight = stats.new_empty(geometry.C) if needs[1] else None
    grad_bias = stats.new_empty(geometry.C) if needs[2] else None
    grad_x = None
    launch_residual_bn = None
    if residual_bn is not None:  # g is dL/d(BN_r(residual)), never returned: dL/dx in place over it
        grad_x = grad_y if needs[0] else None
        launch_residual_bn = (*residual_bn, *(stats.new_empty(geometry.C) if n else None for n in needs[4:6]),
                              time_major_like(residual) if needs[3] else None)
    elif needs[0]:
        grad_x = time_major_like(grad_y) if needs[3] else grad_y  # in place over g when g is not returned
    partials = _kernels.bn_fire_backward(x_seq, residual, grad_spikes, stats, checkpoints, grad_y, weight,
                                           grad_weight, grad_bias, grad_x, geometry, spec, training, launch_residual_bn,
                                           rate, group)
    grad_rate = None if partials is None else partials.sum().reshape(rate.shape)
    if grad_x is not None and broadcast:
        grad_x = grad_x[0]
    if residual_bn is not None:
        return (grad_x, grad_weight, grad_bias, launch_residual_bn[4], launch_residual_bn[2], launch_residual_bn[3],
                grad_rate)
    return grad_x, grad_weight, grad_bias, grad_y if needs[3] else None, None, None, grad_rate


# ---- the ops, declared once (fastsnn.ops._declare): eager Functions and custom ops derived ----
#
# statistics (forward only; it updates the running statistics in place), then the fused op: fire (spikes, the
# membrane checkpoints and the packed residual as outputs) and its backward. The weights and biases enter the
# fused op only for their gradients (the statistics table holds their effect).

def process_group(name: str | None):
    """The process group a synchronised call names (its c10d group_name), or None: what the ops' schemas carry,
    since a custom op's argument cannot be a ProcessGroup."""
    if name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _statistics(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], training: bool, momentum: float, eps: float, repeat: int,
                group: Optional[str] = None, geometry: Host = None) -> Tensor:
    """stats [4, C] fp32 (mean, 1/std, scale, shift); the running statistics updated in training mode; group: the
    process group (by name) whose ranks' batches the statistics span, or None; geometry: the call's, when the
    eager path has it (see _fused)."""
    x_seq = repeated(x, repeat) if repeat else x
    if geometry is None:
        geometry = _kernels.geometry(x_seq)
    stats = x.new_empty(4, geometry.C, dtype=torch.float32)
    _kernels.bn_statistics(x_seq, geometry, weight, bias, running_mean, running_var, stats, training, momentum, eps,
                           None if group is None else process_group(group))
    return stats


def _statistics_fake(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group=None,
                     geometry=None):
    return x.new_empty(4, x.shape[1] if repeat else x.shape[2], dtype=torch.float32)


def _batch_statistics(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      repeat: int, group: Optional[str] = None) -> Tensor:
    """_statistics without running statistics (training mode): a pure op, which Inductor takes where a mutating
    op with nothing to mutate fails."""
    return _statistics(x, weight, bias, None, None, True, 0.0, eps, repeat, group)


def _batch_statistics_fake(x, weight, bias, eps, repeat, group=None):
    return _statistics_fake(x, weight, bias, None, None, True, 0.0, eps, repeat, group)


STATISTICS = Op("bn_statistics", _statistics, fake=_statistics_fake, mutates_args=("running_mean", "running_var"))
BATCH_STATISTICS = Op("bn_batch_statistics", _batch_statistics, fake=_batch_statistics_fake)


def _stats(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group, compiling) -> Tensor:
    """The statistics of a call: eager, the plain function; compiled, the custom op (the mutating one when there
    are running statistics), given detached inputs (it has no autograd formula: the fused op has)."""
    if not compiling:
        return _statistics(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group)
    x, weight, bias = (None if t is None else t.detach() for t in (x, weight, bias))
    if running_mean is None:
        return BATCH_STATISTICS.op(x, weight, bias, eps, repeat, group)
    return STATISTICS.op(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group)


def _fire(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
          residual_weight: Optional[Tensor], residual_bias: Optional[Tensor], rate: Optional[Tensor], stats: Tensor,
          residual_stats: Optional[Tensor], x_kept: Optional[Tensor], x_conv_weight: Optional[Tensor],
          x_conv_bias: Optional[Tensor], residual_kept: Optional[Tensor], residual_conv_weight: Optional[Tensor],
          residual_conv_bias: Optional[Tensor], spec: NeuronSpec, training: bool, repeat: int, group: Optional[str],
          residual_storage: Optional[str], check: bool, sources: Optional[list[int]],
          geometry: Host) -> tuple[Tensor, Tensor, Tensor]:
    """(spikes, fp32 membrane checkpoints or None, the residual packed for the backward or None): 1 launch (and
    the packing). residual_stats, when given, normalises the residual (its BatchNorm's weight and bias are
    residual_weight and residual_bias); rate: a parametric neuron's k. x_kept ... sources: the ConvSources
    (fastsnn.ops.recompute, encoded) that the backward recomputes x and the residual from instead of saving
    them, inputs only for the saving formula. geometry: the call's (eager; the statistics' own), kept for the
    backward."""
    x_seq = repeated(x, repeat) if repeat else x
    spikes = time_major_like(x_seq)
    checkpoints = membrane_checkpoints(x_seq)
    fire_residual = None if residual is None else as_time_major_like(residual, x_seq)
    if geometry is None:
        geometry = _kernels.geometry(x_seq, fire_residual)
    _kernels.bn_fire(x_seq, fire_residual, stats, spikes, checkpoints, geometry, spec, residual_stats, rate)
    packed = None if residual is None or not residual_storage else \
        spike_storage.pack("bn_lif", residual, residual_storage, check)
    return spikes, checkpoints, packed


def _fire_fake(*args):
    a = BN_NEURON.args.bind(args)
    x_seq = repeated(a.x, a.repeat) if a.repeat else a.x
    packed = None if a.residual is None or not a.residual_storage else \
        a.x.new_empty(spike_storage.packed_size(a.residual.numel(), a.residual_storage), dtype=torch.uint8)
    return time_major_like(x_seq), membrane_checkpoints(x_seq), packed


def _save(ctx, a, outputs):
    _, checkpoints, packed = outputs
    residual, plan, kept = a.residual, None, ()
    x = a.x
    if a.sources is not None:  # x (the residual) is not saved when its source matches it; its tensors are
        sources = recompute.decoded_pair(a.sources, a[_X_SOURCE], a[_RESIDUAL_SOURCE])
        plan, x, residual, kept = recompute.keep(sources, x, residual)
    storage = a.residual_storage if a.residual is not None else None
    residual_layout = _NO_LAYOUT
    if storage:  # saved packed (as _fire packed it: the residual as given), rebuilt in the backward
        residual_layout = tuple(spike_storage.layout(a.residual))
        residual = packed
    # what the backward takes besides the tensors, as one attribute (each costs host time)
    ctx.state = (a[_SETTINGS], storage, residual_layout, plan, a.geometry)
    ctx.save_for_backward(x, a.weight, residual, a.stats, checkpoints, a.residual_weight, a.residual_stats, a.rate,
                          *(kept if plan else ()))  # the sources' tensors only when something is rebuilt
    if checkpoints is not None:
        ctx.mark_non_differentiable(checkpoints)
    if packed is not None:
        ctx.mark_non_differentiable(packed)


def _backward(grad_spikes: Tensor, x: Optional[Tensor], weight: Optional[Tensor], residual: Optional[Tensor],
              stats: Tensor, checkpoints: Optional[Tensor], residual_weight: Optional[Tensor],
              residual_stats: Optional[Tensor], rate: Optional[Tensor], x_kept: Optional[Tensor],
              x_conv_weight: Optional[Tensor], x_conv_bias: Optional[Tensor], residual_kept: Optional[Tensor],
              residual_conv_weight: Optional[Tensor], residual_conv_bias: Optional[Tensor], spec: NeuronSpec,
              training: bool, repeat: int, group: Optional[str], residual_storage: Optional[str],
              residual_shape: Optional[list[int]], residual_strides: Optional[list[int]],
              residual_dtype: Optional[torch.dtype], plan: Optional[list[int]], needs: list[bool],
              geometry: Host) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of x, weight, bias, residual, the residual's BatchNorm weight and bias (with residual_stats)
    and rate, each in its input's dtype, None where `needs` (6 flags, rate's aside) says not needed: the
    recomputed (plan, from the kept tensors) or unpacked inputs, then one launch (and, for a parametric neuron,
    one sum of the programs' partials). geometry: the forward's (eager), reused while the pointers keep their
    alignment."""
    if plan:
        x, residual = recompute.restore(recompute.decode_plan(plan), x, residual,
                                        (x_kept, x_conv_weight, x_conv_bias, residual_kept, residual_conv_weight,
                                         residual_conv_bias))
    if residual_storage:
        residual = spike_storage.unpack("bn_lif", residual, residual_storage,
                                        (residual_shape, residual_strides, residual_dtype))
    if checkpoints is not None and not checkpoints.numel():  # the custom op's stand-in for none
        checkpoints = None
    residual_bn = None if residual_stats is None else (residual_stats, residual_weight)
    grad_x, grad_weight, grad_bias, grad_residual, grad_r_weight, grad_r_bias, grad_rate = _backward_impl(
        grad_spikes, x, weight, residual, stats, checkpoints, spec, training, repeat, needs, geometry,
        residual_bn=residual_bn, rate=rate, group=None if group is None else process_group(group))
    if grad_weight is not None and grad_weight.dtype != weight.dtype:  # the fp32 sums, in the weight's dtype
        grad_weight = grad_weight.to(weight.dtype)
    if grad_residual is not None and grad_residual.dtype != residual.dtype:
        grad_residual = grad_residual.to(residual.dtype)
    if grad_r_weight is not None and grad_r_weight.dtype != residual_weight.dtype:
        grad_r_weight = grad_r_weight.to(residual_weight.dtype)
    return grad_x, grad_weight, grad_bias, grad_residual, grad_r_weight, grad_r_bias, grad_rate


def _backward_fake(grad_spikes, x, weight, residual, stats, checkpoints, residual_weight, residual_stats, rate,
                   x_kept, x_conv_weight, x_conv_bias, residual_kept, residual_conv_weight, residual_conv_bias, spec,
                   training, repeat, group, residual_storage, residual_shape, residual_strides, residual_dtype, plan,
                   needs, geometry):
    steps = recompute.decode_plan(plan) if plan else (None, None)
    if x is None:  # recomputed in the backward: its shape, strides and dtype are the plan's
        meta, shape, strides = steps[0]
        x = grad_spikes.new_empty_strided(shape, strides, dtype=meta[3])
    x_seq = repeated(x, repeat) if repeat else x
    r_dtype = residual_dtype if residual_storage else residual.dtype if residual is not None else \
        steps[1][0][3] if steps[1] is not None else x.dtype

    def channel(t=None):
        return torch.empty_like(stats[0], dtype=stats.dtype if t is None else t.dtype)
    grads = (time_major_like(x), channel(weight), channel(), time_major_like(x_seq, dtype=r_dtype),
             channel(residual_weight), channel())
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return grads + (None if rate is None else torch.empty_like(rate),)


def _formula(ctx, backward, grad_spikes, _grad_checkpoints, _grad_packed):
    x, weight, residual, stats, checkpoints, r_weight, r_stats, rate, *kept = ctx.saved_tensors
    kept = kept or _NO_SOURCES[0]
    needs = list(ctx.needs_input_grad[:6])  # x ... residual_bias; False for an input that is None
    settings, storage, residual_layout, plan, geometry = ctx.state
    if plan is not None:
        plan = recompute.encode_plan(plan)
    grads = backward(grad_spikes, x, weight, residual, stats, checkpoints, r_weight, r_stats, rate, *kept,
                     *settings, storage, *residual_layout, plan, needs, geometry)
    if backward is _backward:  # eager: None already where not needed (the custom op returns empty tensors there)
        return grads
    return (*[g if need else None for g, need in zip(grads, needs)], None if rate is None else grads[6])


# the inputs with a gradient lead, in the order of the backward's outputs (rate's comes last)
BN_NEURON = Op("bn_neuron", _fire, fake=_fire_fake, save=_save, backward=_backward, backward_fake=_backward_fake,
               formula=_formula, internal=2, label="bn_lif",
               differentiable=("x", "weight", "bias", "residual", "residual_weight", "residual_bias", "rate"))
_NO_SOURCES = ((None,) * 6, None)  # no ConvSource: x and the residual are saved
_NO_LAYOUT = (None, None, None)  # the residual is not saved packed
_SETTINGS = BN_NEURON.args.span("spec", "group")  # the spec, training, repeat, group: the backward's
_X_SOURCE = BN_NEURON.args.span("x_kept", "x_conv_bias")
_RESIDUAL_SOURCE = BN_NEURON.args.span("residual_kept", "residual_conv_bias")


# ---- checks and the public functions ----

def _channel_vectors_ok(x: Tensor, *vectors) -> bool:
    """True when each of `vectors` is a dense float tensor of shape (C,) on x's device (C = x.shape[2])."""
    C, device = x.shape[2], x.device
    for t in vectors:
        if not (type(t) is Tensor or type(t) is torch.nn.Parameter) or t.dtype not in FLOAT_DTYPES \
                or t.shape != (C,) or t.device != device or not t.is_contiguous():
            return False
    return True


def _check_channel_vector(op: str, name: str, t, C: int, device, *, written: bool = False):
    """`written`: the op updates t in place (a running statistic in training mode), so its elements must not
    share memory (an expanded tensor)."""
    if t is None:
        return
    check_float_tensor(op, name, t)
    if t.shape != (C,):
        raise ValueError(f"{op}: {name} must have shape ({C},), one value per channel of x, got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on x's device ({device}), got {t.device}")
    if written and C > 1 and t.stride(0) == 0:
        raise ValueError(f"{op}: {name} is updated in place in training mode, so it cannot be an expanded tensor "
                         f"(stride 0: its {C} entries share one element); pass a tensor with its own {C} elements")


def _dense_vectors(vectors: tuple) -> tuple:
    """Each per-channel vector itself when dense, else a contiguous copy (the kernels read and write them with
    stride 1); the copies of weights and biases pass their gradients back to the given tensors."""
    return tuple(None if t is None or t.is_contiguous() else t.contiguous() for t in vectors)


def _check(op, x, weight, bias, running_mean, running_var, residual, training, momentum, eps, repeat):
    if repeat is None and type(x) is Tensor and x.dtype in FLOAT_DTYPES and x.dim() >= 3 and training is True \
            and _channel_vectors_ok(x, weight, bias, running_mean, running_var) \
            and (residual is None or (type(residual) is Tensor and residual.dtype in FLOAT_DTYPES
                                      and residual.shape == x.shape and residual.device == x.device)) \
            and type(momentum) is float and 0.0 <= momentum <= 1.0 and type(eps) is float and 0.0 < eps < math.inf \
            and 0 not in x.shape and x.numel() > x.shape[2]:
        return momentum, eps, True  # the common call (a training step), checked in one expression
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor of shape [T, B, C, ...], got {type(x).__name__}")
    if repeat is not None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"{op}: repeat must be None or a number of timesteps >= 1, got {repeat!r}")
        if x.dim() < 2:
            raise ValueError(f"{op}: with repeat, x must be one timestep [B, C, ...] with at least 2 dims, got "
                             f"shape {tuple(x.shape)}")
        if residual is not None:
            raise ValueError(f"{op}: residual cannot be combined with repeat (a time-broadcast input)")
    elif x.dim() < 3:
        raise ValueError(f"{op}: x must have shape [T, B, C, ...] with at least 3 dims (time, batch, channel), "
                         f"got shape {tuple(x.shape)}")
    check_float_tensor(op, "x", x)
    shape = (repeat, *x.shape) if repeat else tuple(x.shape)
    if 0 in shape:
        raise ValueError(f"{op}: x must not be empty, got shape {shape} (time, batch, channel, ...)")
    C = shape[2]
    device = x.device
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be True or False, got {training!r}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_channel_vector(op, name, t, C, device, written=training and name.startswith("running"))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False normalises with running_mean and running_var, which are None")
    momentum = check_number(op, "momentum", momentum, low=0.0, high=1.0, rule="a number in [0, 1]")
    eps = check_number(op, "eps", eps, low=0.0, low_inclusive=False, rule="a finite number > 0")
    if training and x.numel() // C <= 1:
        raise ValueError(f"{op}: training needs more than 1 value per channel, got x of shape {shape}")
    if residual is not None:
        check_float_tensor(op, "residual", residual)
        check_same_device(op, x=x, residual=residual)
        if tuple(residual.shape) != shape:
            raise ValueError(f"{op}: residual must have x's shape {shape}, got {tuple(residual.shape)}")
    return momentum, eps, False


def _check_process_group(op: str, process_group) -> str | None:
    """The name of the process group a synchronised call spans (None when it has one rank: nothing to share)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: process_group synchronises BatchNorm statistics across the ranks of a "
                         f"torch.distributed job, but torch.distributed is not initialised (init_process_group); "
                         f"pass process_group=None")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{op}: process_group must be None or a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__}")
    return process_group.group_name if dist.get_world_size(process_group) > 1 else None


def _check_residual_bn(op: str, x: Tensor, residual, residual_bn, residual_storage, training: bool) -> tuple:
    if not isinstance(residual_bn, (tuple, list)) or len(residual_bn) != 4:
        raise TypeError(f"{op}: residual_bn must be None or (weight, bias, running_mean, running_var) of the "
                        f"residual's BatchNorm, got {type(residual_bn).__name__}")
    if residual is None:
        raise ValueError(f"{op}: residual_bn normalises the residual, but residual is None")
    if residual_storage is not None:
        raise ValueError(f"{op}: residual_storage packs spikes; a residual normalised by residual_bn is not spikes "
                         f"(got residual_storage={residual_storage!r})")
    for name, t in zip(("weight", "bias", "running_mean", "running_var"), residual_bn):
        _check_channel_vector(op, f"residual_bn's {name}", t, x.shape[2], x.device,
                              written=training and name.startswith("running"))
    if (residual_bn[2] is None) != (residual_bn[3] is None):
        raise ValueError(f"{op}: residual_bn's running_mean and running_var must be given together (or both None)")
    return tuple(residual_bn)


def apply_bn_neuron(op: str, x: Tensor, weight, bias, running_mean, running_var, spec: NeuronSpec, *,
                    training: bool, momentum: float = 0.1, eps: float = 1e-5, residual: Tensor | None = None,
                    residual_storage: str | None = None, residual_bn=None, repeat: int | None = None,
                    backend: str = "auto", w: Tensor | None = None, source=None, residual_source=None,
                    process_group=None) -> Tensor:
    """spikes [T, B, C, ...] of the neuron `spec` over BN(x) [+ residual, or + BN_r(residual) with residual_bn]
    (see bn_lif); w: a parametric neuron's weight; source, residual_source: ConvSources to recompute x and the
    residual from (fastsnn.ops.recompute); process_group: synchronised statistics (see bn_lif). The spec is
    trusted."""
    momentum, eps, common = _check(op, x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                                   repeat)
    group = None if process_group is None else _check_process_group(op, process_group)
    if w is not None or spec.kind in PARAMETRIC:
        check_w(op, w, spec, x.device)
    if residual_storage is not None and residual_storage not in spike_storage.STORAGES:
        raise ValueError(f"{op}: residual_storage must be None or one of {spike_storage.STORAGES}, got "
                         f"{residual_storage!r}")
    if residual_bn is not None:
        residual_bn = _check_residual_bn(op, x, residual, residual_bn, residual_storage, training)
        if not training and residual_bn[2] is None:
            raise ValueError(f"{op}: training=False normalises the residual with residual_bn's running statistics, "
                             f"which are None")
    dtype = interpreter_dtype(x, residual, weight, bias, running_mean, running_var, *(residual_bn or ())) \
        if INTERPRET and not x.is_cuda else None  # bf16 decides the backend under the interpreter
    rate = None if w is None else rate_of(w)
    if resolve_backend(op, backend, x.device, dtype) == "reference":
        return reference.bn_lif_multistep(x, weight, bias, running_mean, running_var, spec, training=training,
                                          momentum=momentum, eps=eps, residual=residual, residual_bn=residual_bn,
                                          repeat=repeat, rate=rate, process_group=None if group is None else
                                          process_group)
    vectors = (weight, bias, running_mean, running_var) + (residual_bn or ())
    copies = () if common and residual_bn is None else _dense_vectors(vectors)  # common: x's vectors are dense
    if copies and any(t is not None for t in copies):  # a strided or expanded vector: the kernels take dense copies
        used = tuple(t if c is None else c for t, c in zip(vectors, copies))
        spikes = apply_bn_neuron(op, x, *used[:4], spec, training=training, momentum=momentum, eps=eps,
                                 residual=residual, residual_storage=residual_storage,
                                 residual_bn=used[4:] or None, repeat=repeat, backend=backend, w=w, source=source,
                                 residual_source=residual_source, process_group=process_group)
        if training:  # the running statistics' updates, written back where the caller keeps them
            for k in (2, 3) if residual_bn is None else (2, 3, 6, 7):
                if copies[k] is not None:
                    vectors[k].copy_(copies[k])
        return spikes
    if repeat:
        x = x if is_dense_time_major(x.unsqueeze(0)) else x.contiguous()
    elif not (x.is_contiguous() or is_dense_time_major(x)):
        # a time-broadcast x (stride 0) too: its statistics count T·B·spatial values, and its gradient has T
        # timesteps (repeat= is the form that reads one timestep in place)
        x = x.contiguous()
    check = residual_storage is not None and spike_storage.CHECK_DEFAULT
    sources = None
    if source is not None or residual_source is not None:
        recompute.check_source(op, "source", source)
        recompute.check_source(op, "residual_source", residual_source)
        sources = (source, None if residual_storage else residual_source)
    # the op: statistics (updating the running ones; the residual's too when residual_bn normalises it), then the
    # fused fire op through autograd (eager: its derived Function; compiled: its custom op)
    repeat = repeat or 0
    compiling = torch.compiler.is_compiling()
    group = group if training else None  # eval mode normalises with the running statistics: nothing to share
    if compiling:
        geometry = None
        stats = _stats(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group, True)
    else:  # one Geometry for the statistics, the fire and (while its pointers stay aligned) the backward
        x_seq = repeated(x, repeat) if repeat else x
        geometry = _kernels.geometry(x_seq, None if residual is None else as_time_major_like(residual, x_seq))
        stats = _statistics(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat, group,
                            geometry)
    r_weight = r_bias = r_stats = None
    if residual_bn is not None:
        r_weight, r_bias, r_running_mean, r_running_var = residual_bn
        r_stats = _stats(as_time_major_like(residual, x), r_weight, r_bias, r_running_mean, r_running_var, training,
                         momentum, eps, 0, group, compiling)
    source_tensors, ints = _NO_SOURCES if sources is None else recompute.encoded_pair(sources)
    others = (stats, r_stats, *source_tensors, spec, training, repeat, group, residual_storage, check, ints, geometry)
    if compiling:
        return BN_NEURON.op(*BN_NEURON.args.flat((x, weight, bias, residual, r_weight, r_bias, rate, *others)))[0]
    return BN_NEURON.Function.apply(x, weight, bias, residual, r_weight, r_bias, rate, others)[0]


def bn_lif(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
           running_var: Tensor | None, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
           residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
           tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
           v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
           detach_reset: bool = False, repeat: int | None = None, backend: str = "auto", source=None,
           residual_source=None, process_group=None) -> Tensor:
    """BatchNorm, an optional residual add, and the multistep LIF neuron, fused:

        y = (x − μ_c)/√(σ²_c + eps)·weight_c + bias_c [+ residual],   spikes = lif_multistep(y, ...)

    x is [T, B, C, *spatial] (e.g. [T, B, C, H, W] after a convolution, [T, B, C] after a linear layer),
    in any dense layout (NCHW and channels_last are read in place) and fp32, fp16 or bf16. With repeat = T,
    x is one timestep [B, C, *spatial] normalised once and presented at all T steps (direct encoding).
    In training mode μ and σ² are the mean and biased variance per channel over T·B·spatial, exactly what
    nn.BatchNorm2d computes on the folded batch [T·B, C, H, W]; running_mean/running_var (when given) are
    updated in place with `momentum` and the unbiased variance. In eval mode (training=False) they are the
    running statistics. weight/bias may be None (no affine). The neuron arguments are lif_multistep's.

    residual_storage: None keeps the residual tensor for the backward as it is; "bits" (spikes, 0/1) or "uint8"
    (integers 0..255) keeps it packed, 1 bit or 1 byte per value (eager and under torch.compile; see
    fastsnn.SpikeConv2d for the contract and the checked mode).

    residual_bn: None, or (weight, bias, running_mean, running_var) of a second BatchNorm that normalises the
    residual first, with this call's training, momentum and eps (a ResNet block's downsample shortcut:
    y = BN(x) + BN_r(residual)); its running statistics are updated the same way, and weight, bias and the
    residual get their gradients. The backward then keeps the residual (the shortcut convolution's output)
    instead of BN_r's output, which never exists.

    source / residual_source: None, or the ConvSource of x (of the residual) when it is a fastsnn.SpikeConv2d's
    output (conv(x_in, source_into=box) puts it in box; see fastsnn.ops.recompute): the op then saves the source
    (the packed input the convolution keeps anyway and its weight) instead of x, and its backward recomputes x
    with one convolution, the same values in the same layout, so every result equals source=None's. A source
    that is not x's (another tensor, a copy) is ignored.

    process_group: None, or a torch.distributed ProcessGroup (torch.distributed.group.WORLD for every rank): in
    training mode the statistics are those of the batches of all its ranks (synchronised BatchNorm, fused: one
    all_gather of per-channel (count, mean, M2) in the forward, one all_reduce of the backward's two per-channel
    sums per call; x's gradient is the global batch's, weight's and bias's this rank's, which DDP sums); ranks
    may hold different batch sizes. Every rank must make the same calls in the same order (collectives).

    Memory: the backward keeps x (and the residual), or their sources, and per-channel fp32 statistics, never
    the normalised value or the neuron input. Returns spikes [T, B, C, *spatial] in x's dtype and layout.
    The caller (e.g. the BNLIF module) increments num_batches_tracked, as nn.BatchNorm2d's forward does.
    """
    op = "bn_lif"
    spec = neuron_spec(op, kind=kind_of(decay_input, op), tau=tau, v_threshold=v_threshold, v_reset=v_reset,
                       surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
    return apply_bn_neuron(op, x, weight, bias, running_mean, running_var, spec, training=training,
                           momentum=momentum, eps=eps, residual=residual, residual_storage=residual_storage,
                           residual_bn=residual_bn, repeat=repeat, backend=backend, source=source,
                           residual_source=residual_source, process_group=process_group)


def bn_if(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
          residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
          v_threshold: float = 1.0, v_reset: float | None = 0.0,
          surrogate: str = "atan", alpha: float | None = None, detach_reset: bool = False,
          repeat: int | None = None, backend: str = "auto", source=None, residual_source=None,
          process_group=None) -> Tensor:
    """bn_lif with the integrate-and-fire neuron (charge h = v + y): same arguments without tau, decay_input."""
    op = "bn_if"
    spec = neuron_spec(op, kind="if", tau=None, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                       alpha=alpha, detach_reset=detach_reset)
    return apply_bn_neuron(op, x, weight, bias, running_mean, running_var, spec, training=training,
                           momentum=momentum, eps=eps, residual=residual, residual_storage=residual_storage,
                           residual_bn=residual_bn, repeat=repeat, backend=backend, source=source,
                           residual_source=residual_source, process_group=process_group)


def bn_plif(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, w: Tensor, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
            residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
            decay_input: bool = True, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
            alpha: float | None = None, detach_reset: bool = False, repeat: int | None = None,
            backend: str = "auto", source=None, residual_source=None, process_group=None) -> Tensor:
    """bn_lif with the parametric LIF neuron (fastsnn.plif_multistep: rate k = sigmoid(w), w one learnable
    element): same arguments with w in place of tau. dL/dw comes from the backward kernel's per-program partial
    sums and one sum."""
    op = "bn_plif"
    spec = neuron_spec(op, kind=kind_of(decay_input, op, parametric=True), tau=2.0, v_threshold=v_threshold,
                       v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
    return apply_bn_neuron(op, x, weight, bias, running_mean, running_var, spec, training=training,
                           momentum=momentum, eps=eps, residual=residual, residual_storage=residual_storage,
                           residual_bn=residual_bn, repeat=repeat, backend=backend, w=w, source=source,
                           residual_source=residual_source, process_group=process_group)
