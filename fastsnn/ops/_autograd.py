"""What every eager autograd Function of fastsnn shares: its backward is not differentiable again.

The kernels' backward passes are not written in differentiable operations, so a gradient they return under
``create_graph=True`` has no graph behind it: second-order terms (a gradient penalty, a Hessian-vector product)
would silently vanish. Each backward ends with
``return refused(op, grads) if torch.is_grad_enabled() else grads``: such a gradient refuses, naming the op, when
something tries to differentiate it. The plain-PyTorch reference backends (``backend="reference"``) are twice
differentiable.
"""
from __future__ import annotations

import torch


class _Refused(torch.autograd.Function):
    """Passes gradients through unchanged; differentiating them raises, naming the op."""

    @staticmethod
    def forward(ctx, op, *grads):
        ctx.op = op
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"{ctx.op}: its gradient cannot be differentiated again (double backward, e.g. "
                           f"create_graph=True for a gradient penalty, is not supported by the fused kernels); "
                           f"backend='reference' runs the plain-PyTorch form, which is twice differentiable")


def refused(op: str, grads):
    """The gradients a backward returns under create_graph=True (call it when torch.is_grad_enabled() in a
    backward, as the last step): each one raises, naming the op, when something differentiates it, instead of
    silently carrying no second-order term. Kept out of the plain backward's path (no wrapper frame)."""
    single = not isinstance(grads, tuple)
    grads = (grads,) if single else grads
    tensors = [g for g in grads if isinstance(g, torch.Tensor)]
    answers = iter(_Refused.apply(op, *(g.detach().requires_grad_() for g in tensors)))
    grads = tuple(next(answers) if isinstance(g, torch.Tensor) else g for g in grads)
    return grads[0] if single else grads
