"""The surrogate-gradient table shared by the kernels, the reference and the modules.

Each surrogate replaces dΘ/du of the Heaviside step Θ(u) = [u ≥ 0] in the backward pass, with
u = h − v_threshold. The formulas and default alphas are SpikingJelly's (the kernels' SURROGATE_* codes in
fastsnn/kernels/neuron.py implement the same table):

    atan                 (α=2)  α/2 / (1 + (π/2·α·u)²)
    sigmoid              (α=4)  α·σ(αu)·(1 − σ(αu))
    piecewise_quadratic  (α=1)  max(0, α − α²·|u|)
    erf                  (α=2)  α/√π · exp(−(αu)²)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Surrogate:
    name: str
    default_alpha: float
    grad: Callable[[torch.Tensor, float], torch.Tensor]


def _atan_grad(u, alpha):
    return alpha / 2 / (1 + (math.pi / 2 * alpha * u) ** 2)


def _sigmoid_grad(u, alpha):
    sig = torch.sigmoid(alpha * u)
    return alpha * sig * (1 - sig)


def _piecewise_quadratic_grad(u, alpha):
    return torch.clamp(alpha - alpha * alpha * u.abs(), min=0)


def _erf_grad(u, alpha):
    return alpha / math.sqrt(math.pi) * torch.exp(-((alpha * u) ** 2))


SURROGATES: dict[str, Surrogate] = {
    s.name: s
    for s in (
        Surrogate("atan", 2.0, _atan_grad),
        Surrogate("sigmoid", 4.0, _sigmoid_grad),
        Surrogate("piecewise_quadratic", 1.0, _piecewise_quadratic_grad),
        Surrogate("erf", 2.0, _erf_grad),
    )
}


def resolve_surrogate(op: str, surrogate: str, alpha: float | None) -> tuple[Surrogate, float]:
    """Validates a surrogate name and alpha; returns the table entry and the alpha to use."""
    if not isinstance(surrogate, str) or surrogate not in SURROGATES:
        raise ValueError(f"{op}: surrogate must be one of {sorted(SURROGATES)}, got {surrogate!r}")
    entry = SURROGATES[surrogate]
    if alpha is None:
        return entry, entry.default_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{op}: alpha must be a finite number > 0 (or None for the surrogate's default), "
                         f"got {alpha!r}")
    return entry, float(alpha)
