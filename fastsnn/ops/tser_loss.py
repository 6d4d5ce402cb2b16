"""The TSER distillation loss: input checks, backend dispatch, and the Triton path.

The op is declared once (TSER_LOSS; fastsnn.ops._declare): eager calls run the autograd Function derived from
it, torch.compile the derived torch.library custom ops (with fake kernels), so the graph traces without a
break.
The forward saves z, u, y and O(T·B) fp32 statistics; the backward recomputes grad_output·dL/dz.
The reference backend is plain PyTorch autograd.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._declare import Host, Op
from .. import reference
from ._layout import LazyKernels
from ..backend import (BACKENDS, FLOAT_DTYPES, check_float_tensor, check_number, check_same_device,
                       resolve_backend, tracing)

_OP = "tser_loss"
# τ (and τ_H) outside this range lose the loss to fp32 cancellation: KL·τ² is a difference of log-sum-exps
# of size log C multiplied by τ² (at τ = 1e4 the kernel and an fp64 formula differ in the 2nd digit)
TAU_RANGE = (0.05, 100.0)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


_kernels = LazyKernels("tser_loss")  # imported on first use: importing fastsnn does not import Triton


# ---- the op, declared once (fastsnn.ops._declare): its eager Function and its custom ops are derived ----

def _forward(z: Tensor, u: Tensor, y: Tensor, with_entropy: bool, alpha: float, tau: float, lam: float, ts_ce: bool,
             ts_kl: bool, entropy_tau: float, ignore_index: int, plan: Host = None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, terms, stats): 2 kernel launches, nothing initialised on the host; stats is the backward's.

    Eager, the launch plan comes decided (the backward reuses it) and the three are one allocation
    [stats | loss | terms] (views of it), terms None unless asked for (with_entropy): autograd then handles one
    output. Compiled (plan None), a custom op's outputs may not alias and stats is sized as the fake kernel sizes
    it, from T and B alone: three allocations, every output returned."""
    k = _kernels
    compiled = plan is None
    if compiled:
        plan = k.launch_plan(z, u, y, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, with_entropy)
        T, B, _ = z.shape
        stats = z.new_empty(k.stats_size_bound(T, B), dtype=torch.float32)
        loss, terms = stats.new_empty(()), stats.new_empty(3)
    else:
        size = plan.stats_size
        stats = z.new_empty(size + 4, dtype=torch.float32)
        loss, terms = stats[size], stats[size + 1:]
    k.tser_loss_forward(z, u, y, stats, loss, terms, plan)
    return loss, (terms if compiled or with_entropy else None), stats


def _forward_fake(z, u, y, with_entropy, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, plan):
    T, B, C = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    return (torch.empty((), **f32), torch.empty(3, **f32),
            torch.empty(_kernels.stats_size_bound(T, B), **f32))


def _save(ctx, a, outputs):
    ctx.params = a[_SETTINGS]  # the backward's settings and the plan (None when compiled)
    ctx.save_for_backward(a.z, a.u, a.y, outputs[2])
    if a.plan is None:  # the custom op returns every output; eager, stats is not returned, terms only if asked for
        ctx.mark_non_differentiable(outputs[1], outputs[2])
    elif outputs[1] is not None:
        ctx.mark_non_differentiable(outputs[1])


def _backward(grad_loss: Tensor, z: Tensor, u: Tensor, y: Tensor, stats: Tensor, alpha: float, tau: float,
              lam: float, ts_ce: bool, ts_kl: bool, entropy_tau: float, ignore_index: int,
              plan: Host = None) -> Tensor:
    """grad_output·dL/dz, dense (whatever z's strides), in z's dtype: one launch (grad_loss is 0-d), with the
    forward's plan where it has one."""
    if plan is None:
        plan = _kernels.launch_plan(z, u, y, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, False)
    grad_z = z.new_empty(z.shape)
    _kernels.tser_loss_backward(z, u, y, stats, grad_loss, grad_z, plan)
    return grad_z


def _backward_fake(grad_loss, z, u, y, stats, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index, plan):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


def _formula(ctx, backward, grad_loss, _grad_terms, _grad_stats):
    z, u, y, stats = ctx.saved_tensors
    return (backward(grad_loss, z, u, y, stats, *ctx.params),)


TSER_LOSS = Op("tser_loss", _forward, fake=_forward_fake, save=_save, backward=_backward,
               backward_fake=_backward_fake, formula=_formula, differentiable=("z",), internal=1)
_SETTINGS = TSER_LOSS.args.span("alpha", "plan")  # what the backward takes after the tensors


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
    if target.dtype in FLOAT_DTYPES:  # soft targets: a probability row per sample
        if target.shape != (B, C):
            raise ValueError(f"{_OP}: a float target holds soft targets (probabilities) of shape [B, C] = [{B}, {C}], "
                             f"got {tuple(target.shape)}")
    elif target.dtype not in TARGET_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in TARGET_DTYPES)
        raise TypeError(f"{_OP}: target must be an integer tensor of class indices ({allowed}) or a float tensor of "
                        f"soft targets [B, C] (float32, float16, bfloat16), got dtype "
                        f"{str(target.dtype).replace('torch.', '')}")
    elif target.shape != (B,):
        raise ValueError(f"{_OP}: target must have shape [B] = [{B}], got {tuple(target.shape)}")
    return check_same_device(_OP, student_logits=student_logits, teacher_logits=teacher_logits, target=target)


def _check_soft_targets_on_host(target: Tensor) -> None:
    """On the CPU a soft target with a negative or non-finite entry is an error; on CUDA (no sync) the loss takes
    it as given."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(target) | (target < 0)
    if bool(bad.any()):
        raise ValueError(f"{_OP}: a soft target must hold probabilities (finite, >= 0), got {int(bad.sum())} "
                         f"entries that are not (the first: {float(target[bad][0])})")


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
        target: [B] class indices, any integer dtype (int8/16/32/64, uint8) and stride; or soft targets
            [B, C] (fp32/fp16/bf16, any strides; mixup/CutMix, label smoothing): rows of probabilities q, with
            CE(z, q) = −Σ_c q_c·log softmax(z)_c (= Σq·lse(z) − Σ_c q_c·z_c, also for a row that does not
            sum to 1; a class with q_c = 0 adds nothing, a −inf logit included), every sample counted; a
            negative or non-finite entry raises ValueError on the CPU. For class indices: a sample labelled
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
    soft = target.dtype in FLOAT_DTYPES
    if soft:
        target = _unit_class_stride(target.detach() if target.requires_grad else target)
        if not student_logits.is_cuda:
            _check_soft_targets_on_host(target)
    elif not student_logits.is_cuda:
        _check_labels_on_host(target, student_logits.shape[2], ignore_index)
    bf16 = torch.bfloat16  # the dtype that decides the backend under the interpreter
    dtype = bf16 if not student_logits.is_cuda and bf16 in (student_logits.dtype, teacher_logits.dtype,
                                                             target.dtype) else None
    if resolve_backend(_OP, backend, device, dtype) == "reference":
        return reference.tser_loss(student_logits, teacher_logits, target, alpha=alpha, tau=tau, lam=lam,
                                   ts_ce=ts_ce, ts_kl=ts_kl, entropy_tau=entropy_tau, ignore_index=ignore_index,
                                   return_terms=return_terms)
    z = _unit_class_stride(student_logits)
    u = _unit_class_stride(teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits)
    if torch.compiler.is_compiling():
        loss, terms, _ = TSER_LOSS.op(z, u, target, bool(return_terms), alpha, tau, lam, ts_ce, ts_kl,
                                      tau if entropy_tau is None else entropy_tau, ignore_index)
    else:
        settings = (alpha, tau, lam, ts_ce, ts_kl, tau if entropy_tau is None else entropy_tau, ignore_index)
        with_entropy = bool(return_terms)
        plan = _kernels.launch_plan(z, u, target, *settings, with_entropy)  # for the forward and the backward
        outputs = TSER_LOSS.Function.apply(z, (u, target, with_entropy, *settings, plan))
        if not return_terms:  # one output (see _forward)
            return outputs[0]
        loss, terms = outputs
    if return_terms:
        return loss, {"ce": terms[0], "kl": terms[1], "entropy": terms[2]}
    return loss
