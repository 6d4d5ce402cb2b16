"""Plain PyTorch of every fastsnn op, written from the formulas (the TSER paper, eq. 1-11; SpikingJelly's LIF).

Used by the tests and benchmarks as the oracle, and by the ops as their CPU path. Differentiable with
ordinary autograd; nothing here is fast.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .spec import NeuronSpec
from .surrogate import SURROGATES


class _HeavisideSurrogate(torch.autograd.Function):
    """Forward Θ(u) = [u ≥ 0]; backward multiplies by the surrogate derivative g'(u)."""

    @staticmethod
    def forward(ctx, u, spec: NeuronSpec):
        ctx.save_for_backward(u)
        ctx.spec = spec
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike):
        (u,) = ctx.saved_tensors
        return grad_spike * ctx.spec.surrogate_grad(u), None


def lif_multistep(x, spec: NeuronSpec | None = None, *, v_init=None, return_v=False, compute_dtype=torch.float32,
                  neuron="lif", tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate="atan",
                  alpha=None, detach_reset=False, rate=None):
    """The multistep neuron `spec` over x[T, ...], computed in `compute_dtype` (without a spec, one is made,
    unvalidated, from the keyword arguments: neuron "lif" or "if", tau, decay_input, ...).

    charge  lif: h = v + (x − (v − v_reset)) / tau;  lif_no_decay: h = v − (v − v_reset)/tau + x;  if: h = v + x
            plif: h = v + (x − (v − v_reset))·k;  plif_no_decay: h = v − (v − v_reset)·k + x,  k = `rate` (a
            tensor, e.g. sigmoid(w): its gradient is autograd's)
    fire    s = Θ(h − v_threshold)
    reset   hard: v = v_reset·s + h·(1 − s);  soft (v_reset=None): v = h − v_threshold·s
    Returns spikes in x's dtype, and with return_v the final membrane in fp32 as well.
    """
    if spec is None:
        kind = "if" if neuron == "if" else "lif" if decay_input else "lif_no_decay"
        spec = NeuronSpec(kind, tau, v_threshold, v_reset, surrogate,
                          SURROGATES[surrogate].default_alpha if alpha is None else alpha, detach_reset)
    xc = x.to(compute_dtype)
    v = torch.full_like(xc[0], spec.v_rest) if v_init is None else v_init.to(compute_dtype)
    spikes = []
    for t in range(x.shape[0]):
        if spec.kind == "if":
            h = v + xc[t]
        elif spec.kind == "lif":
            h = v + (xc[t] - (v - spec.v_rest)) / spec.tau
        elif spec.kind == "lif_no_decay":
            h = v - (v - spec.v_rest) / spec.tau + xc[t]
        elif spec.kind == "plif":
            h = v + (xc[t] - (v - spec.v_rest)) * rate
        else:  # plif_no_decay
            h = v - (v - spec.v_rest) * rate + xc[t]
        s = _HeavisideSurrogate.apply(h - spec.v_threshold, spec)
        s_reset = s.detach() if spec.detach_reset else s
        if spec.hard_reset:
            v = spec.v_reset * s_reset + h * (1 - s_reset)
        else:
            v = h - spec.v_threshold * s_reset
        spikes.append(s)
    out = torch.stack(spikes).to(x.dtype)
    if return_v:
        return out, v.to(torch.float32)
    return out


def bn_lif_multistep(x, weight, bias, running_mean, running_var, spec: NeuronSpec, *, training, momentum=0.1,
                     eps=1e-5, residual=None, residual_bn=None, repeat=None, compute_dtype=torch.float32, rate=None,
                     process_group=None):
    """BatchNorm over T·B·(spatial) per channel (torch.nn.functional.batch_norm on the folded batch, updating
    the running statistics in training mode), then + residual, then the multistep neuron `spec`.

    x: [T, B, C, *spatial], or with repeat = T one timestep [B, C, *spatial] normalised once and presented
    at every step (its statistics are those of that timestep). residual_bn: (weight, bias, running_mean,
    running_var) of a BatchNorm applied to the residual first (same training, momentum, eps). process_group: in
    training mode, the statistics span the batches of its ranks (synchronised BatchNorm; see _sync_batch_norm).
    """
    folded = x if repeat else x.flatten(0, 1)
    norm = _batch_norm if process_group is None or not training else partial(_sync_batch_norm, group=process_group)
    y = norm(folded, weight, bias, running_mean, running_var, training, momentum, eps, compute_dtype)
    y = y.unsqueeze(0).expand(repeat, *y.shape) if repeat else y.unflatten(0, x.shape[:2])
    if residual is not None and residual_bn is not None:
        r_weight, r_bias, r_running_mean, r_running_var = residual_bn
        residual = norm(residual.flatten(0, 1), r_weight, r_bias, r_running_mean, r_running_var, training,
                        momentum, eps, compute_dtype).unflatten(0, residual.shape[:2])
    if residual is not None:
        y = y + residual.to(compute_dtype)
    return lif_multistep(y, spec, compute_dtype=compute_dtype, rate=rate).to(x.dtype)


def _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, compute_dtype):
    """F.batch_norm in compute_dtype (any mix of argument dtypes), the running statistics updated in place."""
    def up(t):
        return None if t is None else t.to(compute_dtype)
    running = [up(running_mean), up(running_var)]
    y = F.batch_norm(up(x), *running, up(weight), up(bias), training, momentum, eps)
    if training:
        for given, updated in zip((running_mean, running_var), running):
            if given is not None and updated is not given:
                given.copy_(updated)
    return y


def _sync_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, compute_dtype, *, group):
    """Training-mode BatchNorm of x [N, C, ...] whose statistics span every rank of `group`: the per-channel sums
    Σx, Σx² and the count, in fp64, summed over the ranks by a differentiable all_reduce (its backward sums the
    ranks' gradients of those sums, so dL/dx is the global batch's); mean and biased variance normalise, the
    running statistics take the unbiased one. weight and bias get this rank's gradient (DDP sums the ranks')."""
    from torch.distributed.nn.functional import all_reduce

    C = x.shape[1]
    dims = [0, *range(2, x.dim())]
    wide = x.double()
    count = x.new_full((1,), x.numel() // C, dtype=torch.float64)
    total = all_reduce(torch.cat((wide.sum(dims), wide.square().sum(dims), count)), group=group)
    n = total[-1]
    mean = total[:C] / n
    var = (total[C:2 * C] / n - mean.square()).clamp(min=0.0)
    shape = (1, C) + (1,) * (x.dim() - 2)
    y = ((wide - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)).to(compute_dtype)
    if weight is not None:
        y = y * weight.to(compute_dtype).view(shape)
    if bias is not None:
        y = y + bias.to(compute_dtype).view(shape)
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * n / (n - 1).clamp(min=1.0)
            running_mean.mul_(1.0 - momentum).add_((momentum * mean).to(running_mean.dtype))
            running_var.mul_(1.0 - momentum).add_((momentum * unbiased).to(running_var.dtype))
    return y


def tser_loss(student_logits, teacher_logits, target, *, alpha=0.5, tau=5.0, lam=0.01, ts_ce=True, ts_kl=True,
              entropy_tau=None, ignore_index=-100, return_terms=False, compute_dtype=torch.float32):
    """TSER loss (paper eq. 7-11) written from the formulas, in `compute_dtype`.

    L = (1−α)·CE_part + α·τ²·KL_part − λ·(1/T)·Σ_t H(softmax(z_t/τ_H)), each averaged over the batch;
    CE_part and KL_part are time-means of per-timestep terms (ts_ce / ts_kl) or the term of z̄ = mean_t z_t.
    CE(z, y) = logsumexp(z) − z_y; KL(p‖q) = Σ p·(log p − log q); H(q) = −Σ q·log q, with 0·log 0 = 0: a class
    whose logit is −inf (a masked class) has probability 0 and adds nothing.
    Labels equal to ignore_index are left out of CE (averaged over the labelled samples, 0 if none); any
    other label outside [0, C) makes the loss, the terms and the gradient NaN (no host sync). A float target
    [B, C] is a soft target q (mixup/CutMix, label smoothing): CE(z, q) = −Σ_c q_c·log softmax(z)_c, every
    sample labelled.
    """
    z = student_logits.to(compute_dtype)
    u = teacher_logits.detach().to(compute_dtype)
    T, B, C = z.shape
    tau_h = tau if entropy_tau is None else entropy_tau
    if target.is_floating_point():  # soft targets q [B, C]: CE(z, q) = −Σ_c q_c·log softmax(z)_c, 0·log 0 = 0
        q_target = target.to(compute_dtype)
        counts = torch.ones(B, dtype=compute_dtype, device=z.device)
        poison = torch.ones((), dtype=compute_dtype, device=z.device)

        def ce_rows(logits):  # [..., B, C] -> [..., B]
            log_p = F.log_softmax(logits, dim=-1)
            return -(q_target * torch.where(q_target > 0, log_p, 0.0)).sum(dim=-1)
    else:
        y = target.long()
        labelled = y != ignore_index
        in_range = (y >= 0) & (y < C)
        counts = (labelled & in_range).to(compute_dtype)
        poison = torch.where((labelled & ~in_range).any(), float("nan"), 1.0).to(compute_dtype)
        y_index = torch.where(labelled & in_range, y, 0).unsqueeze(-1)

        def ce_rows(logits):  # [..., B, C] -> [..., B]
            index = y_index.expand(*logits.shape[:-1], 1)
            return torch.logsumexp(logits, dim=-1) - logits.gather(-1, index).squeeze(-1)

    log_p_teacher = F.log_softmax(u / tau, dim=-1)
    p_teacher = log_p_teacher.exp()

    def kl_rows(logits):  # KL(softmax(u/τ) ‖ softmax(logits/τ)) per row, 0·log 0 = 0 (a −inf teacher logit)
        log_ratio = torch.where(p_teacher > 0, log_p_teacher - F.log_softmax(logits / tau, dim=-1), 0.0)
        return (p_teacher * log_ratio).sum(dim=-1)

    z_mean = z.mean(dim=0)
    ce_per_sample = ce_rows(z).mean(dim=0) if ts_ce else ce_rows(z_mean)  # [B]
    ce = (ce_per_sample * counts).sum() / counts.sum().clamp(min=1)
    kl_part = (kl_rows(z).mean(dim=0) if ts_kl else kl_rows(z_mean)).mean()
    log_q = F.log_softmax(z / tau_h, dim=-1)
    q = log_q.exp()
    entropy = -(q * torch.where(q > 0, log_q, 0.0)).sum(dim=-1).mean()  # 0·log 0 = 0 (a −inf student logit)
    loss = (1 - alpha) * ce + alpha * tau * tau * kl_part
    if lam > 0:
        loss = loss - lam * entropy
    loss = (loss * poison).to(torch.float32)
    if return_terms:
        terms = {name: (value * poison).detach().float() for name, value in
                 (("ce", ce), ("kl", kl_part), ("entropy", entropy))}
        return loss, terms
    return loss
