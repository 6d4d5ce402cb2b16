"""The TSER distillation loss: input checks, backend dispatch, and the Triton path as torch.library custom
ops with autograd (the forward writes dL/dz; the backward only scales it). The reference backend is plain
PyTorch autograd."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backend import BACKENDS, check_float_tensor, check_number, check_same_device, resolve_backend

_OP = "tser_loss"


def _check_labels(target: Tensor, C: int) -> None:
    if target.numel() == 0:
        return
    if target.device.type == "cuda":
        torch._assert_async(((target >= 0) & (target < C)).all(), f"{_OP}: target must hold class indices in [0, {C})")
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= C:
        raise ValueError(f"{_OP}: target must hold class indices in [0, {C}), got min {low} and max {high}")


def _loss_from_terms(terms: Tensor, alpha: float, tau: float, lam: float) -> Tensor:
    ce, kl, ent = terms.mean(dim=1)
    return (1.0 - alpha) * ce + alpha * tau * tau * kl - lam * ent


@torch.library.custom_op("fastsnn::tser_loss_forward", mutates_args=())
def _tser_loss_forward(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, tau: float,
                       lam: float, ts_ce: bool, ts_kl: bool, entropy_tau: float, with_entropy: bool,
                       compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.tser_loss import tser_loss_forward

    T, B, C = student_logits.shape
    _check_labels(target, C)
    terms = torch.empty(3, B, dtype=torch.float32, device=student_logits.device)
    grad = torch.empty_like(student_logits) if compute_grad else student_logits.new_empty(0)
    tser_loss_forward(student_logits, teacher_logits, target, grad if compute_grad else None, terms, alpha=alpha,
                      tau=tau, tau_h=entropy_tau, lam=lam, ts_ce=ts_ce, ts_kl=ts_kl, with_entropy=with_entropy)
    return _loss_from_terms(terms, alpha, tau, lam), terms.mean(dim=1), grad


@_tser_loss_forward.register_fake
def _(student_logits, teacher_logits, target, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, with_entropy, compute_grad):
    z = student_logits
    return (z.new_empty((), dtype=torch.float32), z.new_empty(3, dtype=torch.float32),
            torch.empty_like(z) if compute_grad else z.new_empty(0))


@torch.library.custom_op("fastsnn::tser_loss_scale_grad_", mutates_args=("grad",))
def _scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    from ..kernels.tser_loss import scale_grad_

    scale_grad_(grad, grad_output.reshape(1).to(torch.float32))


@_scale_grad_.register_fake
def _(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.consumed = False


def _backward(ctx, grad_loss, grad_terms, grad_grad):
    if ctx.consumed:
        raise RuntimeError(f"{_OP}: the backward runs once per forward (its gradient buffer is scaled in place); "
                           "recompute the loss instead of backward(retain_graph=True) twice")
    ctx.consumed = True
    (grad,) = ctx.saved_tensors
    _scale_grad_(grad, grad_loss)
    return (grad,) + (None,) * 10


torch.library.register_autograd("fastsnn::tser_loss_forward", _backward, setup_context=_setup_context)


def _check(student_logits, teacher_logits, target, alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend):
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
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{_OP}: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape != (B,):
        raise ValueError(f"{_OP}: target must have shape [B] = [{B}], got {tuple(target.shape)}")
    check_same_device(_OP, student_logits=student_logits, teacher_logits=teacher_logits, target=target)
    return check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend)


def check_loss_params(alpha, tau, lam, ts_ce, ts_kl, entropy_tau, backend):
    """Validates the loss's scalar arguments; returns (alpha, tau, lam, entropy_tau) as floats."""
    alpha = check_number(_OP, "alpha", alpha, low=0.0, high=1.0, rule="in [0, 1]")
    tau = check_number(_OP, "tau", tau, low=0.0, low_inclusive=False, rule="a finite number > 0")
    lam = check_number(_OP, "lam", lam, low=0.0, rule="a finite number >= 0")
    if entropy_tau is not None:
        entropy_tau = check_number(_OP, "entropy_tau", entropy_tau, low=0.0, low_inclusive=False,
                                   rule="a finite number > 0, or None to use tau")
    for name, flag in (("ts_ce", ts_ce), ("ts_kl", ts_kl)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_OP}: {name} must be True or False, got {flag!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")
    return alpha, tau, lam, entropy_tau


def tser_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, alpha: float = 0.5,
              tau: float = 5.0, lam: float = 0.01, ts_ce: bool = True, ts_kl: bool = True,
              entropy_tau: float | None = None, return_terms: bool = False, backend: str = "auto"):
    """TSER distillation loss (paper eq. 11) and its ablations, fused in one Triton kernel.

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
        student_logits: [T, B, C] fp32/fp16/bf16.
        teacher_logits: [B, C], any of those dtypes; never receives a gradient.
        target: [B] integer class indices in [0, C).
        return_terms: also return {"ce", "kl", "entropy"}: detached fp32 batch means of CE_part,
            KL_part (without τ²) and (1/T)·Σ_t H, from the same kernel launch.
        backend: "auto", "triton" or "reference" (see fastsnn.lif_multistep).
    Returns:
        the fp32 scalar loss, or (loss, terms) with return_terms.
    Memory: the forward writes dL/dz (z's dtype) and keeps only that; the backward scales it by the
    incoming gradient in place (and skips the multiply when that is exactly 1), so it runs once per forward.
    """
    alpha, tau, lam, entropy_tau = _check(student_logits, teacher_logits, target, alpha, tau, lam, ts_ce, ts_kl,
                                          entropy_tau, backend)
    if resolve_backend(_OP, backend, student_logits.device) == "reference":
        return reference.tser_loss(student_logits, teacher_logits, target, alpha=alpha, tau=tau, lam=lam,
                                   ts_ce=ts_ce, ts_kl=ts_kl, entropy_tau=entropy_tau, return_terms=return_terms)
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    u = teacher_logits.detach()
    u = u if u.stride(-1) == 1 else u.contiguous()
    loss, terms, _ = _tser_loss_forward(z, u, target, alpha, tau, lam, ts_ce, ts_kl,
                                        tau if entropy_tau is None else entropy_tau, bool(return_terms),
                                        z.requires_grad and torch.is_grad_enabled())
    if return_terms:
        terms = terms.detach()
        return loss, {"ce": terms[0], "kl": terms[1], "entropy": terms[2]}
    return loss
