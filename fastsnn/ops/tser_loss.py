"""The TSER distillation loss: input checks, backend dispatch, and the Triton path.

Eager calls run a plain torch.autograd.Function (the least host time per call); under torch.compile the
same launchers run as torch.library custom ops with fake kernels, so the graph traces without a break.
The forward saves z, u, y and O(T·B) fp32 statistics; the backward recomputes grad_output·dL/dz.
The reference backend is plain PyTorch autograd.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
from torch import Tensor

from ._autograd import refused
from ._declare import Args
from .. import reference
from ._layout import kernels_loader
from ..backend import (BACKENDS, FLOAT_DTYPES, check_float_tensor, check_number, check_same_device,
                       resolve_backend, tracing)

_OP = "tser_loss"
# τ (and τ_H) outside this range lose the loss to fp32 cancellation: KL·τ² is a difference of log-sum-exps
# of size log C multiplied by τ² (at τ = 1e4 the kernel and an fp64 formula differ in the 2nd digit)
TAU_RANGE = (0.05, 100.0)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class LossSpec:
    """The loss's scalar arguments, validated (see tser_loss)."""
    alpha: float
    tau: float
    lam: float
    ts_ce: bool
    ts_kl: bool
    entropy_tau: float
    ignore_index: int
    with_entropy: bool  # compute the entropy term even when lam == 0 (for return_terms)

    def kernel_kwargs(self) -> dict:
        """The launchers' keyword arguments, built once per spec (they are read on every call)."""
        kwargs = self.__dict__.get("_kwargs")
        if kwargs is None:
            kwargs = dict(alpha=self.alpha, tau=self.tau, tau_h=self.entropy_tau, lam=self.lam, ts_ce=self.ts_ce,
                          ts_kl=self.ts_kl, ignore_index=self.ignore_index)
            object.__setattr__(self, "_kwargs", kwargs)
        return kwargs


_kernels = kernels_loader("tser_loss")  # imported on first use: importing fastsnn does not import Triton


def _forward_impl(z: Tensor, u: Tensor, y: Tensor, spec: LossSpec, one_buffer: bool = True):
    """(loss, terms, stats): 2 kernel launches, nothing initialised on the host. With one_buffer (eager) the
    three are one allocation, [stats | loss | terms] (the loss and terms views of it); a custom op's outputs
    may not alias, so there they are three."""
    k = _kernels()
    T, B, C = z.shape
    if one_buffer:
        size = k.stats_size(T, B, C, spec.ts_ce, spec.ts_kl)
        stats = z.new_empty(size + 4, dtype=torch.float32)
        loss, terms = stats[size], stats[size + 1:]
    else:  # sized as the fake kernel can size it, from T and B alone
        stats = z.new_empty(k.stats_size_bound(T, B), dtype=torch.float32)
        loss, terms = stats.new_empty(()), stats.new_empty(3)
    k.tser_loss_forward(z, u, y, stats, loss, terms, with_entropy=spec.with_entropy, **spec.kernel_kwargs())
    return loss, terms, stats


def _backward_impl(grad_loss: Tensor, z: Tensor, u: Tensor, y: Tensor, stats: Tensor, spec: LossSpec) -> Tensor:
    grad_z = z.new_empty(z.shape)  # dense, whatever z's strides
    _kernels().tser_loss_backward(z, u, y, stats, grad_loss, grad_z, **spec.kernel_kwargs())
    return grad_z


def _forward_and_save(ctx, z: Tensor, u: Tensor, y: Tensor, spec: LossSpec):
    """Either Function's forward: (loss, terms), the backward's tensors saved."""
    loss, terms, stats = _forward_impl(z, u, y, spec)
    ctx.save_for_backward(z, u, y, stats)
    ctx.spec = spec
    return loss, terms


class _TSERLossFunction(torch.autograd.Function):
    """Returns (loss, terms); the terms are not differentiable."""

    @staticmethod
    def forward(ctx, z, u, y, spec):
        loss, terms = _forward_and_save(ctx, z, u, y, spec)
        ctx.mark_non_differentiable(terms)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the terms
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, grad_terms):
        grads = _loss_backward(ctx, grad_loss), None, None, None
        return refused("tser_loss", grads) if torch.is_grad_enabled() else grads


class _TSERLossOnly(torch.autograd.Function):
    """The common call (no terms returned), on the shortest host path: one output, the same launches."""

    @staticmethod
    def forward(ctx, z, u, y, spec):
        return _forward_and_save(ctx, z, u, y, spec)[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grads = _loss_backward(ctx, grad_loss), None, None, None
        return refused("tser_loss", grads) if torch.is_grad_enabled() else grads


def _loss_backward(ctx, grad_loss: Tensor) -> Tensor:
    """grad_z of either Function (grad_loss is 0-d: autograd checks it has the loss's shape)."""
    z, u, y, stats = ctx.saved_tensors
    return _backward_impl(grad_loss, z, u, y, stats, ctx.spec)


# ---- the same launchers as custom ops, for torch.compile ----

def _spec(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, with_entropy) -> LossSpec:
    return LossSpec(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, with_entropy)


@torch.library.custom_op("fastsnn::tser_loss_forward", mutates_args=())
def _tser_loss_forward_op(z: Tensor, u: Tensor, y: Tensor, alpha: float, tau: float, lam: float, ts_ce: bool,
                          ts_kl: bool, entropy_tau: float, ignore_index: int,
                          with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    spec = _spec(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, with_entropy)
    return _forward_impl(z, u, y, spec, one_buffer=False)


@_tser_loss_forward_op.register_fake
def _(z, u, y, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, with_entropy):
    T, B, C = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    return (torch.empty((), **f32), torch.empty(3, **f32),
            torch.empty(_kernels().stats_size_bound(T, B), **f32))


@torch.library.custom_op("fastsnn::tser_loss_backward", mutates_args=())
def _tser_loss_backward_op(grad_loss: Tensor, z: Tensor, u: Tensor, y: Tensor, stats: Tensor, alpha: float,
                           tau: float, lam: float, ts_ce: bool, ts_kl: bool, entropy_tau: float,
                           ignore_index: int) -> Tensor:
    spec = _spec(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, False)
    return _backward_impl(grad_loss, z, u, y, stats, spec)


@_tser_loss_backward_op.register_fake
def _(grad_loss, z, u, y, stats, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


_FORWARD_ARGS = Args(_tser_loss_forward_op._init_fn)
# the loss settings the backward takes (with_entropy is the forward's only)
_SPEC_NAMES = tuple(n for n in Args(_tser_loss_backward_op._init_fn).names if n not in ("grad_loss", "z", "u", "y",
                                                                                         "stats"))


def _setup_context(ctx, inputs, output):
    a = _FORWARD_ARGS.bind(inputs)
    ctx.params = _FORWARD_ARGS.values(a, _SPEC_NAMES)
    ctx.save_for_backward(a.z, a.u, a.y, output[2])
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    z, u, y, stats = ctx.saved_tensors
    return _FORWARD_ARGS.grads(z=_tser_loss_backward_op(grad_loss, z, u, y, stats, *ctx.params))


torch.library.register_autograd("fastsnn::tser_loss_forward", _backward, setup_context=_setup_context)


# ---- checks and the public function ----

def _check_tensors(student_logits, teacher_logits, target):
    z, u, y = student_logits, teacher_logits, target
    if (type(z) is Tensor and type(u) is Tensor and type(y) is Tensor and z.dim() == 3 and 0 not in z.shape
            and z.dtype in FLOAT_DTYPES and u.dtype in FLOAT_DTYPES and y.dtype in TARGET_DTYPES
            and u.shape == z.shape[1:] and y.shape == z.shape[1:2]):
        device = z.device  # the common case, checked in one expression
        if u.device == device and y.device == device:
            return device
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if student_logits.dim() != 3:
        raise ValueError(f"{_OP}: student_logits must have shape [T, B, C], got {tuple(student_logits.shape)}")
    T, B, C = student_logits.shape
    if min(T, B, C) == 0:
        raise ValueError(f"{_OP}: student_logits must have T, B and C >= 1, got shape {tuple(student_logits.shape)}")
    check_float_tensor(_OP, "student_logits", student_logits)
    check_float_tensor(_OP, "teacher_logits", teacher_logits)
    if teacher_logits.shape != (B, C):
        raise ValueError(f"{_OP}: teacher_logits must have shape [B, C] = [{B}, {C}] to match student_logits "
                         f"[T, B, C], got {tuple(teacher_logits.shape)}")
    if target.dtype not in TARGET_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in TARGET_DTYPES)
        raise TypeError(f"{_OP}: target must be an integer tensor of class indices ({allowed}), "
                        f"got dtype {str(target.dtype).replace('torch.', '')}")
    if target.shape != (B,):
        raise ValueError(f"{_OP}: target must have shape [B] = [{B}], got {tuple(target.shape)}")
    return check_same_device(_OP, student_logits=student_logits, teacher_logits=teacher_logits, target=target)


def _check_labels_on_host(target: Tensor, C: int, ignore_index: int) -> None:
    """On the CPU a bad label is an error (a sync costs nothing there); on CUDA it turns the loss NaN."""
    rule = f"{_OP}: target must hold class indices in [0, {C}) or ignore_index={ignore_index}"
    labels = target.long()
    if torch.compiler.is_compiling():  # traced: the same check as a graph op
        torch._assert_async(((labels == ignore_index) | ((labels >= 0) & (labels < C))).all(), rule)
        return
    counted = labels[labels != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= C):
        raise ValueError(f"{rule}, got min {int(counted.min())} and max {int(counted.max())}")


def check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend, ignore_index=-100):
    """Validates the loss's scalar arguments; returns (alpha, tau, lam, entropy_tau) as floats. Memoised for
    hashable arguments (a call validates once per distinct set of arguments)."""
    if not tracing():
        try:
            return _checked_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend, ignore_index)
        except TypeError as e:
            if "unhashable" not in str(e):
                raise
    return _check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend, ignore_index)


def _check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend, ignore_index):
    alpha = check_number(_OP, "alpha", alpha, low=0.0, high=1.0, rule="in [0, 1]")
    low, high = TAU_RANGE
    tau = check_number(_OP, "tau", tau, low=low, high=high, rule=f"a number in [{low}, {high}]")
    lam = check_number(_OP, "lam", lam, low=0.0, rule="a finite number >= 0")
    if entropy_tau is not None:
        entropy_tau = check_number(_OP, "entropy_tau", entropy_tau, low=low, high=high,
                                   rule=f"a number in [{low}, {high}], or None to use tau")
    for name, flag in (("ts_ce", ts_ce), ("ts_kl", ts_kl)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be True or False, got {flag!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int (a label value CE skips), got {ignore_index!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")
    return alpha, tau, lam, entropy_tau


_checked_loss_params = functools.lru_cache(maxsize=256, typed=True)(_check_loss_params)
# one LossSpec object per distinct set of (validated) arguments, so its kernel_kwargs are built once
_loss_spec = functools.lru_cache(maxsize=256)(LossSpec)


def _unit_class_stride(t: Tensor) -> Tensor:
    """t itself when its classes are adjacent in memory (any other strides, 0 included), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def tser_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, alpha: float = 0.5,
              tau: float = 5.0, lam: float = 0.01, ts_ce: bool = True, ts_kl: bool = True,
              entropy_tau: float | None = None, ignore_index: int = -100, return_terms: bool = False,
              backend: str = "auto"):
    """TSER distillation loss (paper eq. 11) and its ablations, fused in Triton kernels.

        L = (1−α)·CE_part + α·τ²·KL_part − λ·(1/T)·Σ_t H(softmax(z_t/τ_H))

    with z_t = student_logits[t], u = teacher_logits, y = target, z̄ = mean_t z_t and
        CE_part = (1/T)·Σ_t CE(z_t, y)                          if ts_ce else CE(z̄, y)
        KL_part = (1/T)·Σ_t KL(softmax(u/τ) ‖ softmax(z_t/τ))    if ts_kl else KL(softmax(u/τ) ‖ softmax(z̄/τ))
    Conventions where the paper is silent: KL is multiplied by τ² (Hinton's convention), CE uses
    temperature 1, the entropy uses τ_H = entropy_tau (default: τ), every term is averaged over the batch.
    ts_ce = ts_kl = True with lam > 0 is TSER (eq. 11); lam = 0 is TS (eq. 8); both False with lam = 0 is
    classic SNN KD (eq. 7). Too large a lam drives the loss negative; the paper's useful range is
    [0.0001, 0.2], with τ = 5.

    Args:
        student_logits: [T, B, C] fp32/fp16/bf16, any strides (read in place when the classes are
            adjacent, else copied).
        teacher_logits: [B, C], any of those dtypes; never receives a gradient.
        target: [B] class indices, any integer dtype (int8/16/32/64, uint8) and stride. A sample labelled
            ignore_index (default −100, as F.cross_entropy) is left out of CE, whose batch mean then runs
            over the labelled samples (0 if none); it still counts for KL and entropy. Any other label
            outside [0, C) raises ValueError on the CPU and, on CUDA (no host sync), makes the loss, the
            terms and the gradient NaN.
        tau, entropy_tau: temperatures in [0.05, 100] (beyond that fp32 cancellation in KL·τ² dominates).
        return_terms: also return {"ce", "kl", "entropy"}: detached fp32 batch means of CE_part,
            KL_part (without τ²) and (1/T)·Σ_t H.
        backend: "auto", "triton" or "reference" (see fastsnn.lif_multistep).
    Returns:
        the fp32 scalar loss, or (loss, terms) with return_terms.
    Cost: 2 kernel launches forward, 1 backward. Saved for backward: z, u and y by reference plus one fp32
    buffer (which also holds the returned loss and terms): 16 bytes per (t, b) row, per sample and per (time
    tile, sample), and 20 bytes; the backward writes grad_output·dL/dz in z's dtype from fp32 arithmetic.
    """
    device = _check_tensors(student_logits, teacher_logits, target)
    alpha, tau, lam, entropy_tau = check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend,
                                                     ignore_index)
    if not student_logits.is_cuda:
        _check_labels_on_host(target, student_logits.shape[2], ignore_index)
    bf16 = torch.bfloat16  # the dtype that decides the backend under the interpreter
    dtype = bf16 if not student_logits.is_cuda and bf16 in (student_logits.dtype, teacher_logits.dtype) else None
    if resolve_backend(_OP, backend, device, dtype) == "reference":
        return reference.tser_loss(student_logits, teacher_logits, target, alpha=alpha, tau=tau, lam=lam,
                                   ts_ce=ts_ce, ts_kl=ts_kl, entropy_tau=entropy_tau, ignore_index=ignore_index,
                                   return_terms=return_terms)
    z = _unit_class_stride(student_logits)
    u = _unit_class_stride(teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits)
    compiling = torch.compiler.is_compiling()
    spec = (LossSpec if compiling else _loss_spec)(alpha, tau, lam, ts_ce, ts_kl,
                                                   tau if entropy_tau is None else entropy_tau, ignore_index,
                                                   bool(return_terms))  # Dynamo does not trace the cache
    if compiling:
        loss, terms, *_ = _tser_loss_forward_op(z, u, target, spec.alpha, spec.tau, spec.lam, spec.ts_ce,
                                                spec.ts_kl, spec.entropy_tau, spec.ignore_index, spec.with_entropy)
    elif return_terms:
        loss, terms = _TSERLossFunction.apply(z, u, target, spec)
    else:
        return _TSERLossOnly.apply(z, u, target, spec)
    if return_terms:
        return loss, {"ce": terms[0], "kl": terms[1], "entropy": terms[2]}
    return loss
