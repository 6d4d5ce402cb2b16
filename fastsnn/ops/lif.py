"""Multistep LIF/IF: input checks, backend dispatch, and the Triton path.

The op is declared once (LIF: forward, saving formula, backward; fastsnn.ops._declare): eager calls run the
autograd Function derived from it, torch.compile the torch.library custom ops derived from it (with fake
kernels), so a compiled graph has no break and both paths run the same code. The forward saves x (one timestep
when it is repeated over time), v_init and, when T > 8, fp32 membrane checkpoints at chunk boundaries; the
backward recomputes h. The reference backend is plain PyTorch autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import FLOAT_DTYPES, check_float_tensor, check_same_device, resolve_backend
from ..spec import PARAMETRIC, NeuronSpec, kind_of, neuron_spec
from ._common import membrane_checkpoints, repeated
from ._declare import Op
from ._layout import as_time_major_like, is_dense_time_major, LazyKernels, same_layout, time_major_like


def _v_like(x: Tensor) -> Tensor:
    """An fp32 tensor shaped and laid out like one timestep of x."""
    return torch.empty_like(x[0], dtype=torch.float32)


def _v_state(v: Tensor, x: Tensor) -> Tensor:
    """A membrane tensor as the kernels take it: fp32, laid out like one timestep of x (callers skip a None)."""
    return same_layout(v.float(), x[0])


_kernels = LazyKernels("lif")  # imported on first use: importing fastsnn does not import Triton


# ---- the op, declared once (fastsnn.ops._declare): its eager Function and its custom ops are derived ----

def _forward(x: Tensor, v_init: Optional[Tensor], rate: Optional[Tensor], spec: NeuronSpec, return_v: bool,
             repeat: int) -> tuple[Tensor, Tensor, Tensor]:
    """(spikes, v_final or None, fp32 membrane checkpoints or None): one launch. x: [T, ...] or, with repeat = T,
    one timestep [...] presented at every step; rate: a parametric neuron's k = sigmoid(w), fp32."""
    x_seq = repeated(x, repeat) if repeat else x
    spikes = time_major_like(x_seq)
    v_final = _v_like(x_seq) if return_v else None
    checkpoints = membrane_checkpoints(x_seq)
    _kernels.lif_forward(x_seq, spikes, None if v_init is None else _v_state(v_init, x_seq), v_final, checkpoints,
                           spec, rate)
    return spikes, v_final, checkpoints


def _forward_fake(x, v_init, rate, spec, return_v, repeat):
    x_seq = repeated(x, repeat) if repeat else x
    return time_major_like(x_seq), _v_like(x_seq) if return_v else None, membrane_checkpoints(x_seq)


def _save(ctx, a, outputs):
    checkpoints = outputs[2]
    ctx.settings = a[_SETTINGS]  # spec, return_v, repeat (one attribute: each costs host time)
    ctx.save_for_backward(a.x, a.v_init, checkpoints, a.rate)
    if checkpoints is not None:
        ctx.mark_non_differentiable(checkpoints)


def _backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], x: Tensor, v_init: Optional[Tensor],
              checkpoints: Optional[Tensor], rate: Optional[Tensor], spec: NeuronSpec,
              repeat: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_v_init or None, grad_rate or None): one launch (and, for a parametric neuron, one sum of the
    programs' partials); with repeat, the gradient of the one timestep, summed over time in the kernel."""
    x_seq = repeated(x, repeat) if repeat else x
    grad_x = time_major_like(x_seq[:1] if repeat else x_seq)
    grad_v_init = None if v_init is None else _v_like(x_seq)
    if not (grad_spikes.is_contiguous() and grad_x.is_contiguous() and not repeat):
        grad_spikes = as_time_major_like(grad_spikes, x_seq)
    if checkpoints is not None and not checkpoints.numel():  # the custom op's stand-in for none
        checkpoints = None
    partials = _kernels.lif_backward(x_seq, grad_spikes, None if v_init is None else _v_state(v_init, x_seq),
                                       checkpoints, None if grad_v_final is None else _v_state(grad_v_final, x_seq),
                                       grad_x, grad_v_init, spec, bool(repeat), rate)
    return (grad_x[0] if repeat else grad_x, grad_v_init,
            None if partials is None else partials.sum().reshape(rate.shape))


def _backward_fake(grad_spikes, grad_v_final, x, v_init, checkpoints, rate, spec, repeat):
    return (torch.empty_like(x), None if v_init is None else _v_like(repeated(x, repeat) if repeat else x),
            None if rate is None else torch.empty_like(rate))


def _formula(ctx, backward, grad_spikes, grad_v_final, _checkpoints):
    x, v_init, checkpoints, rate = ctx.saved_tensors
    spec, return_v, repeat = ctx.settings
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(repeated(x, repeat) if repeat else x)
    grad_x, grad_v_init, grad_rate = backward(grad_spikes, grad_v_final if return_v else None, x, v_init,
                                              checkpoints, rate, spec, repeat)
    return (grad_x, None if v_init is None else grad_v_init.to(v_init.dtype),
            None if rate is None else grad_rate)


LIF = Op("lif", _forward, fake=_forward_fake, save=_save, backward=_backward, backward_fake=_backward_fake,
         formula=_formula, differentiable=("x", "v_init", "rate"), internal=1, label="lif_multistep")
_SETTINGS = LIF.args.span("spec", "repeat")


# ---- checks and the public functions ----

def _check_input(op: str, x, v_init, repeat):
    """x's device, or the error that names the argument (apply_neuron checks the common call itself)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor of shape [T, ...], got {type(x).__name__}")
    if repeat is not None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"{op}: repeat must be None or a number of timesteps >= 1, got {repeat!r}")
        if x.dim() < 1:
            raise ValueError(f"{op}: with repeat, x must be one timestep [...] with at least 1 dim, got a scalar")
    elif x.dim() < 2:
        raise ValueError(f"{op}: x must have shape [T, ...] with at least 2 dims (time first), got shape "
                         f"{tuple(x.shape)}")
    elif x.shape[0] == 0:
        raise ValueError(f"{op}: x must hold at least one timestep (T >= 1), got shape {tuple(x.shape)}")
    check_float_tensor(op, "x", x)
    device = check_same_device(op, x=x, v_init=v_init)
    if v_init is not None:
        check_float_tensor(op, "v_init", v_init)
        step_shape = x.shape if repeat else x.shape[1:]
        if v_init.shape != step_shape:
            raise ValueError(f"{op}: v_init must have x's per-timestep shape {tuple(step_shape)}, "
                             f"got {tuple(v_init.shape)}")
        if v_init.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: v_init must have x's dtype ({x.dtype}) or float32, got {v_init.dtype}")
    return device


def check_w(op: str, w, spec: NeuronSpec, device) -> None:
    """A parametric neuron's w: a float tensor of one element on x's device; None for the other kinds."""
    if not spec.parametric:
        if w is not None:
            raise ValueError(f"{op}: w is the learnable weight of a parametric neuron (plif); a {spec.kind} neuron "
                             f"takes none")
        return
    if not isinstance(w, Tensor):
        raise TypeError(f"{op}: w must be a torch.Tensor of one element (the PLIF weight, rate sigmoid(w)), got "
                        f"{type(w).__name__}")
    check_float_tensor(op, "w", w)
    if w.numel() != 1:
        raise ValueError(f"{op}: w must hold one element (one learnable time constant per layer), got shape "
                         f"{tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{op}: w must be on x's device ({device}), got {w.device}")


def rate_of(w: Tensor) -> Tensor:
    """k = sigmoid(w) in fp32, 0-d: a parametric neuron's rate, differentiable (autograd does the sigmoid's
    backward; the kernels give dL/dk)."""
    return w.float().reshape(()).sigmoid()


def apply_neuron(op: str, x: Tensor, spec: NeuronSpec, *, v_init: Tensor | None = None, return_v: bool = False,
                 repeat: int | None = None, backend: str = "auto", w: Tensor | None = None):
    """The neuron `spec` over x [T, ...] (or one timestep [...] repeated `repeat` times): spikes [T, ...],
    or (spikes, v_final) with return_v; w: a parametric neuron's weight. The spec is trusted (validated where it
    was built)."""
    if v_init is None and repeat is None and type(x) is Tensor and x.dtype in FLOAT_DTYPES and x.dim() >= 2 \
            and x.shape[0]:
        device = x.device  # the common call, checked in one expression
    else:
        device = _check_input(op, x, v_init, repeat)
    if w is not None or spec.kind in PARAMETRIC:
        check_w(op, w, spec, device)
    rate = None if w is None else rate_of(w)
    # an empty x has nothing to launch (its strides do not describe a dense block: a kernel would write past it)
    dtype = None if x.is_cuda else x.dtype  # under the interpreter bf16 decides; v_init has x's dtype or fp32
    if resolve_backend(op, backend, device, dtype) == "reference" or x.numel() == 0:
        x_seq = repeated(x, repeat) if repeat else x
        return reference.lif_multistep(x_seq, spec, v_init=v_init, return_v=return_v, rate=rate)
    if repeat:
        x = x if is_dense_time_major(x.unsqueeze(0)) else x.contiguous()
    elif not (x.is_contiguous() or is_dense_time_major(x, allow_broadcast=True)):
        x = x.contiguous()
    if torch.compiler.is_compiling():
        outputs = LIF.op(*LIF.args.flat((x, v_init, rate, spec, bool(return_v), repeat or 0)))
    else:  # the derived Function directly: the common call's shortest path
        outputs = LIF.Function.apply(x, v_init, rate, (spec, bool(return_v), repeat or 0))
    return (outputs[0], outputs[1]) if return_v else outputs[0]


def lif_multistep(x: Tensor, *, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                  v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                  detach_reset: bool = False, v_init: Tensor | None = None, return_v: bool = False,
                  repeat: int | None = None, backend: str = "auto"):
    """Multistep leaky integrate-and-fire neuron over x[T, ...] (time first, any trailing shape).

    Per timestep, with the membrane v starting at v_reset (0 for soft reset) or at v_init:
        charge  decay_input=True:  h = v + (x_t − (v − v_reset)) / tau
                decay_input=False: h = v − (v − v_reset) / tau + x_t
        fire    s_t = Θ(h − v_threshold),  Θ(u) = 1 if u ≥ 0 else 0
        reset   hard: v = v_reset where s_t = 1, else h;  soft (v_reset=None): v = h − v_threshold·s_t
    The backward replaces dΘ/du by the surrogate g'(u) (see fastsnn.surrogate: "atan" α=2, "sigmoid" α=4,
    "piecewise_quadratic" α=1, "erf" α=2; alpha=None takes the default). detach_reset=True stops the
    gradient through the reset. Arithmetic is fp32 (the division correctly rounded, as SpikingJelly's);
    x may be fp32, fp16 or bf16.

    Args:
        x: [T, ...] input current; or, with repeat=T, one timestep [...] presented at all T steps (direct
            encoding: read in place, one timestep saved, its gradient summed over time in the kernel).
        tau: membrane time constant, > 1.
        v_init: optional initial membrane of shape x.shape[1:] (x.shape with repeat), in x's dtype or float32.
        return_v: also return the final membrane (fp32).
        backend: "auto" (Triton on CUDA; on the CPU the interpreter when TRITON_INTERPRET=1, else the
            PyTorch reference), "triton" or "reference".
    Returns:
        spikes [T, ...] in x's dtype and layout, or (spikes, v_final) with return_v.
    Memory: x (and v_init) is saved for the backward, which recomputes h; for T > 8 also the fp32 membrane
    at every 8th step (4 bytes per neuron per 8 steps).
    """
    op = "lif_multistep"
    kind = "lif" if decay_input is True else kind_of(decay_input, op)  # (kind_of checks the flag)
    spec = neuron_spec(op, kind=kind, tau=tau, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                       alpha=alpha, detach_reset=detach_reset)
    return apply_neuron(op, x, spec, v_init=v_init, return_v=return_v, repeat=repeat, backend=backend)


def if_multistep(x: Tensor, *, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate: str = "atan",
                 alpha: float | None = None, detach_reset: bool = False, v_init: Tensor | None = None,
                 return_v: bool = False, repeat: int | None = None, backend: str = "auto"):
    """Multistep integrate-and-fire neuron: lif_multistep with charge h = v + x_t (no leak).

    Same arguments, defaults, shapes and returns as fastsnn.lif_multistep, without tau and decay_input.
    """
    op = "if_multistep"
    spec = neuron_spec(op, kind="if", tau=None, v_threshold=v_threshold, v_reset=v_reset, surrogate=surrogate,
                       alpha=alpha, detach_reset=detach_reset)
    return apply_neuron(op, x, spec, v_init=v_init, return_v=return_v, repeat=repeat, backend=backend)


def plif_multistep(x: Tensor, w: Tensor, *, decay_input: bool = True, v_threshold: float = 1.0,
                   v_reset: float | None = 0.0, surrogate: str = "atan", alpha: float | None = None,
                   detach_reset: bool = False, v_init: Tensor | None = None, return_v: bool = False,
                   repeat: int | None = None, backend: str = "auto"):
    """Multistep parametric LIF neuron (PLIF, SpikingJelly's ParametricLIFNode): lif_multistep with a learnable
    rate k = sigmoid(w) in place of 1/tau,

        charge  decay_input=True:  h = v + (x_t − (v − v_reset))·k
                decay_input=False: h = v − (v − v_reset)·k + x_t

    fire, reset, surrogates, v_init, return_v, repeat and backend as lif_multistep. w is one learnable element
    (any float dtype, e.g. a 0-d nn.Parameter initialised to −log(init_tau − 1)); its gradient dL/dw comes from
    the same backward kernel (per-program partial sums of dL/dh·dh/dk and one sum, deterministic, no second
    read of x). The product and the sum of the charge are rounded apart, as SpikingJelly's: its spikes bit for bit.
    Memory: as lif_multistep (x, plus the one-element rate).
    """
    op = "plif_multistep"
    spec = neuron_spec(op, kind=kind_of(decay_input, op, parametric=True), tau=2.0, v_threshold=v_threshold,
                       v_reset=v_reset, surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
    return apply_neuron(op, x, spec, v_init=v_init, return_v=return_v, repeat=repeat, backend=backend, w=w)
