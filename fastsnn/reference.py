"""Plain PyTorch of every fastsnn op, written from the formulas (../PAPER.md, SpikingJelly's LIF).

Used by the tests and benchmarks as the oracle, and by the ops as their CPU path. Differentiable with
ordinary autograd; nothing here is fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .surrogate import SURROGATES


class _HeavisideSurrogate(torch.autograd.Function):
    """Forward Θ(u) = [u ≥ 0]; backward multiplies by the surrogate derivative g'(u)."""

    @staticmethod
    def forward(ctx, u, surrogate: str, alpha: float):
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike):
        (u,) = ctx.saved_tensors
        return grad_spike * SURROGATES[ctx.surrogate].grad(u, ctx.alpha), None, None


def lif_multistep(x, *, tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0, surrogate="atan",
                  alpha=None, detach_reset=False, v_init=None, return_v=False, neuron="lif",
                  compute_dtype=torch.float32):
    """Multistep LIF (neuron="lif") or IF (neuron="if") over x[T, ...], computed in `compute_dtype`.

    charge  LIF decay_input: h = v + (x − (v − v_reset)) / tau;  no decay_input: h = v − (v − v_reset)/tau + x
            IF: h = v + x
    fire    s = Θ(h − v_threshold)
    reset   hard: v = v_reset·s + h·(1 − s);  soft (v_reset=None): v = h − v_threshold·s
    Returns spikes in x's dtype, and with return_v the final membrane in fp32 as well.
    """
    alpha = SURROGATES[surrogate].default_alpha if alpha is None else alpha
    v_rest = 0.0 if v_reset is None else v_reset
    xc = x.to(compute_dtype)
    if v_init is None:
        v = torch.full_like(xc[0], v_rest)
    else:
        v = v_init.to(compute_dtype)
    spikes = []
    for t in range(x.shape[0]):
        if neuron == "if":
            h = v + xc[t]
        elif decay_input:
            h = v + (xc[t] - (v - v_rest)) / tau
        else:
            h = v - (v - v_rest) / tau + xc[t]
        s = _HeavisideSurrogate.apply(h - v_threshold, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - v_threshold * s_reset
        else:
            v = v_reset * s_reset + h * (1 - s_reset)
        spikes.append(s)
    out = torch.stack(spikes).to(x.dtype)
    if return_v:
        return out, v.to(torch.float32)
    return out


def tser_loss(student_logits, teacher_logits, target, *, alpha=0.5, tau=5.0, lam=0.01, ts_ce=True, ts_kl=True,
              entropy_tau=None, return_terms=False, compute_dtype=torch.float32):
    """TSER loss (paper eq. 7-11) from log_softmax, kl_div and cross_entropy, in `compute_dtype`.

    L = (1−α)·CE_part + α·τ²·KL_part − λ·(1/T)·Σ_t H(softmax(z_t/τ_H)), each averaged over the batch;
    CE_part and KL_part are time-means of per-timestep terms (ts_ce / ts_kl) or the term of z̄ = mean_t z_t.
    """
    z = student_logits.to(compute_dtype)
    u = teacher_logits.detach().to(compute_dtype)
    T = z.shape[0]
    tau_h = tau if entropy_tau is None else entropy_tau
    log_p_teacher = F.log_softmax(u / tau, dim=-1)
    z_mean = z.mean(dim=0)

    def kl(logits):
        return F.kl_div(F.log_softmax(logits / tau, dim=-1), log_p_teacher, reduction="batchmean", log_target=True)

    if ts_ce:
        ce = torch.stack([F.cross_entropy(z[t], target) for t in range(T)]).mean()
    else:
        ce = F.cross_entropy(z_mean, target)
    kl_part = torch.stack([kl(z[t]) for t in range(T)]).mean() if ts_kl else kl(z_mean)
    log_q = F.log_softmax(z / tau_h, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(dim=-1).mean()
    loss = (1 - alpha) * ce + alpha * tau * tau * kl_part
    if lam > 0:
        loss = loss - lam * entropy
    loss = loss.to(torch.float32)
    if return_terms:
        terms = {"ce": ce.detach().float(), "kl": kl_part.detach().float(), "entropy": entropy.detach().float()}
        return loss, terms
    return loss
