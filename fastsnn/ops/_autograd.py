"""What every eager autograd Function of fastsnn shares: its backward is not differentiable again.

The kernels' backward passes are not written in differentiable operations, so a gradient they return under
``create_graph=True`` has no graph behind it: second-order terms (a gradient penalty, a Hessian-vector product)
would silently vanish. :func:`once_differentiable` makes such a gradient refuse, naming the op, when something
tries to differentiate it. The plain-PyTorch reference backends (``backend="reference"``) are twice
differentiable.
"""
from __future__ import annotations

import functools

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


def once_differentiable(op: str):
    """Decorates a Function's backward: computed without a graph; under create_graph=True each gradient it
    returns raises on a second differentiation instead of silently carrying no second-order term."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled():  # the common case: a plain backward
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            tensors = [g for g in grads if isinstance(g, torch.Tensor)]
            refused = iter(_Refused.apply(op, *(g.detach().requires_grad_() for g in tensors)))
            grads = tuple(next(refused) if isinstance(g, torch.Tensor) else g for g in grads)
            return grads[0] if single else grads
        return wrapper
    return decorate
