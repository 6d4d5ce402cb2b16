"""Multistep LIF/IF: input checks, backend dispatch, and the Triton path as torch.library custom ops with
autograd (saving only x; the backward recomputes h). The reference backend is plain PyTorch autograd."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import BACKENDS, check_float_tensor, check_number, check_same_device, resolve_backend
from ..surrogate import resolve_surrogate
from ._layout import is_dense_time_major, same_layout, time_major_like

_NEURON_CODES = {"if": 0, "lif": 1, "lif_no_decay": 2}


def _v_like(x: Tensor) -> Tensor:
    """An fp32 tensor shaped and laid out like one timestep of x."""
    return torch.empty_like(x[0], dtype=torch.float32)


def _v_state(v: Tensor, x: Tensor) -> Tensor:
    """A membrane tensor as the kernels take it: fp32, laid out like one timestep of x."""
    return same_layout(v.float(), x[0])


@torch.library.custom_op("fastsnn::lif_forward", mutates_args=(), device_types=None)
def _lif_forward(x: Tensor, v_init: Optional[Tensor], neuron: int, tau: float, v_threshold: float, v_reset: float,
                 hard_reset: bool, surrogate: int, alpha: float, detach_reset: bool,
                 return_v: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.lif import lif_forward

    spikes = time_major_like(x)
    v_final = _v_like(x) if return_v else None
    lif_forward(x, spikes, None if v_init is None else _v_state(v_init, x), v_final, neuron=neuron, tau=tau,
                v_threshold=v_threshold, v_reset=v_reset, hard_reset=hard_reset)
    return spikes, (v_final if return_v else x.new_empty(0, dtype=torch.float32))


@_lif_forward.register_fake
def _(x, v_init, neuron, tau, v_threshold, v_reset, hard_reset, surrogate, alpha, detach_reset, return_v):
    return time_major_like(x), (_v_like(x) if return_v else x.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("fastsnn::lif_backward", mutates_args=())
def _lif_backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], x: Tensor, v_init: Optional[Tensor],
                  neuron: int, tau: float, v_threshold: float, v_reset: float, hard_reset: bool, surrogate: int,
                  alpha: float, detach_reset: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.lif import lif_backward

    grad_x = time_major_like(x)
    grad_v_init = None if v_init is None else _v_like(x)
    lif_backward(x, same_layout(grad_spikes, grad_x), None if v_init is None else _v_state(v_init, x),
                 None if grad_v_final is None else _v_state(grad_v_final, x), grad_x, grad_v_init,
                 neuron=neuron, tau=tau, v_threshold=v_threshold, v_reset=v_reset, hard_reset=hard_reset,
                 surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
    return grad_x, (grad_v_init if grad_v_init is not None else x.new_empty(0, dtype=torch.float32))


@_lif_backward.register_fake
def _(grad_spikes, grad_v_final, x, v_init, neuron, tau, v_threshold, v_reset, hard_reset, surrogate, alpha,
      detach_reset):
    return time_major_like(x), (_v_like(x) if v_init is not None else x.new_empty(0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, v_init, *params = inputs
    ctx.params = params  # neuron, tau, v_threshold, v_reset, hard_reset, surrogate, alpha, detach_reset, return_v
    ctx.save_for_backward(x, v_init)


def _backward(ctx, grad_spikes, grad_v_final):
    x, v_init = ctx.saved_tensors
    neuron, tau, v_threshold, v_reset, hard_reset, surrogate, alpha, detach_reset, return_v = ctx.params
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(x)
    grad_x, grad_v_init = _lif_backward(
        grad_spikes, grad_v_final if return_v else None, x, v_init, neuron, tau, v_threshold, v_reset, hard_reset,
        surrogate, alpha, detach_reset)
    return (grad_x, None if v_init is None else grad_v_init.to(v_init.dtype)) + (None,) * 9


torch.library.register_autograd("fastsnn::lif_forward", _backward, setup_context=_setup_context)


def check_neuron_params(op: str, *, tau: float | None, decay_input: bool, v_threshold: float,
                        v_reset: float | None, surrogate: str, alpha: float | None, detach_reset: bool, backend: str):
    """Validates a neuron's scalar arguments; returns them normalised (alpha resolved to a float)."""
    if tau is not None:
        tau = check_number(op, "tau", tau, low=1.0, low_inclusive=False, rule="a finite number > 1")
    if not isinstance(decay_input, bool):
        raise TypeError(f"{op}: decay_input must be True or False, got {decay_input!r}")
    v_threshold = check_number(op, "v_threshold", v_threshold)
    if v_reset is not None:
        v_reset = check_number(op, "v_reset", v_reset, rule="a finite number, or None for soft reset")
        if v_threshold <= v_reset:
            raise ValueError(f"{op}: v_threshold must be > v_reset for hard reset, got v_threshold={v_threshold} "
                             f"and v_reset={v_reset}")
    if not isinstance(detach_reset, bool):
        raise TypeError(f"{op}: detach_reset must be True or False, got {detach_reset!r}")
    entry, alpha = resolve_surrogate(op, surrogate, alpha)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    return dict(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset, surrogate=entry,
                alpha=alpha, detach_reset=detach_reset)


def _multistep(op, x, *, tau, decay_input, v_threshold, v_reset, surrogate, alpha, detach_reset, v_init, return_v,
               backend):
    p = check_neuron_params(op, tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                            surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor of shape [T, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [T, ...] with at least 2 dims (time first), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: x must hold at least one timestep (T >= 1), got shape {tuple(x.shape)}")
    check_float_tensor(op, "x", x)
    device = check_same_device(op, x=x, v_init=v_init)
    if v_init is not None:
        check_float_tensor(op, "v_init", v_init)
        if v_init.shape != x.shape[1:]:
            raise ValueError(f"{op}: v_init must have x's per-timestep shape {tuple(x.shape[1:])}, "
                             f"got {tuple(v_init.shape)}")
        if v_init.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: v_init must have x's dtype ({x.dtype}) or float32, got {v_init.dtype}")
    if resolve_backend(op, backend, device) == "reference":
        return reference.lif_multistep(
            x, neuron="if" if p["tau"] is None else "lif", tau=p["tau"] or 1.0, decay_input=decay_input,
            v_threshold=p["v_threshold"], v_reset=p["v_reset"], surrogate=p["surrogate"].name, alpha=p["alpha"],
            detach_reset=detach_reset, v_init=v_init, return_v=return_v)
    if not is_dense_time_major(x, allow_broadcast=True):
        x = x.contiguous()
    if p["tau"] is None:
        neuron, tau = _NEURON_CODES["if"], 1.0
    else:
        neuron, tau = _NEURON_CODES["lif" if decay_input else "lif_no_decay"], p["tau"]
    v_reset = p["v_reset"]
    spikes, v_final = _lif_forward(
        x, v_init, neuron, tau, p["v_threshold"], 0.0 if v_reset is None else v_reset, v_reset is not None,
        p["surrogate"].code, p["alpha"], detach_reset, bool(return_v))
    if return_v:
        return spikes, v_final
    return spikes


def lif_multistep(x: Tensor, *, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                  v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                  detach_reset: bool = False, v_init: Tensor | None = None, return_v: bool = False,
                  backend: str = "auto"):
    """Multistep leaky integrate-and-fire neuron over x[T, ...] (time first, any trailing shape).

    Per timestep, with the membrane v starting at v_reset (0 for soft reset) or at v_init:
        charge  decay_input=True:  h = v + (x_t − (v − v_reset)) / tau
                decay_input=False: h = v − (v − v_reset) / tau + x_t
        fire    s_t = Θ(h − v_threshold),  Θ(u) = 1 if u ≥ 0 else 0
        reset   hard: v = v_reset where s_t = 1, else h;  soft (v_reset=None): v = h − v_threshold·s_t
    The backward replaces dΘ/du by the surrogate g'(u) (see fastsnn.surrogate: "atan" α=2, "sigmoid" α=4,
    "piecewise_quadratic" α=1, "erf" α=2; alpha=None takes the default). detach_reset=True stops the
    gradient through the reset. Arithmetic is fp32; x may be fp32, fp16 or bf16.

    Args:
        x: [T, ...] input current.
        tau: membrane time constant, > 1.
        v_init: optional initial membrane of shape x.shape[1:], in x's dtype or float32.
        return_v: also return the final membrane (fp32, shape x.shape[1:]).
        backend: "auto" (Triton on CUDA; on the CPU the interpreter when TRITON_INTERPRET=1, else the
            PyTorch reference), "triton" or "reference".
    Returns:
        spikes [T, ...] in x's dtype and layout, or (spikes, v_final) with return_v.
    Memory: only x (and v_init) is saved for the backward, which recomputes h.
    """
    return _multistep("lif_multistep", x, tau=tau, decay_input=decay_input,
                      v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                      detach_reset=detach_reset, v_init=v_init, return_v=return_v, backend=backend)


def if_multistep(x: Tensor, *, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, v_init: Tensor | None = None,
                 return_v: bool = False, backend: str = "auto"):
    """Multistep integrate-and-fire neuron: lif_multistep with charge h = v + x_t (no leak).

    Same arguments, defaults, shapes and returns as fastsnn.lif_multistep, without tau and decay_input.
    """
    return _multistep("if_multistep", x, tau=None, decay_input=True, v_threshold=v_threshold,
                      v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, v_init=v_init,
                      return_v=return_v, backend=backend)
