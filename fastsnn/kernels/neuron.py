"""The multistep neuron's arithmetic, once, for every kernel that runs a neuron (fastsnn.kernels.lif over
x[T, N], fastsnn.kernels.bn_lif over BatchNorm's output): the constexpr codes, the charge, fire and reset, the
surrogate derivatives and the membrane gradient, and the charge's derivatives table.

Per timestep (v: membrane, x: input, v_reset: 0 for soft reset, τ: time constant, k: a parametric neuron's rate
sigmoid(w), read from memory):
    NEURON_IF               h = v + x
    NEURON_LIF              h = v + (x − (v − v_reset)) / τ          (decay_input=True)
    NEURON_LIF_NO_DECAY     h = v − (v − v_reset) / τ + x            (decay_input=False)
    NEURON_PLIF             h = v + (x − (v − v_reset))·k            (SpikingJelly's ParametricLIFNode)
    NEURON_PLIF_NO_DECAY    h = v − (v − v_reset)·k + x
    fire  s = Θ(h − v_threshold);  reset  hard: v = v_reset where s, else h;  soft: v = h − v_threshold·s
The parametric charges are one product and one sum each, rounded apart as SpikingJelly's PyTorch ops round them
(its spikes bit for bit): the product is `multiply`, which on a GPU is PTX's mul.rn.f32, an instruction the
compiler may not fuse with the sum into one fma (every other product of the kernels may be fused).
"""
import functools
from typing import NamedTuple

import numpy as np
import triton
import triton.language as tl

# The NEURON constexpr: how the membrane charges
NEURON_IF: tl.constexpr = tl.constexpr(0)  # h = v + x
NEURON_LIF: tl.constexpr = tl.constexpr(1)  # h = v + (x − (v − v_reset)) / τ
NEURON_LIF_NO_DECAY: tl.constexpr = tl.constexpr(2)  # h = v − (v − v_reset) / τ + x
NEURON_PLIF: tl.constexpr = tl.constexpr(3)  # h = v + (x − (v − v_reset))·k, k = sigmoid(w)
NEURON_PLIF_NO_DECAY: tl.constexpr = tl.constexpr(4)  # h = v − (v − v_reset)·k + x
NEURON_CODES = {"if": NEURON_IF.value, "lif": NEURON_LIF.value, "lif_no_decay": NEURON_LIF_NO_DECAY.value,
                "plif": NEURON_PLIF.value, "plif_no_decay": NEURON_PLIF_NO_DECAY.value}
PARAMETRIC = ("plif", "plif_no_decay")  # kinds whose rate k is a tensor (learnable)
# The SURROGATE constexpr: dΘ/du replaced in the backward (u = h − v_threshold), SpikingJelly's formulas
SURROGATE_ATAN: tl.constexpr = tl.constexpr(0)  # α/2 / (1 + (π/2·α·u)²)
SURROGATE_SIGMOID: tl.constexpr = tl.constexpr(1)  # α·σ(αu)·(1 − σ(αu))
SURROGATE_PIECEWISE_QUADRATIC: tl.constexpr = tl.constexpr(2)  # max(0, α − α²·|u|)
SURROGATE_ERF: tl.constexpr = tl.constexpr(3)  # α/√π · exp(−(αu)²)
SURROGATE_CODES = {"atan": SURROGATE_ATAN.value, "sigmoid": SURROGATE_SIGMOID.value,
                   "piecewise_quadratic": SURROGATE_PIECEWISE_QUADRATIC.value, "erf": SURROGATE_ERF.value}
HALF_PI: tl.constexpr = tl.constexpr(1.5707963267948966)  # π/2
INV_SQRT_PI: tl.constexpr = tl.constexpr(0.5641895835477563)  # 1/√π
# The DIVIDE constexpr: how a / τ is computed. Both give the correctly rounded fp32 quotient, as
# SpikingJelly's division does (so spikes match it bit for bit); bench/division.py measures the FMA form.
DIVIDE_RN: tl.constexpr = tl.constexpr(0)  # div.rn (~10 SASS instructions); for CPU tensors, i.e. under
#                                            the interpreter, whose fma rounds twice
DIVIDE_FMA: tl.constexpr = tl.constexpr(1)  # q = a·r, e = fma(−q, τ, a), q + e·r with r = RN(1/τ): 3 instructions

# The MULTIPLY constexpr: how a parametric charge's product d·k is computed; both round it once, on its own
MULTIPLY_PLAIN: tl.constexpr = tl.constexpr(0)  # d·k; for CPU tensors (the interpreter never fuses)
MULTIPLY_RN: tl.constexpr = tl.constexpr(1)  # PTX mul.rn.f32: never contracted into an fma with the next sum

MAX_CHUNK = 8  # timesteps per chunk: loads issued together, h kept in registers by the backward
NUM_WARPS = 4
UNALIGNED_ELEMENTS = 2  # per thread when 16-byte vectors are impossible (each element then needs its own address)


@triton.jit
def divide(b_a, tau, inv_tau, DIVIDE: tl.constexpr):
    if DIVIDE == DIVIDE_RN:
        b_q = tl.math.div_rn(b_a, tau)
    else:  # DIVIDE_FMA: Markstein's correction of the reciprocal product
        b_q = b_a * inv_tau
        b_e = tl.fma(-b_q, tau, b_a)
        b_q = tl.fma(b_e, inv_tau, b_q)
    return b_q


@triton.jit
def multiply(b_a, b, MULTIPLY: tl.constexpr):
    """a·b rounded once, on its own (never fused with a following sum)."""
    if MULTIPLY == MULTIPLY_RN:
        b_p = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [b_a, tl.zeros_like(b_a) + b],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        b_p = b_a * b
    return b_p


@triton.jit
def charge(b_v, b_x, tau, inv_tau, rate, v_reset, NEURON: tl.constexpr, DIVIDE: tl.constexpr,
           MULTIPLY: tl.constexpr):
    """h from the membrane v and the input x (rate: k of a parametric neuron, unused otherwise)."""
    if NEURON == NEURON_IF:
        b_h = b_v + b_x
    elif NEURON == NEURON_LIF:
        b_h = b_v + divide(b_x - (b_v - v_reset), tau, inv_tau, DIVIDE)
    elif NEURON == NEURON_LIF_NO_DECAY:
        b_h = b_v - divide(b_v - v_reset, tau, inv_tau, DIVIDE) + b_x
    else:  # a parametric neuron, whose dh/dk (rate_slope) the backward also needs: one expression for both
        b_h = parametric_charge(b_v, b_x, rate_slope(b_v, b_x, v_reset, NEURON), rate, NEURON, MULTIPLY)
    return b_h


@triton.jit
def parametric_charge(b_v, b_x, b_d, rate, NEURON: tl.constexpr, MULTIPLY: tl.constexpr):
    """A parametric neuron's h from v, x and d = dh/dk (rate_slope): PLIF h = v + d·k with d = x − (v − v_reset);
    PLIF_NO_DECAY h = v + d·k + x with d = v_reset − v, whose d·k is exactly −((v − v_reset)·k): the charge's
    formula, with the same roundings."""
    b_h = b_v + multiply(b_d, rate, MULTIPLY)
    if NEURON == NEURON_PLIF_NO_DECAY:
        b_h += b_x
    return b_h


@triton.jit
def charge_slopes(inv_tau, rate, NEURON: tl.constexpr):
    """(dh/dv, dh/dx) of the charge: the table the backward passes carry the gradient through."""
    if NEURON == NEURON_IF:
        dh_dv = 1.0
        dh_dx = 1.0
    elif NEURON == NEURON_LIF:
        dh_dv = 1.0 - inv_tau
        dh_dx = inv_tau
    elif NEURON == NEURON_LIF_NO_DECAY:
        dh_dv = 1.0 - inv_tau
        dh_dx = 1.0
    elif NEURON == NEURON_PLIF:
        dh_dv = 1.0 - rate
        dh_dx = rate
    else:  # NEURON_PLIF_NO_DECAY
        dh_dv = 1.0 - rate
        dh_dx = 1.0
    return dh_dv, dh_dx


@triton.jit
def rate_slope(b_v, b_x, v_reset, NEURON: tl.constexpr):
    """dh/dk of a parametric neuron's charge at membrane v and input x (0 for the others)."""
    if NEURON == NEURON_PLIF:
        b_d = b_x - (b_v - v_reset)
    elif NEURON == NEURON_PLIF_NO_DECAY:
        b_d = v_reset - b_v
    else:
        b_d = tl.zeros_like(b_v)
    return b_d


@triton.jit
def fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET: tl.constexpr):
    b_fired = b_h >= v_threshold
    if HARD_RESET:
        b_v = tl.where(b_fired, v_reset, b_h)  # v_reset·s + h·(1 − s)
    else:
        b_v = tl.where(b_fired, b_h - v_threshold, b_h)  # h − v_threshold·s
    return b_fired, b_v


@triton.jit
def surrogate_grad(b_u, alpha, SURROGATE: tl.constexpr):
    if SURROGATE == SURROGATE_ATAN:
        b_w = (HALF_PI * alpha) * b_u
        b_g = (alpha * 0.5) / (1.0 + b_w * b_w)
    elif SURROGATE == SURROGATE_SIGMOID:
        b_sig = tl.sigmoid(alpha * b_u)
        b_g = alpha * b_sig * (1.0 - b_sig)
    elif SURROGATE == SURROGATE_PIECEWISE_QUADRATIC:
        b_g = tl.maximum(alpha - (alpha * alpha) * tl.abs(b_u), 0.0)
    else:  # SURROGATE_ERF
        b_au = alpha * b_u
        b_g = (alpha * INV_SQRT_PI) * tl.exp(-b_au * b_au)
    return b_g


@triton.jit
def membrane_grad(b_h, b_gs, b_gv, v_threshold, v_reset, alpha, SURROGATE: tl.constexpr, HARD_RESET: tl.constexpr,
                  DETACH_RESET: tl.constexpr):
    """dL/dh at one step: the spike's surrogate term plus the gradient of the membrane carried to the next step
    (b_gs: dL/ds_t, b_gv: dL/dv_t) through the reset."""
    b_u = b_h - v_threshold
    b_sg = surrogate_grad(b_u, alpha, SURROGATE)
    if HARD_RESET:
        b_dv_dh = tl.where(b_u >= 0, 0.0, 1.0)
        if not DETACH_RESET:
            b_dv_dh += (v_reset - b_h) * b_sg
    else:
        if DETACH_RESET:
            b_dv_dh = 1.0
        else:
            b_dv_dh = 1.0 - v_threshold * b_sg
    return b_gs * b_sg + b_gv * b_dv_dh


def chunk_for(T: int) -> int:
    return min(T, MAX_CHUNK)


def checkpoints_for(T: int) -> int:
    """Membrane checkpoints the forward writes for the backward: one per chunk boundary."""
    return -(-T // MAX_CHUNK) - 1


class Scalars(NamedTuple):
    """The spec's numbers as the kernels take them, in their argument order."""
    tau: float
    inv_tau: float  # RN32(1/τ32): the FMA division needs 1/τ rounded once from the fp32 τ, not via fp64
    v_threshold: float
    v_reset: float  # the membrane's resting value: v_reset, or 0 for soft reset


class LaunchConstants(NamedTuple):
    scalars: Scalars
    constexprs: dict  # NEURON, HARD_RESET


@functools.lru_cache(maxsize=256)
def launch_constants(spec) -> LaunchConstants:
    """A NeuronSpec's scalar arguments and constexprs, as every neuron kernel takes them."""
    tau = np.float32(spec.tau)
    scalars = Scalars(float(tau), float(np.float32(1.0) / tau), spec.v_threshold, spec.v_rest)
    return LaunchConstants(scalars, dict(NEURON=NEURON_CODES[spec.kind], HARD_RESET=spec.hard_reset))


def arithmetic_modes(cuda: bool) -> dict:
    """The DIVIDE and MULTIPLY constexprs for tensors on CUDA (compiled) or the CPU (the interpreter, whose fma
    rounds twice and which runs no inline PTX)."""
    if cuda:
        return dict(DIVIDE=DIVIDE_FMA.value, MULTIPLY=MULTIPLY_RN.value)
    return dict(DIVIDE=DIVIDE_RN.value, MULTIPLY=MULTIPLY_PLAIN.value)


__all__ = ["NEURON_CODES", "SURROGATE_CODES", "PARAMETRIC", "MAX_CHUNK", "NUM_WARPS", "UNALIGNED_ELEMENTS",
           "DIVIDE_RN", "DIVIDE_FMA", "MULTIPLY_PLAIN", "MULTIPLY_RN", "arithmetic_modes", "multiply",
           "parametric_charge", "charge", "charge_slopes", "rate_slope", "fire_and_reset", "surrogate_grad",
           "membrane_grad", "divide", "chunk_for", "checkpoints_for", "launch_constants", "Scalars",
           "LaunchConstants"]
