"""Multistep LIF/IF neuron: one forward kernel, one reverse-time backward kernel.

Tensors are viewed as [T, N]: time outermost, the N neurons of a timestep dense in memory (any dense
layout, e.g. channels_last, as long as every tensor of a call shares it). Outputs have time stride N; the
input x has time stride N, or 0 when one timestep is broadcast over T (direct encoding), in which case the
backward sums its gradient over time in registers and writes one timestep.

The membrane stays in fp32 registers. Time is walked in chunks of CHUNK steps: every load of a chunk is
issued before its first store (the compiler must assume the pointers may alias, so a load after a store
waits for it). The backward recomputes h from the saved x; when T > CHUNK the forward also writes the
fp32 membrane at each chunk boundary ([⌈T/CHUNK⌉ − 1, N]), so that the backward restarts each chunk
from there instead of re-running the forward from t = 0.

Each thread owns 16 contiguous bytes of a timestep (4 fp32 or 8 fp16/bf16 values): 128-bit accesses.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import positional
from .neuron import (MAX_CHUNK, NEURON_CODES, NEURON_PLIF, NEURON_PLIF_NO_DECAY, NUM_WARPS, PARAMETRIC,
                     SURROGATE_CODES, UNALIGNED_ELEMENTS, arithmetic_modes, charge, charge_slopes, checkpoints_for,
                     chunk_for, fire_and_reset, launch_constants, membrane_grad, parametric_charge, rate_slope)


@triton.jit
def _lif_fwd_kernel(
    p_x, p_s, p_v0, p_vT, p_ck, p_rate,
    N, stride_xt, tau, inv_tau, v_threshold, v_reset, has_v_init, store_v,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DIVIDE: tl.constexpr,
    MULTIPLY: tl.constexpr, BLOCK: tl.constexpr,
):
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    PARAMETRIC: tl.constexpr = NEURON == NEURON_PLIF or NEURON == NEURON_PLIF_NO_DECAY
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    rate = tl.load(p_rate).to(tl.float32) if PARAMETRIC else 0.0  # k = sigmoid(w) of a parametric neuron
    b_v = tl.load(p_v0 + o_n, mask=m_n & (has_v_init != 0), other=v_reset).to(tl.float32)
    for i_c in range(NUM_CHUNKS):
        if i_c > 0:  # the membrane entering this chunk, for the backward
            tl.store(p_ck + (i_c - 1) * N + o_n, b_v, mask=m_n)
        b_xs = ()  # CHUNK x [BLOCK]: every load of the chunk before any store
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            b_xs += (tl.load(p_x + t * stride_xt + o_n, mask=m_n & (t < T), other=0.0).to(tl.float32),)
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            b_h = charge(b_v, b_xs[j], tau, inv_tau, rate, v_reset, NEURON, DIVIDE, MULTIPLY)
            b_fired, b_v_next = fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
            tl.store(p_s + t * N + o_n, b_fired.to(p_s.dtype.element_ty), mask=m_n & (t < T))
            b_v = tl.where(t < T, b_v_next, b_v)
    tl.store(p_vT + o_n, b_v, mask=m_n & (store_v != 0))


@triton.jit
def _lif_bwd_kernel(
    p_x, p_gs, p_v0, p_ck, p_gvT, p_gx, p_gv0, p_rate, p_rate_part,
    N, stride_xt, tau, inv_tau, v_threshold, v_reset, alpha, has_v_init, has_grad_v,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, DETACH_RESET: tl.constexpr, DIVIDE: tl.constexpr, MULTIPLY: tl.constexpr,
    SUM_OVER_TIME: tl.constexpr, BLOCK: tl.constexpr,
):
    """dL/dx (and dL/dv_init); for a parametric neuron also this program's Σ dL/dh·dh/dk in p_rate_part[pid]."""
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    PARAMETRIC: tl.constexpr = NEURON == NEURON_PLIF or NEURON == NEURON_PLIF_NO_DECAY
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    rate = tl.load(p_rate).to(tl.float32) if PARAMETRIC else 0.0
    b_gv = tl.load(p_gvT + o_n, mask=m_n & (has_grad_v != 0), other=0.0).to(tl.float32)
    b_gx_sum = tl.zeros([BLOCK], tl.float32)  # Σ_t dL/dx_t, for an input broadcast over time
    b_gk = tl.zeros([BLOCK], tl.float32)  # Σ_t dL/dh_t · dh_t/dk, a parametric neuron's rate gradient
    dh_dv, dh_dx = charge_slopes(inv_tau, rate, NEURON)
    for k in range(NUM_CHUNKS):
        i_c = NUM_CHUNKS - 1 - k
        # the membrane entering the chunk: v_init (or v_reset) for the first, else the forward's checkpoint
        if i_c == 0:
            b_v = tl.load(p_v0 + o_n, mask=m_n & (has_v_init != 0), other=v_reset).to(tl.float32)
        else:
            b_v = tl.load(p_ck + (i_c - 1) * N + o_n, mask=m_n, other=0.0)
        b_xs = ()  # every load of the chunk (x and the upstream gradient) before any store
        b_gss = ()
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            m_t = m_n & (t < T)
            b_xs += (tl.load(p_x + t * stride_xt + o_n, mask=m_t, other=0.0).to(tl.float32),)
            b_gss += (tl.load(p_gs + t * N + o_n, mask=m_t, other=0.0).to(tl.float32),)
        b_hs = ()  # recomputed h of the chunk, CHUNK x [BLOCK] fp32
        b_ds = ()  # a parametric neuron's dh/dk per step
        for j in tl.static_range(CHUNK):
            if PARAMETRIC:  # dh/dk, the charge's own term
                b_d = tl.where(i_c * CHUNK + j < T, rate_slope(b_v, b_xs[j], v_reset, NEURON), 0.0)
                b_ds += (b_d,)
                b_h = parametric_charge(b_v, b_xs[j], b_d, rate, NEURON, MULTIPLY)
            else:
                b_h = charge(b_v, b_xs[j], tau, inv_tau, rate, v_reset, NEURON, DIVIDE, MULTIPLY)
            b_hs += (b_h,)
            _, b_v = fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        for j in tl.static_range(CHUNK - 1, -1, -1):
            t = i_c * CHUNK + j
            b_gh = membrane_grad(b_hs[j], b_gss[j], b_gv, v_threshold, v_reset, alpha, SURROGATE, HARD_RESET,
                                 DETACH_RESET)
            b_gx = b_gh * dh_dx
            if PARAMETRIC:
                b_gk += b_gh * b_ds[j]  # 0 past T
            if SUM_OVER_TIME:
                b_gx_sum += tl.where(t < T, b_gx, 0.0)
            else:
                tl.store(p_gx + t * N + o_n, b_gx.to(p_gx.dtype.element_ty), mask=m_n & (t < T))
            b_gv = tl.where(t < T, b_gh * dh_dv, b_gv)  # steps past T (a partial last chunk) pass it through
    if SUM_OVER_TIME:
        tl.store(p_gx + o_n, b_gx_sum.to(p_gx.dtype.element_ty), mask=m_n)
    tl.store(p_gv0 + o_n, b_gv, mask=m_n & (has_v_init != 0))
    if PARAMETRIC:
        tl.store(p_rate_part + i_n, tl.sum(tl.where(m_n, b_gk, 0.0), axis=0))


_FP32_PLACEHOLDERS = {}  # by device index (-1: the CPU)


def _launch(plan, x, pointers: tuple):
    """(the plan's Launch for the pointers' alignment, a one-element fp32 tensor on x's device to pass for each
    absent optional pointer, which the kernels never touch). pointers: the call's tensors, None for an absent one.
    The placeholder is looked up by x.get_device(), an int (x.device is an object made on each read)."""
    addresses = 0
    for t in pointers:
        if t is not None:
            addresses |= t.data_ptr()
    none = _FP32_PLACEHOLDERS.get(x.get_device())
    if none is None:
        none = _FP32_PLACEHOLDERS[x.get_device()] = torch.zeros(1, dtype=torch.float32, device=x.device)
    return plan.unaligned if addresses % 16 else plan.aligned, none


class Launch(NamedTuple):
    grid: tuple
    args: tuple  # every argument after the pointers: sizes, scalars, flags, constexprs (in the kernel's order)
    options: dict  # num_warps


class Plan(NamedTuple):
    """Everything a launch needs besides the pointers: the launch for unaligned and for 16-byte-aligned pointers,
    and the spec it was made for (kept alive while its plan is cached under its id)."""
    unaligned: Launch
    aligned: Launch
    spec: object


_PLANS: dict = {}


def _plan_of(key: tuple, backward: bool, x, spec, has_v_init: bool, has_second: bool, sum_over_time: bool) -> Plan:
    """The Plan under `key` (x's shape, strides, dtype and device type, id(spec), the direction's flags), made on
    the first call with that key: per call a launcher reads x's layout once and looks its plan up in one
    dictionary, with no hashing of the spec (its id stands for it while the plan holds it)."""
    if len(_PLANS) >= 1024:
        _PLANS.clear()
    # the launchers' tensors share one dense time-major layout: the time stride of spikes / grad_spikes is N
    T, N = x.shape[0], math.prod(x.shape[1:])
    plan = _PLANS[key] = _plan(backward, T, N, x.stride(0), x.element_size(), x.is_cuda, spec, has_v_init,
                               has_second, sum_over_time)
    return plan


def _plan(backward: bool, T: int, N: int, x_time_stride: int, itemsize: int, cuda: bool, spec, has_v_init: bool,
          has_second: bool, sum_over_time: bool = False) -> Plan:
    """The Plan of one (direction, shape, layout, dtype, device type, spec, optional tensors). BLOCK (for NUM_WARPS
    warps) gives 16 bytes per thread (4 fp32 or 8 fp16/bf16 values) when every pointer is 16-byte aligned and N
    and the time stride are multiples of that (what lets Triton's JIT prove 128-bit accesses), else
    UNALIGNED_ELEMENTS values per thread; per call only the pointers' alignment is read. has_second: v_final
    (forward) or grad_v_final (backward) given. DIVIDE and MULTIPLY: see fastsnn.kernels.neuron.arithmetic_modes."""
    per_thread = 16 // itemsize
    constants = launch_constants(spec)
    scalars = tuple(constants.scalars)
    kw = dict(T=T, CHUNK=chunk_for(T), num_warps=NUM_WARPS, **arithmetic_modes(cuda), **constants.constexprs)
    if backward:
        scalars = (*scalars, spec.alpha)
        kw.update(SURROGATE=SURROGATE_CODES[spec.surrogate], DETACH_RESET=spec.detach_reset,
                  SUM_OVER_TIME=sum_over_time)
    kernel = _lif_bwd_kernel if backward else _lif_fwd_kernel
    launches = []
    for aligned in (False, True):
        block = (per_thread if aligned else UNALIGNED_ELEMENTS) * 32 * NUM_WARPS
        constexprs, options = positional(kernel, {**kw, "BLOCK": block})
        args = (N, x_time_stride, *scalars, int(has_v_init), int(has_second), *constexprs)
        launches.append(Launch((-(-N // block),), args, options))
    shape_aligned = N % per_thread == 0 and x_time_stride % per_thread == 0
    return Plan(launches[0], launches[1] if shape_aligned else launches[0], spec)


def lif_forward(x, spikes, v_init, v_final, checkpoints, spec, rate=None):
    """x, spikes: [T, ...] sharing one dense time-major layout (x may have time stride 0); v_init/v_final:
    fp32 [...] or None; checkpoints: fp32 [checkpoints_for(T), ...] or None when T <= MAX_CHUNK; rate: a
    parametric neuron's k = sigmoid(w), fp32, one element (None for the other kinds)."""
    key = (False, x.shape, x.stride(), x.dtype, x.is_cuda, id(spec), v_init is not None, v_final is not None)
    plan = _PLANS.get(key)
    if plan is None or plan.spec is not spec:
        plan = _plan_of(key, False, x, spec, v_init is not None, v_final is not None, False)
    (grid, args, options), none = _launch(plan, x, (x, spikes, v_init, v_final, checkpoints))
    _lif_fwd_kernel[grid](
        x, spikes, none if v_init is None else v_init, none if v_final is None else v_final,
        none if checkpoints is None else checkpoints, none if rate is None else rate, *args, **options)


def lif_backward(x, grad_spikes, v_init, checkpoints, grad_v_final, grad_x, grad_v_init, spec, sum_over_time=False,
                 rate=None):
    """Writes grad_x (x's layout; with sum_over_time, for an x broadcast over time, one timestep holding
    Σ_t dL/dx_t) and grad_v_init (fp32, when v_init is given). For a parametric neuron (rate given) returns the
    programs' partial sums of dL/dk, fp32 [programs] (their sum is dL/dk: one deterministic reduction), else
    None."""
    key = (True, x.shape, x.stride(), x.dtype, x.is_cuda, id(spec), v_init is not None, grad_v_final is not None,
           sum_over_time)
    plan = _PLANS.get(key)
    if plan is None or plan.spec is not spec:
        plan = _plan_of(key, True, x, spec, v_init is not None, grad_v_final is not None, sum_over_time)
    (grid, args, options), none = _launch(plan, x, (x, grad_spikes, grad_x, v_init, checkpoints, grad_v_final,
                                                    grad_v_init))
    partials = None if rate is None else torch.empty(grid[0], dtype=torch.float32, device=x.device)
    _lif_bwd_kernel[grid](
        x, grad_spikes, none if v_init is None else v_init, none if checkpoints is None else checkpoints,
        none if grad_v_final is None else grad_v_final, grad_x, none if grad_v_init is None else grad_v_init,
        none if rate is None else rate, none if partials is None else partials, *args, **options)
    return partials


__all__ = ["lif_forward", "lif_backward", "MAX_CHUNK", "checkpoints_for", "chunk_for", "NEURON_CODES",
           "SURROGATE_CODES", "PARAMETRIC"]
