"""BatchNorm + (residual) + multistep neuron, fused: the neuron's input y = BN(x) [+ r] never exists in memory.

Layout. x is [T, B, C, *spatial] in a dense time-major layout (each timestep one dense block, any dim order,
e.g. NCHW or channels_last), or one timestep with time stride 0 (direct encoding). In a dense layout the
offset of an element within a timestep is   outer·(C·INNER) + c·INNER + inner   where INNER is the channel
dim's stride (HW for NCHW, 1 for channels_last and for [T, B, C]) and OUTER = N / (C·INNER). Every kernel
here walks one [BLOCK_O, BLOCK_C, BLOCK_I] tile of that (outer, channel, inner) view through all timesteps,
so a tile's per-channel constants are loaded once and its per-channel sums are formed in registers (no
atomics, no channel gather).

Passes (bytes moved per element of x per timestep, e = x's element size, +e where a residual r is read):
  forward, training   stats: read x (e)                       per-program count/mean/M2 per channel (Chan)
                      finalize: per channel (negligible)      mean, 1/std, running statistics, scale, shift
                      fire: read x [, r], write spikes (2e)   y = (x − μ)·scale + shift [+ r], the neuron
                      = 3e (+e): the floor (two reads of x, one write). Unfused (BatchNorm, add, neuron):
                      5e (+3e: the add reads y and r and writes their sum, which the neuron reads again).
  forward, eval       finalize from the running statistics, then fire: 2e (+e), a single pass.
  backward            neuron: read x, dL/ds [, r], write g (3e)   g = dL/dy; Σg and Σg·x̂ per channel
                      finalize: per channel (negligible)          dL/dweight, dL/dbias, grad_x's coefficients
                      grad_x: read g, x, write dL/dx (3e)         dL/dx = a·(g − Σg/n − x̂·Σg·x̂/n)
                      = 6e (+e), against 8e unfused (the neuron's 3e, then BatchNorm's reduction pass over
                      g and x and its elementwise pass, 5e).
Residual normalised in the same op (RESIDUAL_BN: y = BN(x) + BN_r(r), a ResNet block's downsample shortcut,
r the shortcut convolution's output with its own [4, C] table): forward 5e (r's statistics pass, and fire
reads r) against 11e for two BatchNorms, the add and the neuron; backward 10e (the neuron kernel reads r and
adds Σg·r̂ to its partials; a second finalisation and grad_input pass give dL/dr) against 13e.
Saved for the backward: x (as given: one timestep when broadcast), r when given (the caller's tensor; in
a ResNet block it is the block input, which the block's first convolution saves anyway, or the shortcut
convolution's output, whose normalised value never exists), the fp32 per-channel [mean, 1/std, scale, shift]
(twice with RESIDUAL_BN) and, for T > 8, the fp32 membrane every 8 steps (as fastsnn.kernels.lif).

The forward and the backward form y with the same tl.fma, so the recomputed membrane equals the forward's
bit for bit; the neuron arithmetic is fastsnn.kernels.lif's.
"""
import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import Launch, launch, next_pow2
from .neuron import (NEURON_PLIF, NEURON_PLIF_NO_DECAY, NUM_WARPS, PARAMETRIC, SURROGATE_CODES, UNALIGNED_ELEMENTS,
                     arithmetic_modes, charge, charge_slopes, checkpoints_for, chunk_for, fire_and_reset,
                     launch_constants, membrane_grad, parametric_charge, rate_slope)

# rows of the per-channel fp32 table the forward writes and the backward reads: stats[k, c]
MEAN: tl.constexpr = tl.constexpr(0)
RSTD: tl.constexpr = tl.constexpr(1)
SCALE: tl.constexpr = tl.constexpr(2)
SHIFT: tl.constexpr = tl.constexpr(3)
# rows of the backward's per-channel coefficients: coef[k, c]
COEF_A: tl.constexpr = tl.constexpr(0)
COEF_K1: tl.constexpr = tl.constexpr(1)
COEF_K2: tl.constexpr = tl.constexpr(2)


@triton.jit
def _tile(pid_oi, pid_c, OUTER, C, INNER, NUM_I_TILES,
          BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """(offsets within a timestep [BO, BC, BI] int64, their mask, the tile's channels [BC], channel mask)."""
    i_o = pid_oi // NUM_I_TILES
    i_i = pid_oi % NUM_I_TILES
    o_o = i_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_i = i_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_c = o_c < C
    offsets = (o_o[:, None, None] * (C * INNER) + (o_c * INNER)[None, :, None] + o_i[None, None, :])
    mask = (o_o < OUTER)[:, None, None] & m_c[None, :, None] & (o_i < INNER)[None, None, :]
    return offsets, mask, o_c, m_c


@triton.jit
def _channel_sum(b):
    """[BO, BC, BI] -> [BC]"""
    return tl.sum(tl.sum(b, axis=2), axis=0)


@triton.jit
def _per_channel(p, o_c, m_c, other):
    """A per-channel fp32 row [BC] as a [1, BC, 1] tile operand."""
    return tl.load(p + o_c, mask=m_c, other=other).to(tl.float32)[None, :, None]


@triton.jit
def _bn_affine(b_x, mean, scale, shift):
    """y = (x − μ)·scale + shift, one rounding for the product and sum: forward and backward agree exactly."""
    return tl.fma(b_x - mean, scale, shift)


@triton.jit
def _bn_stats_kernel(
    p_x, p_part, T_STEPS, stride_xt, OUTER, C, INNER, NUM_I_TILES, P,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Per program and channel: (count, mean, M2) of its tile over T_STEPS timesteps, merged timestep by
    timestep with Chan's formula (no E[x²] − E[x]² cancellation). p_part: fp32 [3, P, C]."""
    pid_oi = tl.program_id(0)
    offsets, mask, o_c, m_c = _tile(pid_oi, tl.program_id(1), OUTER, C, INNER, NUM_I_TILES,
                                    BLOCK_O, BLOCK_C, BLOCK_I)
    n_tile = _channel_sum(mask.to(tl.float32))
    inv_n_tile = 1.0 / tl.maximum(n_tile, 1.0)
    b_n = tl.zeros([BLOCK_C], tl.float32)
    b_mean = tl.zeros([BLOCK_C], tl.float32)
    b_m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(T_STEPS):
        b_x = tl.load(p_x + t * stride_xt + offsets, mask=mask, other=0.0).to(tl.float32)
        t_mean = _channel_sum(b_x) * inv_n_tile
        b_d = tl.where(mask, b_x - t_mean[None, :, None], 0.0)
        t_m2 = _channel_sum(b_d * b_d)
        n_new = b_n + n_tile
        frac = n_tile / tl.maximum(n_new, 1.0)
        delta = t_mean - b_mean
        b_mean += delta * frac
        b_m2 += t_m2 + delta * delta * b_n * frac
        b_n = n_new
    row = pid_oi.to(tl.int64) * C + o_c
    tl.store(p_part + row, b_n, mask=m_c)
    tl.store(p_part + P * C + row, b_mean, mask=m_c)
    tl.store(p_part + 2 * P * C + row, b_m2, mask=m_c)


@triton.jit
def _bn_finalize_fwd_kernel(
    p_part, p_weight, p_bias, p_rmean, p_rvar, p_stats, P, C, momentum, eps,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """stats[MEAN, RSTD, SCALE, SHIFT] per channel: from the batch (merging the programs' partials; the
    running statistics updated in place with the unbiased variance) or, in eval mode, from the running ones."""
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    if TRAINING:
        b_n = tl.zeros([BLOCK_C], tl.float32)
        b_s = tl.zeros([BLOCK_C], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m = (o_p < P)[:, None] & m_c[None, :]
            o = o_p[:, None].to(tl.int64) * C + o_c[None, :]
            n_p = tl.load(p_part + o, mask=m, other=0.0)
            b_n += tl.sum(n_p, axis=0)
            b_s += tl.sum(n_p * tl.load(p_part + P * C + o, mask=m, other=0.0), axis=0)
        mean = b_s / tl.maximum(b_n, 1.0)
        b_m2 = tl.zeros([BLOCK_C], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            o_p = p0 + tl.arange(0, BLOCK_P)
            m = (o_p < P)[:, None] & m_c[None, :]
            o = o_p[:, None].to(tl.int64) * C + o_c[None, :]
            n_p = tl.load(p_part + o, mask=m, other=0.0)
            d = tl.load(p_part + P * C + o, mask=m, other=0.0) - mean[None, :]
            b_m2 += tl.sum(tl.load(p_part + 2 * P * C + o, mask=m, other=0.0) + n_p * d * d, axis=0)
        var = b_m2 / tl.maximum(b_n, 1.0)
        if UPDATE_RUNNING:
            r_mean = tl.load(p_rmean + o_c, mask=m_c, other=0.0).to(tl.float32)
            r_var = tl.load(p_rvar + o_c, mask=m_c, other=0.0).to(tl.float32)
            unbiased = b_m2 / tl.maximum(b_n - 1.0, 1.0)
            tl.store(p_rmean + o_c, ((1.0 - momentum) * r_mean + momentum * mean).to(p_rmean.dtype.element_ty),
                     mask=m_c)
            tl.store(p_rvar + o_c, ((1.0 - momentum) * r_var + momentum * unbiased).to(p_rvar.dtype.element_ty),
                     mask=m_c)
    else:
        mean = tl.load(p_rmean + o_c, mask=m_c, other=0.0).to(tl.float32)
        var = tl.load(p_rvar + o_c, mask=m_c, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    if HAS_WEIGHT:
        weight = tl.load(p_weight + o_c, mask=m_c, other=1.0).to(tl.float32)
    else:
        weight = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_BIAS:
        shift = tl.load(p_bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_C], tl.float32)
    tl.store(p_stats + MEAN * C + o_c, mean, mask=m_c)
    tl.store(p_stats + RSTD * C + o_c, rstd, mask=m_c)
    tl.store(p_stats + SCALE * C + o_c, weight * rstd, mask=m_c)
    tl.store(p_stats + SHIFT * C + o_c, shift, mask=m_c)


@triton.jit
def _bn_lif_fwd_kernel(
    p_x, p_r, p_stats, p_rstats, p_s, p_ck, p_rate,
    stride_xt, N, OUTER, C, INNER, NUM_I_TILES, tau, inv_tau, v_threshold, v_reset,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DIVIDE: tl.constexpr,
    MULTIPLY: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_BN: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """y = BN(x) [+ r, or + BN_r(r) with RESIDUAL_BN (p_rstats: r's table)], then the neuron (p_rate: k of a
    parametric neuron)."""
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    PARAMETRIC: tl.constexpr = NEURON == NEURON_PLIF or NEURON == NEURON_PLIF_NO_DECAY
    rate = tl.load(p_rate).to(tl.float32) if PARAMETRIC else 0.0
    offsets, mask, o_c, m_c = _tile(tl.program_id(0), tl.program_id(1), OUTER, C, INNER, NUM_I_TILES,
                                    BLOCK_O, BLOCK_C, BLOCK_I)
    mean = _per_channel(p_stats + MEAN * C, o_c, m_c, 0.0)
    scale = _per_channel(p_stats + SCALE * C, o_c, m_c, 0.0)
    shift = _per_channel(p_stats + SHIFT * C, o_c, m_c, 0.0)
    if RESIDUAL_BN:
        mean_r = _per_channel(p_rstats + MEAN * C, o_c, m_c, 0.0)
        scale_r = _per_channel(p_rstats + SCALE * C, o_c, m_c, 0.0)
        shift_r = _per_channel(p_rstats + SHIFT * C, o_c, m_c, 0.0)
    b_v = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32) + v_reset
    for i_c in range(NUM_CHUNKS):
        if i_c > 0:  # the membrane entering this chunk, for the backward
            tl.store(p_ck + (i_c - 1) * N + offsets, b_v, mask=mask)
        b_ys = ()  # CHUNK x the neuron input: every load of the chunk before any store
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            m_t = mask & (t < T)
            b_y = _bn_affine(tl.load(p_x + t * stride_xt + offsets, mask=m_t, other=0.0).to(tl.float32),
                             mean, scale, shift)
            if HAS_RESIDUAL:
                b_r = tl.load(p_r + t * N + offsets, mask=m_t, other=0.0).to(tl.float32)
                if RESIDUAL_BN:
                    b_r = _bn_affine(b_r, mean_r, scale_r, shift_r)
                b_y += b_r
            b_ys += (b_y,)
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            b_h = charge(b_v, b_ys[j], tau, inv_tau, rate, v_reset, NEURON, DIVIDE, MULTIPLY)
            b_fired, b_v_next = fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
            tl.store(p_s + t * N + offsets, b_fired.to(p_s.dtype.element_ty), mask=mask & (t < T))
            b_v = tl.where(t < T, b_v_next, b_v)


@triton.jit
def _bn_lif_bwd_kernel(
    p_x, p_r, p_gs, p_stats, p_rstats, p_ck, p_g, p_part, p_rate, p_rate_part,
    stride_xt, N, OUTER, C, INNER, NUM_I_TILES, P, tau, inv_tau, v_threshold, v_reset, alpha,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, DETACH_RESET: tl.constexpr, DIVIDE: tl.constexpr, MULTIPLY: tl.constexpr,
    SUM_OVER_TIME: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_BN: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """g = dL/dy (y: the neuron input) in x's dtype (one timestep holding Σ_t g_t when x is broadcast over
    time), and per program and channel the fp32 partials Σg, Σg·x̂ (x̂ = (x − μ)/σ) and, with RESIDUAL_BN,
    Σg·r̂ (r̂: r normalised by its own table p_rstats): p_part [2 or 3, P, C]; for a parametric neuron also the
    program's Σ dL/dh·dh/dk in p_rate_part[pid_oi, pid_c]."""
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    PARAMETRIC: tl.constexpr = NEURON == NEURON_PLIF or NEURON == NEURON_PLIF_NO_DECAY
    rate = tl.load(p_rate).to(tl.float32) if PARAMETRIC else 0.0
    pid_oi = tl.program_id(0)
    offsets, mask, o_c, m_c = _tile(pid_oi, tl.program_id(1), OUTER, C, INNER, NUM_I_TILES,
                                    BLOCK_O, BLOCK_C, BLOCK_I)
    mean = _per_channel(p_stats + MEAN * C, o_c, m_c, 0.0)
    rstd = _per_channel(p_stats + RSTD * C, o_c, m_c, 0.0)
    scale = _per_channel(p_stats + SCALE * C, o_c, m_c, 0.0)
    shift = _per_channel(p_stats + SHIFT * C, o_c, m_c, 0.0)
    if RESIDUAL_BN:
        mean_r = _per_channel(p_rstats + MEAN * C, o_c, m_c, 0.0)
        rstd_r = _per_channel(p_rstats + RSTD * C, o_c, m_c, 0.0)
        scale_r = _per_channel(p_rstats + SCALE * C, o_c, m_c, 0.0)
        shift_r = _per_channel(p_rstats + SHIFT * C, o_c, m_c, 0.0)
    dh_dv, dh_dy = charge_slopes(inv_tau, rate, NEURON)
    b_gk = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32)  # Σ_t dL/dh·dh/dk (a parametric neuron)
    b_gv = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32)
    b_sum_g = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32)  # Σ_t g (per element; per channel at the end)
    b_sum_gx = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32)  # Σ_t g·x̂
    if RESIDUAL_BN:
        b_sum_gr = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32)  # Σ_t g·r̂
    for k in range(NUM_CHUNKS):
        i_c = NUM_CHUNKS - 1 - k
        if i_c == 0:
            b_v = tl.zeros([BLOCK_O, BLOCK_C, BLOCK_I], tl.float32) + v_reset
        else:
            b_v = tl.load(p_ck + (i_c - 1) * N + offsets, mask=mask, other=0.0)
        # every load of the chunk before any store, kept in the loaded dtype (two 16-bit values per register)
        # until used: with the per-channel sums this keeps a chunk of 8 steps within the register file
        b_xs = ()
        b_gss = ()
        b_rs = ()
        for j in tl.static_range(CHUNK):
            t = i_c * CHUNK + j
            m_t = mask & (t < T)
            b_xs += (tl.load(p_x + t * stride_xt + offsets, mask=m_t, other=0.0),)
            b_gss += (tl.load(p_gs + t * N + offsets, mask=m_t, other=0.0),)
            if HAS_RESIDUAL:
                b_rs += (tl.load(p_r + t * N + offsets, mask=m_t, other=0.0),)
        b_hs = ()  # the recomputed membrane before firing, CHUNK x fp32
        b_ds = ()  # a parametric neuron's dh/dk per step
        for j in tl.static_range(CHUNK):
            b_y = _bn_affine(b_xs[j].to(tl.float32), mean, scale, shift)
            if HAS_RESIDUAL:
                if RESIDUAL_BN:
                    b_y += _bn_affine(b_rs[j].to(tl.float32), mean_r, scale_r, shift_r)
                else:
                    b_y += b_rs[j].to(tl.float32)
            if PARAMETRIC:  # dh/dk, the charge's own term
                b_d = tl.where(i_c * CHUNK + j < T, rate_slope(b_v, b_y, v_reset, NEURON), 0.0)
                b_ds += (b_d,)
                b_h = parametric_charge(b_v, b_y, b_d, rate, NEURON, MULTIPLY)
            else:
                b_h = charge(b_v, b_y, tau, inv_tau, rate, v_reset, NEURON, DIVIDE, MULTIPLY)
            b_hs += (b_h,)
            _, b_v = fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        for j in tl.static_range(CHUNK - 1, -1, -1):
            t = i_c * CHUNK + j
            b_gh = membrane_grad(b_hs[j], b_gss[j].to(tl.float32), b_gv, v_threshold, v_reset, alpha, SURROGATE,
                                 HARD_RESET, DETACH_RESET)
            if PARAMETRIC:
                b_gk += b_gh * b_ds[j]  # 0 past T
            b_g = tl.where(t < T, b_gh * dh_dy, 0.0)
            b_sum_g += b_g
            if not SUM_OVER_TIME:
                b_sum_gx += b_g * ((b_xs[j].to(tl.float32) - mean) * rstd)
                if RESIDUAL_BN:
                    b_sum_gr += b_g * ((b_rs[j].to(tl.float32) - mean_r) * rstd_r)
                tl.store(p_g + t * N + offsets, b_g.to(p_g.dtype.element_ty), mask=mask & (t < T))
            b_gv = tl.where(t < T, b_gh * dh_dv, b_gv)  # steps past T (a partial last chunk) pass it through
    if SUM_OVER_TIME:  # x̂ is the same at every step: Σ_t g_t·x̂ = (Σ_t g_t)·x̂
        b_x = tl.load(p_x + offsets, mask=mask, other=0.0).to(tl.float32)
        b_sum_gx = b_sum_g * ((b_x - mean) * rstd)
        tl.store(p_g + offsets, b_sum_g.to(p_g.dtype.element_ty), mask=mask)
    row = pid_oi.to(tl.int64) * C + o_c
    tl.store(p_part + row, _channel_sum(tl.where(mask, b_sum_g, 0.0)), mask=m_c)
    tl.store(p_part + P * C + row, _channel_sum(tl.where(mask, b_sum_gx, 0.0)), mask=m_c)
    if RESIDUAL_BN:
        tl.store(p_part + 2 * P * C + row, _channel_sum(tl.where(mask, b_sum_gr, 0.0)), mask=m_c)
    if PARAMETRIC:
        b_gk_c = _channel_sum(tl.where(mask, b_gk, 0.0))  # [BC]
        tl.store(p_rate_part + pid_oi.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(b_gk_c, axis=0))


@triton.jit
def _bn_finalize_bwd_kernel(
    p_part, p_stats, p_weight, p_gweight, p_gbias, p_coef, P, C, inv_count, gx_row,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dL/dweight = Σg·x̂, dL/dbias = Σg (fp32), and grad_x's coefficients coef[A, K1, K2] per channel:
    dL/dx = A·(g − K1 − x̂·K2), A = weight/σ, K1 = Σg/n, K2 = Σg·x̂/n (K1 = K2 = 0 in eval mode).
    p_part: the partials [rows, P, C], Σg in row 0 and Σg·x̂ in row gx_row (x̂ of x: 1; r̂ of a normalised
    residual: 2)."""
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_g = tl.zeros([BLOCK_C], tl.float32)
    b_gx = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m = (o_p < P)[:, None] & m_c[None, :]
        o = o_p[:, None].to(tl.int64) * C + o_c[None, :]
        b_g += tl.sum(tl.load(p_part + o, mask=m, other=0.0), axis=0)
        b_gx += tl.sum(tl.load(p_part + gx_row * P * C + o, mask=m, other=0.0), axis=0)
    if GRAD_WEIGHT:
        tl.store(p_gweight + o_c, b_gx, mask=m_c)
    if GRAD_BIAS:
        tl.store(p_gbias + o_c, b_g, mask=m_c)
    if HAS_WEIGHT:
        weight = tl.load(p_weight + o_c, mask=m_c, other=1.0).to(tl.float32)
    else:
        weight = tl.full([BLOCK_C], 1.0, tl.float32)
    rstd = tl.load(p_stats + RSTD * C + o_c, mask=m_c, other=0.0)
    tl.store(p_coef + COEF_A * C + o_c, weight * rstd, mask=m_c)
    if TRAINING:
        tl.store(p_coef + COEF_K1 * C + o_c, b_g * inv_count, mask=m_c)
        tl.store(p_coef + COEF_K2 * C + o_c, b_gx * inv_count, mask=m_c)
    else:
        tl.store(p_coef + COEF_K1 * C + o_c, tl.zeros([BLOCK_C], tl.float32), mask=m_c)
        tl.store(p_coef + COEF_K2 * C + o_c, tl.zeros([BLOCK_C], tl.float32), mask=m_c)


@triton.jit
def _bn_grad_input_kernel(
    p_g, p_x, p_stats, p_coef, p_gx, T_STEPS, stride_xt, N, OUTER, C, INNER, NUM_I_TILES,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """dL/dx = A·(g − K1 − x̂·K2) over T_STEPS timesteps of g (time stride N) and x (time stride stride_xt)."""
    offsets, mask, o_c, m_c = _tile(tl.program_id(0), tl.program_id(1), OUTER, C, INNER, NUM_I_TILES,
                                    BLOCK_O, BLOCK_C, BLOCK_I)
    mean = _per_channel(p_stats + MEAN * C, o_c, m_c, 0.0)
    rstd = _per_channel(p_stats + RSTD * C, o_c, m_c, 0.0)
    a = _per_channel(p_coef + COEF_A * C, o_c, m_c, 0.0)
    k1 = _per_channel(p_coef + COEF_K1 * C, o_c, m_c, 0.0)
    k2 = _per_channel(p_coef + COEF_K2 * C, o_c, m_c, 0.0)
    for t in range(T_STEPS):
        b_g = tl.load(p_g + t * N + offsets, mask=mask, other=0.0).to(tl.float32)
        b_x = tl.load(p_x + t * stride_xt + offsets, mask=mask, other=0.0).to(tl.float32)
        b_gx = a * (b_g - k1 - ((b_x - mean) * rstd) * k2)
        tl.store(p_gx + t * N + offsets, b_gx.to(p_gx.dtype.element_ty), mask=mask)


# ---- launchers ----

FINALIZE_BLOCK_C = 32
FINALIZE_BLOCK_P = 64
MAX_BLOCK_C = 128  # channels per tile when the channel dim is innermost



class Geometry:
    """The (outer, channel, inner) view of one timestep and the tiling of it that every kernel here shares."""

    __slots__ = ("T", "N", "outer", "C", "inner", "stride_xt", "itemsize", "block", "num_i_tiles", "grid",
                 "programs", "_blocks")

    def __init__(self, T: int, N: int, C: int, inner: int, stride_xt: int, per_thread: int, itemsize: int):
        self.T, self.N, self.C, self.inner, self.stride_xt, self.itemsize = T, N, C, inner, stride_xt, itemsize
        self.outer = N // (C * inner)
        total = per_thread * 32 * NUM_WARPS
        # the contiguous run first (H·W for NCHW, channels for channels_last), then outer rows, then (NCHW
        # with few rows, e.g. batch 1) more channels, so that a program holds `total` elements when it can
        if inner > 1:
            block_i = min(next_pow2(inner), total)
            block_o = min(next_pow2(self.outer), total // block_i)
            block_c = max(1, min(next_pow2(C), total // (block_i * block_o), MAX_BLOCK_C))
        else:
            block_i = 1
            block_c = min(next_pow2(C), MAX_BLOCK_C, total)
            block_o = max(1, min(next_pow2(self.outer), total // block_c))
        self.block = (block_o, block_c, block_i)
        self.num_i_tiles = -(-inner // block_i)
        self.programs = -(-self.outer // block_o) * self.num_i_tiles  # P: programs along (outer, inner)
        self.grid = (self.programs, -(-C // block_c))
        self._blocks = dict(BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_I=block_i)

    @property
    def count(self) -> int:
        """Values per channel in the statistics: T_STEPS · OUTER · INNER."""
        return self.steps * self.outer * self.inner

    @property
    def steps(self) -> int:
        """Stored timesteps of x: 1 when it is broadcast over time."""
        return 1 if self.stride_xt == 0 else self.T

    def view_args(self):
        return (self.outer, self.C, self.inner, self.num_i_tiles)

    def blocks(self) -> dict:
        return self._blocks  # shared: callers unpack it, never change it


def geometry(x, *tensors) -> Geometry:
    """The Geometry of x [T, B, C, ...] (dense time-major, or time stride 0) for a call that also reads or
    writes `tensors` (None allowed) in x's layout. Each thread owns 16 contiguous bytes (4 fp32 or 8 fp16/bf16
    values, 128-bit accesses) when every pointer is 16-byte aligned and the contiguous run (H·W for NCHW, C
    for channels_last), N and the time stride are multiples of that; else 2 values."""
    addresses = x.data_ptr()
    for t in tensors:
        if t is not None:
            addresses |= t.data_ptr()
    return _geometry_of(x.shape, x.stride(), x.element_size(), addresses % 16 == 0)


@functools.lru_cache(maxsize=1024)
def _geometry_of(shape, strides, itemsize: int, aligned_pointers: bool) -> Geometry:
    T, C = shape[0], shape[2]
    N = math.prod(shape[1:])
    inner = strides[2] if C > 1 else N
    stride_xt = strides[0] if T > 1 else N
    per_thread = 16 // itemsize
    run = inner if inner > 1 else C
    aligned = aligned_pointers and run % per_thread == 0 and N % per_thread == 0 and stride_xt % per_thread == 0
    return _geometry(T, N, C, inner, stride_xt, per_thread if aligned else UNALIGNED_ELEMENTS, itemsize)


# one Geometry object per distinct view (it is read-only): the launch plans below are keyed on it
_geometry = functools.lru_cache(maxsize=1024)(Geometry)




def _finalize_grid(C: int) -> tuple:
    return (-(-C // FINALIZE_BLOCK_C),)


# Launch plans: everything a launch needs besides the pointers (grid, scalar arguments, constexprs), decided
# once per (Geometry, arguments) and then looked up: per call only the pointers are gathered.

class StatisticsPlan(NamedTuple):
    stats: Launch
    finalize_grid: tuple
    finalize: Launch  # its first argument: the number of partials per channel


@functools.lru_cache(maxsize=1024)
def _statistics_plan(g: Geometry, training: bool, has_weight: bool, has_bias: bool, update: bool, momentum: float,
                     eps: float) -> StatisticsPlan:
    stats = launch(_bn_stats_kernel, (g.steps, g.stride_xt, *g.view_args(), g.programs),
                   dict(num_warps=NUM_WARPS, **g.blocks()))
    finalize = launch(_bn_finalize_fwd_kernel, (g.programs, g.C, float(momentum), float(eps)),
                      dict(TRAINING=training, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, UPDATE_RUNNING=update,
                           BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C))
    return StatisticsPlan(stats, _finalize_grid(g.C), finalize)


def _warps(itemsize: int, T: int, heavy: bool) -> int:
    """A chunk of 8 16-bit steps at 8 values per thread spills where the kernel also holds a second set of
    per-channel constants or sums (`heavy`): 8 warps there (4 values, 64-bit accesses per thread)."""
    return 2 * NUM_WARPS if heavy and itemsize == 2 and chunk_for(T) > 4 else NUM_WARPS


@functools.lru_cache(maxsize=1024)
def _fire_plan(g: Geometry, spec, cuda: bool, has_residual: bool, residual_bn: bool) -> Launch:
    constants = launch_constants(spec)
    args = (g.stride_xt, g.N, *g.view_args(), *constants.scalars)
    heavy = residual_bn or spec.kind in PARAMETRIC
    kw = dict(T=g.T, CHUNK=chunk_for(g.T), HAS_RESIDUAL=has_residual, RESIDUAL_BN=residual_bn,
              num_warps=_warps(g.itemsize, g.T, heavy), **arithmetic_modes(cuda), **constants.constexprs, **g.blocks())
    return launch(_bn_lif_fwd_kernel, args, kw)


def _finalize_launch(args: tuple, training: bool, has_weight: bool, grad_weight: bool, grad_bias: bool) -> Launch:
    return launch(_bn_finalize_bwd_kernel, args, dict(
        TRAINING=training, HAS_WEIGHT=has_weight, GRAD_WEIGHT=grad_weight, GRAD_BIAS=grad_bias,
        BLOCK_P=FINALIZE_BLOCK_P, BLOCK_C=FINALIZE_BLOCK_C))


class ResidualPlan(NamedTuple):
    """The residual BatchNorm's finalisation (Σg·r̂ in row 2) and grad_input (time stride N)."""
    finalize: Launch
    input: Launch


class BackwardPlan(NamedTuple):
    neuron: Launch
    finalize_grid: tuple
    finalize: Launch
    input: Launch
    residual: ResidualPlan | None


@functools.lru_cache(maxsize=1024)
def _backward_plan(g: Geometry, spec, cuda: bool, training: bool, has_residual: bool, has_weight: bool,
                   grad_weight: bool, grad_bias: bool, residual_bn=None) -> BackwardPlan:
    """residual_bn: None, or (has_weight, grad_weight, grad_bias) of the residual's own BatchNorm."""
    constants = launch_constants(spec)
    # the backward holds per-channel sums besides the constants (8 channels per thread in channels_last)
    warps = _warps(g.itemsize, g.T, heavy=True)
    neuron_args = (g.stride_xt, g.N, *g.view_args(), g.programs, *constants.scalars, spec.alpha)
    neuron = launch(_bn_lif_bwd_kernel, neuron_args, dict(
        T=g.T, CHUNK=chunk_for(g.T), SURROGATE=SURROGATE_CODES[spec.surrogate], DETACH_RESET=spec.detach_reset,
        SUM_OVER_TIME=g.stride_xt == 0 and g.T > 1, HAS_RESIDUAL=has_residual, RESIDUAL_BN=residual_bn is not None,
        num_warps=warps, **arithmetic_modes(cuda), **constants.constexprs, **g.blocks()))
    finalize = _finalize_launch((g.programs, g.C, 1.0 / g.count, 1), training, has_weight, grad_weight, grad_bias)
    input_kw = dict(num_warps=NUM_WARPS, **g.blocks())
    grad_input = launch(_bn_grad_input_kernel, (g.steps, g.stride_xt, g.N, *g.view_args()), input_kw)
    residual = None
    if residual_bn is not None:
        residual = ResidualPlan(
            _finalize_launch((g.programs, g.C, 1.0 / (g.T * g.outer * g.inner), 2), training, *residual_bn),
            launch(_bn_grad_input_kernel, (g.T, g.N, g.N, *g.view_args()), input_kw))
    return BackwardPlan(neuron, _finalize_grid(g.C), finalize, grad_input, residual)


def merged_statistics(partials):
    """The programs' (count, mean, M2) partials [3, P, C] merged into one set per channel [3, 1, C] (Chan's
    formula, fp32; the finalize kernel's merge, done once more on the host's side of a collective)."""
    count = partials[0].sum(0)
    mean = (partials[0] * partials[1]).sum(0) / count.clamp(min=1.0)
    m2 = (partials[2] + partials[0] * (partials[1] - mean).square()).sum(0)
    return torch.stack((count, mean, m2)).unsqueeze(1)


def gathered_statistics(partials, group):
    """Synchronised BatchNorm's forward collective: this rank's partials merged (merged_statistics), then every
    rank's [3, C] gathered into [3, world, C], the partials of the global batch (one all_gather per call; ranks
    may hold different batch sizes: each carries its own count)."""
    import torch.distributed as dist

    mine = merged_statistics(partials)[:, 0].contiguous()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return torch.stack(every, dim=1)


def bn_statistics(x, geometry, weight, bias, running_mean, running_var, stats, training, momentum, eps, group=None):
    """Fills stats [4, C] (fp32: mean, 1/std, scale, shift); in training mode from x (2 launches), updating
    running_mean/var in place when given; else from the running statistics (1 launch). group: a process group
    whose ranks' batches the training statistics span (synchronised BatchNorm: one all_gather of [3, C]
    between the two launches), or None."""
    g = geometry
    update = training and running_mean is not None
    plan = _statistics_plan(g, training, weight is not None, bias is not None, update, momentum, eps)
    dummy = stats
    finalize_args = plan.finalize.args
    if training:
        partials = stats.new_empty(3, g.programs, g.C)
        _bn_stats_kernel[g.grid](x, partials, *plan.stats.args, **plan.stats.options)
        if group is not None:
            partials = gathered_statistics(partials, group)
            finalize_args = (partials.shape[1], *finalize_args[1:])
    else:
        partials = dummy
    _bn_finalize_fwd_kernel[plan.finalize_grid](
        partials, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if running_mean is None else running_mean, dummy if running_var is None else running_var, stats,
        *finalize_args, **plan.finalize.options)


def bn_fire(x, residual, stats, spikes, checkpoints, geometry, spec, residual_stats=None, rate=None):
    """spikes [T, ...] (time stride N, x's layout) of the neuron `spec` over y = BN(x) [+ residual]; with
    residual_stats (the residual's own [4, C] table, see bn_statistics) y = BN(x) + BN_r(residual). rate: a
    parametric neuron's k = sigmoid(w), fp32, one element."""
    g = geometry
    plan = _fire_plan(g, spec, x.is_cuda, residual is not None, residual_stats is not None)
    dummy = stats
    _bn_lif_fwd_kernel[g.grid](
        x, dummy if residual is None else residual, stats, dummy if residual_stats is None else residual_stats,
        spikes, dummy if checkpoints is None else checkpoints, dummy if rate is None else rate, *plan.args,
        **plan.options)


def _summed_over_ranks(partials, grad_weights, count: int, group):
    """Synchronised BatchNorm's backward collective: the programs' sums [rows, P, C] summed into [rows, 1, C];
    each BatchNorm's dL/dweight, dL/dbias taken from this rank's sums (DDP then averages them over the ranks,
    as for any parameter); the sums and the element count then all-reduced over the group (one all_reduce per
    call): what grad_x's coefficients take. grad_weights: ((grad_weight, grad_bias, gx_row), ...). Returns the
    global sums and 1 / the global count."""
    import torch.distributed as dist

    local = partials.sum(1, keepdim=True)
    for grad_weight, grad_bias, gx_row in grad_weights:
        if grad_weight is not None:
            grad_weight.copy_(local[gx_row, 0])
        if grad_bias is not None:
            grad_bias.copy_(local[0, 0])
    flat = torch.cat((local.flatten(), local.new_tensor([float(count)])))
    dist.all_reduce(flat, group=group)
    return flat[:-1].view_as(local), 1.0 / float(flat[-1])


def bn_fire_backward(x, residual, grad_spikes, stats, checkpoints, grad_y, weight, grad_weight, grad_bias, grad_x,
                     geometry, spec, training, residual_bn=None, rate=None, group=None):
    """grad_y (= dL/d(residual); one timestep when x is broadcast over time), grad_weight/grad_bias (fp32 [C],
    or None) and grad_x (may be grad_y itself: each element is read before it is written): 3 launches
    (2 without grad_x). residual_bn: None, or (stats, weight, grad_weight, grad_bias, grad_input) of the
    residual's own BatchNorm (the forward's residual_stats; grad_input, dL/d(residual), may be None): 2 launches
    more, and grad_y is then dL/d(BN_r(residual)). For a parametric neuron (rate given) returns the programs'
    partial sums of dL/dk, fp32 (their sum is dL/dk), else None."""
    g = geometry
    r_flags = None if residual_bn is None else tuple(t is not None for t in residual_bn[1:4])
    plan = _backward_plan(g, spec, x.is_cuda, training, residual is not None, weight is not None,
                          grad_weight is not None, grad_bias is not None, r_flags)
    dummy = stats
    partials = stats.new_empty(2 if residual_bn is None else 3, g.programs, g.C)
    rate_partials = None if rate is None else stats.new_empty(g.grid[0] * g.grid[1])
    coef = stats.new_empty(3, g.C)
    _bn_lif_bwd_kernel[g.grid](
        x, dummy if residual is None else residual, grad_spikes, stats,
        dummy if residual_bn is None else residual_bn[0], dummy if checkpoints is None else checkpoints, grad_y,
        partials, dummy if rate is None else rate, dummy if rate_partials is None else rate_partials,
        *plan.neuron.args, **plan.neuron.options)
    finalize = plan.finalize
    synced = group is not None and training
    if synced:  # the sums span every rank's batch; the weights' gradients stay this rank's
        grad_weights = [(grad_weight, grad_bias, 1)]
        if residual_bn is not None:
            grad_weights.append((residual_bn[2], residual_bn[3], 2))
        partials, inv_count = _summed_over_ranks(partials, grad_weights, g.count, group)
        finalize = _finalize_launch((1, g.C, inv_count, 1), training, weight is not None, False, False)
    _bn_finalize_bwd_kernel[plan.finalize_grid](
        partials, stats, dummy if weight is None else weight, dummy if grad_weight is None else grad_weight,
        dummy if grad_bias is None else grad_bias, coef, *finalize.args, **finalize.options)
    if residual_bn is not None:  # before grad_x, which may overwrite grad_y
        r_stats, r_weight, r_grad_weight, r_grad_bias, r_grad_input = residual_bn
        r_coef = stats.new_empty(3, g.C)
        r_finalize = plan.residual.finalize
        if synced:
            r_finalize = _finalize_launch((1, g.C, inv_count, 2), training, r_weight is not None, False, False)
        _bn_finalize_bwd_kernel[plan.finalize_grid](
            partials, r_stats, dummy if r_weight is None else r_weight,
            dummy if r_grad_weight is None else r_grad_weight, dummy if r_grad_bias is None else r_grad_bias, r_coef,
            *r_finalize.args, **r_finalize.options)
        if r_grad_input is not None:
            _bn_grad_input_kernel[g.grid](grad_y, residual, r_stats, r_coef, r_grad_input, *plan.residual.input.args,
                                          **plan.residual.input.options)
    if grad_x is not None:
        _bn_grad_input_kernel[g.grid](grad_y, x, stats, coef, grad_x, *plan.input.args, **plan.input.options)
    return rate_partials


__all__ = ["Geometry", "geometry", "bn_statistics", "bn_fire", "bn_fire_backward", "checkpoints_for", "MEAN", "RSTD",
           "SCALE", "SHIFT"]
