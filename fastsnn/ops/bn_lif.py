"""BatchNorm + optional residual + multistep neuron as one op: input checks, backend dispatch, the Triton path.

    spikes = neuron(BN(x) [+ residual])   over x[T, B, C, *spatial], BN statistics per channel over T·B·spatial

The Triton path keeps only x (plus per-channel fp32 statistics) for the backward, which recomputes the
normalised value and the membrane (see fastsnn.kernels.bn_lif for the passes and their byte counts). Eager
calls run a torch.autograd.Function; under torch.compile the same launchers run as torch.library custom ops.
The reference backend is torch.nn.functional.batch_norm + fastsnn.reference.lif_multistep.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import (FLOAT_DTYPES, INTERPRET, check_float_tensor, check_number, check_same_device, interpreter_dtype,
                       resolve_backend)
from ..spec import PARAMETRIC, NeuronSpec, kind_of, neuron_spec
from . import recompute, spike_storage
from ._autograd import refused
from ._common import SPEC_FIELDS, empty_f32, membrane_checkpoints, repeated, spec_args
from ._declare import Args
from ._layout import as_time_major_like, is_dense_time_major, kernels_loader, time_major_like
from .lif import check_w, rate_of


_kernels = kernels_loader("bn_lif")




def _geometry(x_seq: Tensor, *tensors: Tensor | None):
    """The kernels' (outer, channel, inner) view of x_seq [T, B, C, ...] and its tiling (see
    fastsnn.kernels.bn_lif.geometry; `tensors` are the call's other inputs, for their alignment)."""
    return _kernels().geometry(x_seq, *tensors)


def _statistics_impl(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat) -> Tensor:
    """stats [4, C] fp32 (mean, 1/std, scale, shift); the running statistics updated in training mode."""
    x_seq = repeated(x, repeat) if repeat else x
    geometry = _geometry(x_seq)
    stats = x.new_empty(4, geometry.C, dtype=torch.float32)
    _kernels().bn_statistics(x_seq, geometry, weight, bias, running_mean, running_var, stats, training=training,
                             momentum=momentum, eps=eps)
    return stats


def _fire_impl(x, residual, stats, spec, repeat, residual_stats=None, rate=None):
    """(spikes, checkpoints or None): 1 launch."""
    x_seq = repeated(x, repeat) if repeat else x
    spikes = time_major_like(x_seq)
    checkpoints = membrane_checkpoints(x_seq)
    residual = None if residual is None else as_time_major_like(residual, x_seq)
    _kernels().bn_fire(x_seq, residual, stats, spikes, checkpoints, _geometry(x_seq, residual), spec,
                       residual_stats=residual_stats, rate=rate)
    return spikes, checkpoints






def _backward_impl(grad_spikes, x, weight, residual, stats, checkpoints, spec, training, repeat, needs,
                   geometry=None, residual_bn=None, rate=None):
    """(grad_x, grad_weight, grad_bias, grad_residual, grad_rate), None where `needs` (4 bools) says not needed
    (grad_rate: None without rate); with residual_bn = (the residual's statistics, its BatchNorm weight) also
    (grad_residual_weight, grad_residual_bias) before grad_rate, 6 needs. `geometry`: the forward's, reused when
    grad_spikes keeps its alignment."""
    x_seq = repeated(x, repeat) if repeat else x
    grad_spikes = as_time_major_like(grad_spikes, x_seq)
    addresses = grad_spikes.data_ptr()
    if residual is not None:
        residual = as_time_major_like(residual, x_seq)
        addresses |= residual.data_ptr()
    if geometry is None or addresses % 16:
        geometry = _geometry(x_seq, residual, grad_spikes)
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
    partials = _kernels().bn_fire_backward(x_seq, residual, grad_spikes, stats, checkpoints, grad_y, weight,
                                           grad_weight, grad_bias, grad_x, geometry, spec, training=training,
                                           residual_bn=launch_residual_bn, rate=rate)
    grad_rate = None if partials is None else partials.sum().reshape(rate.shape)
    if grad_x is not None and broadcast:
        grad_x = grad_x[0]
    if residual_bn is not None:
        return (grad_x, grad_weight, grad_bias, launch_residual_bn[4], launch_residual_bn[2], launch_residual_bn[3],
                grad_rate)
    return grad_x, grad_weight, grad_bias, grad_y if needs[3] else None, grad_rate


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    if grad is None or like is None:
        return None
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


class _Call(NamedTuple):
    """A call's non-tensor arguments, one object per distinct set (see _call): the Function takes and keeps
    one argument instead of eight."""
    spec: NeuronSpec
    training: bool
    momentum: float
    eps: float
    repeat: int  # 0: x is [T, ...]
    residual_storage: str | None
    check: bool


_call = functools.lru_cache(maxsize=256)(_Call)


def _keep(sources, x: Tensor, residual: Tensor | None):
    """(the ctx's recompute plan, x or None, residual or None, the sources' tensors): x (the residual) is not
    saved when its ConvSource matches it (fastsnn.ops.recompute), its source's tensors are."""
    if sources is None:
        return None, x, residual, ()
    plan, kept, tensors = [], [], []
    for src, t in zip(sources, (x, residual)):
        if recompute.matches(src, t):
            plan.append((src.meta(), tuple(t.shape), tuple(t.stride())))
            tensors += src.tensors()
            kept.append(None)
        else:
            plan.append(None)
            kept.append(t)
    return (None if plan == [None, None] else plan), kept[0], kept[1], tuple(tensors)


def _restore(plan, x: Tensor | None, residual: Tensor | None, tensors, as_op: bool = False) -> tuple:
    """(x, residual) for the backward: saved, or recomputed from their sources (see _keep); as_op: in the custom
    op's autograd formula (see recompute.rebuild)."""
    if plan is None:
        return x, residual
    restored, k = [], 0
    for step, t in zip(plan, (x, residual)):
        if step is not None:
            t = recompute.rebuild("bn_lif", tuple(tensors[k:k + 3]), *step, as_op=as_op)
            k += 3
        restored.append(t)
    return tuple(restored)


class _BNNeuronFunction(torch.autograd.Function):
    """With residual_storage ("bits" / "uint8") the residual is saved packed (see fastsnn.ops.spike_storage)
    and unpacked for the backward. One Geometry (the kernels' view and tiling of x) serves every launch."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, rate, call, sources=None):
        if sources is None:  # the common call
            ctx.sources, x_kept, r_kept, kept = None, x, residual, ()
        else:
            ctx.sources, x_kept, r_kept, kept = _keep(sources, x, residual)
        x_seq = repeated(x, call.repeat) if call.repeat else x
        fire_residual = None if residual is None else as_time_major_like(residual, x_seq)
        kernels = _kernels()
        geometry = kernels.geometry(x_seq, fire_residual)
        stats = x.new_empty(4, geometry.C, dtype=torch.float32)
        kernels.bn_statistics(x_seq, geometry, weight, bias, running_mean, running_var, stats,
                              training=call.training, momentum=call.momentum, eps=call.eps)
        spikes = time_major_like(x_seq)
        checkpoints = membrane_checkpoints(x_seq)
        kernels.bn_fire(x_seq, fire_residual, stats, spikes, checkpoints, geometry, call.spec, rate=rate)
        if residual is not None and call.residual_storage:
            residual = as_time_major_like(residual, x)
            ctx.residual_layout = spike_storage.layout(residual)
            r_kept = spike_storage.pack("bn_lif", residual, call.residual_storage, call.check)
        ctx.save_for_backward(x_kept, weight, r_kept, stats, checkpoints, rate, *kept)
        ctx.call, ctx.geometry = call, geometry
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        x, weight, residual, stats, checkpoints, rate, *kept = ctx.saved_tensors
        x, residual = _restore(ctx.sources, x, residual, kept)
        call = ctx.call
        if residual is not None and call.residual_storage:
            residual = spike_storage.unpack("bn_lif", residual, call.residual_storage, ctx.residual_layout)
        grad_x, grad_weight, grad_bias, grad_residual, grad_rate = _backward_impl(
            grad_spikes, x, weight, residual, stats, checkpoints, call.spec, call.training, call.repeat,
            ctx.needs_input_grad, ctx.geometry, rate=rate)
        grads = _PLAIN_GRADS(grad_x, _cast(grad_weight, weight), grad_bias, _cast(grad_residual, residual), grad_rate)
        return refused("bn_lif", grads) if torch.is_grad_enabled() else grads


class _BNResidualBNFunction(torch.autograd.Function):
    """y = BN(x) + BN_r(residual) (a ResNet block's downsample shortcut, normalised in the same op): x and the
    residual are saved (BN_r's output never exists), with both statistics tables."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, r_weight, r_bias, r_running_mean,
                r_running_var, rate, call, sources=None):
        ctx.sources, x_kept, r_kept, kept = _keep(sources, x, residual)
        residual = as_time_major_like(residual, x)
        r_kept = None if r_kept is None else residual
        kernels = _kernels()
        geometry = kernels.geometry(x, residual)
        stats = x.new_empty(2, 4, geometry.C, dtype=torch.float32)  # x's table, the residual's
        for k, (t, g, w, b, rm, rv) in enumerate((
                (x, geometry, weight, bias, running_mean, running_var),
                (residual, kernels.geometry(residual), r_weight, r_bias, r_running_mean, r_running_var))):
            kernels.bn_statistics(t, g, w, b, rm, rv, stats[k], training=call.training, momentum=call.momentum,
                                  eps=call.eps)
        spikes = time_major_like(x)
        checkpoints = membrane_checkpoints(x)
        kernels.bn_fire(x, residual, stats[0], spikes, checkpoints, geometry, call.spec, residual_stats=stats[1],
                        rate=rate)
        ctx.save_for_backward(x_kept, weight, r_kept, r_weight, stats, checkpoints, rate, *kept)
        ctx.call, ctx.geometry = call, geometry
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        x, weight, residual, r_weight, stats, checkpoints, rate, *kept = ctx.saved_tensors
        x, residual = _restore(ctx.sources, x, residual, kept)
        residual = as_time_major_like(residual, x)
        n = ctx.needs_input_grad
        needs = tuple(n[_RESIDUAL_BN_ARGS.index(k)] for k in ("x", "weight", "bias", "residual", "r_weight", "r_bias"))
        grads = _backward_impl(grad_spikes, x, weight, residual, stats[0], checkpoints, ctx.call.spec,
                               ctx.call.training, 0, needs, ctx.geometry,
                               residual_bn=(stats[1], r_weight), rate=rate)
        grad_x, grad_weight, grad_bias, grad_residual, grad_r_weight, grad_r_bias, grad_rate = grads
        grads = _RESIDUAL_BN_GRADS(grad_x, _cast(grad_weight, weight), grad_bias, _cast(grad_residual, residual),
                                   _cast(grad_r_weight, r_weight), grad_r_bias, grad_rate)
        return refused("bn_lif", grads) if torch.is_grad_enabled() else grads


_RESIDUAL_BN_ARGS = Args(_BNResidualBNFunction.forward)
_PLAIN_GRADS = Args(_BNNeuronFunction.forward).returning("x", "weight", "bias", "residual", "rate")
_RESIDUAL_BN_GRADS = _RESIDUAL_BN_ARGS.returning("x", "weight", "bias", "residual", "r_weight", "r_bias", "rate")


# ---- the same launchers as custom ops, for torch.compile ----





@torch.library.custom_op("fastsnn::bn_statistics", mutates_args=("running_mean", "running_var"))
def _bn_statistics_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], training: bool, momentum: float, eps: float,
                      repeat: int) -> Tensor:
    return _statistics_impl(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat)


@_bn_statistics_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat):
    return x.new_empty(4, x.shape[1] if repeat else x.shape[2], dtype=torch.float32)


@torch.library.custom_op("fastsnn::bn_batch_statistics", mutates_args=())
def _bn_batch_statistics_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                            repeat: int) -> Tensor:
    """bn_statistics without running statistics (training mode): a pure op, which Inductor takes where a
    mutating op with nothing to mutate fails."""
    return _statistics_impl(x, weight, bias, None, None, True, 0.0, eps, repeat)


@_bn_batch_statistics_op.register_fake
def _(x, weight, bias, eps, repeat):
    return x.new_empty(4, x.shape[1] if repeat else x.shape[2], dtype=torch.float32)


def _statistics_op(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat) -> Tensor:
    """The statistics custom op of a compiled call: the mutating one when there are running statistics."""
    if running_mean is None:
        return _bn_batch_statistics_op(x, weight, bias, eps, repeat)
    return _bn_statistics_op(x, weight, bias, running_mean, running_var, training, momentum, eps, repeat)


def _bn_fire(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             stats: Tensor, residual_weight: Optional[Tensor], residual_bias: Optional[Tensor],
             residual_stats: Optional[Tensor], rate: Optional[Tensor], kind: str, tau: float, v_threshold: float,
             v_reset: Optional[float], surrogate: str, alpha: float, detach_reset: bool, training: bool,
             repeat: int, residual_storage: Optional[str], check: bool, x_kept: Optional[Tensor] = None,
             x_conv_weight: Optional[Tensor] = None, x_conv_bias: Optional[Tensor] = None,
             residual_kept: Optional[Tensor] = None, residual_conv_weight: Optional[Tensor] = None,
             residual_conv_bias: Optional[Tensor] = None,
             sources: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """spikes, checkpoints and, with residual_storage, the residual packed for the backward. The weights and
    biases are inputs only for their gradients (the statistics tables hold their effect); residual_stats, when
    given, normalises the residual (its BatchNorm's weight and bias are residual_weight and residual_bias);
    rate: a parametric neuron's k. x_kept ... sources: the ConvSources (fastsnn.ops.recompute, encoded) that
    the backward recomputes x and the residual from instead of saving them, inputs only for the autograd
    formula."""
    spec = NeuronSpec(kind, tau, v_threshold, v_reset, surrogate, alpha, detach_reset)
    spikes, checkpoints = _fire_impl(x, residual, stats, spec, repeat, residual_stats, rate)
    packed = _no_bytes(x) if residual is None or not residual_storage else \
        spike_storage.pack("bn_lif", residual, residual_storage, check)
    return spikes, empty_f32(x) if checkpoints is None else checkpoints, packed


_FIRE_ARGS = Args(_bn_fire)  # the op's inputs by name, for its autograd formula
_bn_fire_op = torch.library.custom_op("fastsnn::bn_neuron_fire", _bn_fire, mutates_args=())


@_bn_fire_op.register_fake
def _(x, weight, bias, residual, stats, residual_weight, residual_bias, residual_stats, rate, kind, tau, v_threshold,
      v_reset, surrogate, alpha, detach_reset, training, repeat, residual_storage, check, *_sources):
    x_seq = repeated(x, repeat) if repeat else x
    checkpoints = membrane_checkpoints(x_seq)
    packed = _no_bytes(x) if residual is None or not residual_storage else \
        x.new_empty(spike_storage.packed_size(residual.numel(), residual_storage), dtype=torch.uint8)
    return time_major_like(x_seq), empty_f32(x) if checkpoints is None else checkpoints, packed


def _no_bytes(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.uint8)


@torch.library.custom_op("fastsnn::bn_neuron_backward", mutates_args=())
def _bn_neuron_backward_op(grad_spikes: Tensor, x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
                           stats: Tensor, checkpoints: Tensor, residual_weight: Optional[Tensor],
                           residual_stats: Optional[Tensor], rate: Optional[Tensor], kind: str, tau: float,
                           v_threshold: float, v_reset: Optional[float], surrogate: str, alpha: float,
                           detach_reset: bool, training: bool, repeat: int,
                           needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of x, weight, bias, residual, the residual's BatchNorm weight and bias (with residual_stats)
    and rate, empty where `needs` says not needed or the input is absent (a fixed tuple: Inductor takes no list
    output whose elements the graph returns as they are)."""
    spec = NeuronSpec(kind, tau, v_threshold, v_reset, surrogate, alpha, detach_reset)
    residual_bn = None if residual_stats is None else (residual_stats, residual_weight)
    *grads, grad_rate = _backward_impl(grad_spikes, x, weight, residual, stats,
                                       checkpoints if checkpoints.numel() else None, spec, training, repeat, needs,
                                       residual_bn=residual_bn, rate=rate)
    grads = (grads + [None, None])[:6] + [grad_rate]
    return tuple(empty_f32(x) if g is None else g for g in grads)


@_bn_neuron_backward_op.register_fake
def _(grad_spikes, x, weight, residual, stats, checkpoints, residual_weight, residual_stats, rate, kind, tau,
      v_threshold, v_reset, surrogate, alpha, detach_reset, training, repeat, needs):
    x_seq = repeated(x, repeat) if repeat else x
    def channel():
        return torch.empty_like(stats[0])
    if residual_stats is None:
        grads = (time_major_like(x), channel(), channel(), time_major_like(x_seq))
    else:
        grads = (time_major_like(x), channel(), channel(), time_major_like(x_seq, dtype=residual.dtype), channel(),
                 channel())
    grads = [g if need else empty_f32(x) for g, need in zip(grads, needs)]
    grads += [empty_f32(x)] * (6 - len(grads))
    return tuple(grads + [empty_f32(x) if rate is None else torch.empty_like(rate)])


def _setup_context(ctx, inputs, output):
    a = _FIRE_ARGS.bind(inputs)
    x, weight, residual, r_weight, r_stats = (a[k] for k in ("x", "weight", "residual", "residual_weight",
                                                              "residual_stats"))
    ctx.params = _FIRE_ARGS.values(a, SPEC_FIELDS)
    ctx.training, ctx.repeat, storage = a["training"], a["repeat"], a["residual_storage"]
    ctx.has = tuple(a[k] is not None for k in ("weight", "bias", "residual", "residual_weight", "residual_bias"))
    ctx.residual_bn = r_stats is not None
    ctx.residual_storage = storage if residual is not None else None
    sources = None
    if a["sources"] is not None:
        sources = recompute.decoded_pair(a["sources"], (a["x_kept"], a["x_conv_weight"], a["x_conv_bias"]),
                                         (a["residual_kept"], a["residual_conv_weight"], a["residual_conv_bias"]))
    ctx.sources, x, r_kept, kept = _keep(sources, x, residual)
    if ctx.residual_storage:
        ctx.residual_layout = spike_storage.layout(residual)
        r_kept = output[2]
    ctx.save_for_backward(x, weight, r_kept, a["stats"], output[1], r_weight, r_stats, a["rate"], *kept)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_spikes, _checkpoints, _packed):
    x, weight, residual, stats, checkpoints, r_weight, r_stats, rate, *kept = ctx.saved_tensors
    x, residual = _restore(ctx.sources, x, residual, kept, as_op=True)
    if ctx.residual_storage:
        residual = spike_storage.unpack_op(residual, *ctx.residual_layout, ctx.residual_storage)
    wanted = _GRADIENTS[:4] + (_GRADIENTS[4:] if ctx.residual_bn else ())
    needs = [bool(ctx.needs_input_grad[_FIRE_ARGS.index(n)]) and h for n, h in zip(wanted, (True,) + ctx.has)]
    *grads, grad_rate = _bn_neuron_backward_op(grad_spikes, x, weight, residual, stats, checkpoints, r_weight,
                                               r_stats, rate, *ctx.params, ctx.training, ctx.repeat, needs)
    g = {name: grad for name, grad, need in zip(wanted, grads, needs) if need}
    likes = {"weight": weight, "residual": residual, "residual_weight": r_weight}
    return _FIRE_ARGS.grads(**{name: _cast(grad, likes[name]) if name in likes else grad for name, grad in g.items()},
                            rate=None if rate is None else grad_rate)


# the fused op's inputs with a gradient, in the order of bn_neuron_backward's outputs (rate's comes last)
_GRADIENTS = ("x", "weight", "bias", "residual", "residual_weight", "residual_bias")


torch.library.register_autograd("fastsnn::bn_neuron_fire", _backward, setup_context=_setup_context)


def _compiled(x, weight, bias, residual, running_mean, running_var, spec, training, momentum, eps, repeat,
              residual_storage, check, residual_bn=None, rate=None, sources=None):
    """The op as custom ops for torch.compile: statistics (mutating the running ones; the residual's too when
    residual_bn normalises it), then fire."""
    detached = [None if t is None else t.detach() for t in (x, weight, bias)]
    stats = _statistics_op(*detached, running_mean, running_var, training, momentum, eps, repeat)
    r_weight = r_bias = r_stats = None
    if residual_bn is not None:
        r_weight, r_bias, r_running_mean, r_running_var = residual_bn
        r_stats = _statistics_op(*[None if t is None else t.detach() for t in (residual, r_weight, r_bias)],
                                 r_running_mean, r_running_var, training, momentum, eps, 0)
    spikes, _, _ = _bn_fire_op(x, weight, bias, residual, stats, r_weight, r_bias, r_stats, rate, *spec_args(spec),
                               training, repeat, residual_storage, check, *recompute.encoded_pair(sources))
    return spikes


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
                    backend: str = "auto", w: Tensor | None = None, source=None, residual_source=None) -> Tensor:
    """spikes [T, B, C, ...] of the neuron `spec` over BN(x) [+ residual, or + BN_r(residual) with residual_bn]
    (see bn_lif); w: a parametric neuron's weight; source, residual_source: ConvSources to recompute x and the
    residual from (fastsnn.ops.recompute). The spec is trusted."""
    momentum, eps, common = _check(op, x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                                   repeat)
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
                                          repeat=repeat, rate=rate)
    vectors = (weight, bias, running_mean, running_var) + (residual_bn or ())
    copies = () if common and residual_bn is None else _dense_vectors(vectors)  # common: x's vectors are dense
    if copies and any(t is not None for t in copies):  # a strided or expanded vector: the kernels take dense copies
        used = tuple(t if c is None else c for t, c in zip(vectors, copies))
        spikes = apply_bn_neuron(op, x, *used[:4], spec, training=training, momentum=momentum, eps=eps,
                                 residual=residual, residual_storage=residual_storage,
                                 residual_bn=used[4:] or None, repeat=repeat, backend=backend, w=w, source=source,
                                 residual_source=residual_source)
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
    if torch.compiler.is_compiling():
        return _compiled(x, weight, bias, residual, running_mean, running_var, spec, training, momentum, eps,
                         repeat or 0, residual_storage, check, residual_bn, rate, sources)
    call = _call(spec, training, momentum, eps, repeat or 0, residual_storage, check)
    if residual_bn is not None:
        return _BNResidualBNFunction.apply(x, weight, bias, residual, running_mean, running_var, *residual_bn, rate,
                                           call, sources)
    return _BNNeuronFunction.apply(x, weight, bias, residual, running_mean, running_var, rate, call, sources)


def bn_lif(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
           running_var: Tensor | None, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
           residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
           tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
           v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
           detach_reset: bool = False, repeat: int | None = None, backend: str = "auto", source=None,
           residual_source=None) -> Tensor:
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
                           residual_source=residual_source)


def bn_if(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
          residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
          v_threshold: float = 1.0, v_reset: float | None = 0.0,
          surrogate: str = "atan", alpha: float | None = None, detach_reset: bool = False,
          repeat: int | None = None, backend: str = "auto", source=None, residual_source=None) -> Tensor:
    """bn_lif with the integrate-and-fire neuron (charge h = v + y): same arguments without tau, decay_input."""
    op = "bn_if"
    spec = neuron_spec(op, kind="if", tau=None, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                       alpha=alpha, detach_reset=detach_reset)
    return apply_bn_neuron(op, x, weight, bias, running_mean, running_var, spec, training=training,
                           momentum=momentum, eps=eps, residual=residual, residual_storage=residual_storage,
                           residual_bn=residual_bn, repeat=repeat, backend=backend, source=source,
                           residual_source=residual_source)


def bn_plif(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, w: Tensor, *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
            residual: Tensor | None = None, residual_storage: str | None = None, residual_bn=None,
            decay_input: bool = True, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
            alpha: float | None = None, detach_reset: bool = False, repeat: int | None = None,
            backend: str = "auto", source=None, residual_source=None) -> Tensor:
    """bn_lif with the parametric LIF neuron (fastsnn.plif_multistep: rate k = sigmoid(w), w one learnable
    element): same arguments with w in place of tau. dL/dw comes from the backward kernel's per-program partial
    sums and one sum."""
    op = "bn_plif"
    spec = neuron_spec(op, kind=kind_of(decay_input, op, parametric=True), tau=2.0, v_threshold=v_threshold,
                       v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
    return apply_bn_neuron(op, x, weight, bias, running_mean, running_var, spec, training=training,
                           momentum=momentum, eps=eps, residual=residual, residual_storage=residual_storage,
                           residual_bn=residual_bn, repeat=repeat, backend=backend, w=w, source=source,
                           residual_source=residual_source)
