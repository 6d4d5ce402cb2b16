"""TSER distillation loss: a forward kernel over (sample, time-tile) programs, a one-program reduction that
writes the loss and its terms, and a backward kernel that recomputes dL/dz from saved per-row statistics.

Launches per forward+backward: 3 (forward, reduce, backward); no host sync, no memset.

The forward grid is (B, ⌈T / T_TILE⌉). When both terms are separated over time (ts_ce and ts_kl) every
(t, b) row is independent and T_TILE = 1; a term fused over time needs z̄ = (1/T)·Σ_t z_t, so one program
holds a [T_TILE ≥ T, BLOCK_C] tile of a sample. Rows are walked in BLOCK_C chunks with online
(max-subtracted) log-sum-exps, so any class count works. Per row the forward saves four fp32 statistics
(log-sum-exps at 1, τ and τ_H, and the entropy), per sample the teacher's log-sum-exp, those of z̄ and the
label flag; the backward re-reads z and u and writes grad_output·dL/dz once, in z's dtype, with the
arithmetic in fp32 (so a loss-scaled fp16 gradient loses nothing to an intermediate half-precision store).

Labels: a sample whose label equals ignore_index is left out of the CE term (its mean runs over the
labelled samples, 0 when there are none) and still counts for KL and entropy. A label outside [0, C) that
is not ignore_index makes the loss, the terms and the gradient NaN (the host raises on the CPU before
launching; on CUDA the check costs no sync).
"""
import functools
from typing import NamedTuple

import triton
import triton.language as tl

from . import next_pow2, positional

ROW_STATS: tl.constexpr = tl.constexpr(4)  # per (t, b) row, the slots:
ROW_LSE: tl.constexpr = tl.constexpr(0)  # lse(z)
ROW_LSE_KL: tl.constexpr = tl.constexpr(1)  # lse(z/τ)
ROW_LSE_ENT: tl.constexpr = tl.constexpr(2)  # lse(z/τ_H)
ROW_ENTROPY: tl.constexpr = tl.constexpr(3)  # H(softmax(z/τ_H))
SAMPLE_STATS: tl.constexpr = tl.constexpr(4)  # per sample, the slots:
SAMPLE_LSE_TEACHER: tl.constexpr = tl.constexpr(0)  # lse(u/τ)
SAMPLE_LSE_MEAN: tl.constexpr = tl.constexpr(1)  # lse(z̄)
SAMPLE_LSE_MEAN_KL: tl.constexpr = tl.constexpr(2)  # lse(z̄/τ)
SAMPLE_LABELLED: tl.constexpr = tl.constexpr(3)  # 1.0 if the label counts for CE, else 0.0
PARTIALS: tl.constexpr = tl.constexpr(4)  # per (time tile, sample), the slots:
PART_CE: tl.constexpr = tl.constexpr(0)  # CE sum
PART_KL: tl.constexpr = tl.constexpr(1)  # KL sum
PART_ENTROPY: tl.constexpr = tl.constexpr(2)  # entropy sum
PART_BAD: tl.constexpr = tl.constexpr(3)  # 1.0 after a bad label, else 0.0
SCALARS: tl.constexpr = tl.constexpr(1)  # the CE gradient weight (1−α)/(T·n_labelled), NaN after a bad label


@triton.jit
def _online_rows(b_a, m_a, b_m, b_s):
    """One [R, BLOCK_C] block of R row-wise online log-sum-exps.

    Returns (new running max [R], rescale of the old sums [R], exp terms [R, BLOCK_C], new sum [R])."""
    b_a = tl.where(m_a, b_a, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_a, axis=1))
    b_scale = tl.exp(b_m - b_m_new)
    b_e = tl.exp(b_a - b_m_new[:, None])
    return b_m_new, b_scale, b_e, b_s * b_scale + tl.sum(b_e, axis=1)


@triton.jit
def _xlogx_term(b_p, b_a):
    """b_p·b_a where b_p > 0, else 0: a probability times a log-probability (or a logit), with 0·log 0 = 0, so a
    class with probability 0 (a −inf logit: a masked class) adds nothing instead of 0·(−inf) = NaN."""
    return b_p * tl.where(b_p > 0, b_a, 0.0)


@triton.jit
def _lse_start(R: tl.constexpr):
    """R empty online log-sum-exps: (running max, sum of exp); the finite start keeps masked rows nan-free."""
    return tl.full([R], -3.0e38, tl.float32), tl.zeros([R], tl.float32)


@triton.jit
def _teacher_lse(p_ub, C, inv_tau, BLOCK_C: tl.constexpr):
    """lse(u/τ) and Σ_c softmax(u/τ)_c·log softmax(u/τ)_c (= −H(p_u)) of one teacher row."""
    b_m, b_s = _lse_start(1)
    b_w = tl.zeros([1], tl.float32)
    for i_c in range(0, tl.cdiv(C, BLOCK_C)):
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = (o_c < C)[None, :]
        b_a = tl.load(p_ub + o_c[None, :], mask=m_c, other=0.0).to(tl.float32) * inv_tau  # [1, BC]
        b_m, b_scale, b_e, b_s = _online_rows(b_a, m_c, b_m, b_s)
        b_w = b_w * b_scale + tl.sum(_xlogx_term(b_e, b_a), axis=1)
    b_lse = b_m + tl.log(b_s)
    return tl.sum(b_lse, axis=0), tl.sum(b_w / b_s - b_lse, axis=0)


@triton.jit
def _teacher_probs(p_ub, o_c, m_c, inv_tau, lse_u):
    """softmax(u/τ) over one class block, [1, BLOCK_C], 0 in masked lanes."""
    b_a = tl.load(p_ub + o_c[None, :], mask=m_c[None, :], other=0.0).to(tl.float32) * inv_tau
    return tl.where(m_c[None, :], tl.exp(b_a - lse_u), 0.0)


@triton.jit
def _label(p_y, i_b, stride_y, ignore_index, C, SOFT: tl.constexpr):
    """(class index or −1, 1.0 if the label counts for CE else 0.0, 1.0 if it is bad else 0.0); −1 never
    matches a class, so an ignored or bad label adds nothing to CE. A soft target (a row of probabilities)
    always counts and is never bad; its class index is −1 (its CE reads the row)."""
    if SOFT:
        return tl.full([], -1, tl.int64), 1.0, 0.0
    i_y = tl.load(p_y + i_b * stride_y).to(tl.int64)
    labelled = i_y != ignore_index
    out_of_range = (i_y < 0) | (i_y >= C)
    counts = labelled & (i_y >= 0) & (i_y < C)
    return tl.where(counts, i_y, -1), counts.to(tl.float32), (labelled & out_of_range).to(tl.float32)


@triton.jit
def _target_probs(p_y, i_b, stride_y, o_c, m_c):
    """One class block of a soft target row, [1, BLOCK_C] fp32, 0 in masked lanes."""
    return tl.load(p_y + i_b * stride_y + o_c[None, :], mask=m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _target_sum(p_y, i_b, stride_y, C, BLOCK_C: tl.constexpr):
    """Σ_c q_c of a soft target row (1 for a probability row; CE(z, q) = Σq·lse(z) − Σ q·z in general)."""
    b_q = tl.zeros([1], tl.float32)
    for i_c in range(0, tl.cdiv(C, BLOCK_C)):
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        b_q += tl.sum(_target_probs(p_y, i_b, stride_y, o_c, o_c < C), axis=1)
    return tl.sum(b_q, axis=0)


@triton.jit
def _program_tile(p_z, p_u, T, C, stride_zt, stride_zb, stride_ub, T_TILE: tl.constexpr, VEC: tl.constexpr):
    """This program's sample and rows: (C, i_b, o_t, m_t, p_zb [T_TILE, 1], p_ub). C and the row strides are
    multiples of VEC (the host checked); written as x // VEC * VEC, which the compiler can prove
    (tl.multiple_of on a scalar is not used), rows are read VEC elements at a time."""
    C = C // VEC * VEC
    stride_zt = stride_zt // VEC * VEC
    stride_zb = stride_zb // VEC * VEC
    stride_ub = stride_ub // VEC * VEC
    i_b = tl.program_id(0).to(tl.int64)
    o_t = tl.program_id(1) * T_TILE + tl.arange(0, T_TILE)
    p_zb = p_z + i_b * stride_zb + o_t.to(tl.int64)[:, None] * stride_zt
    return C, i_b, o_t, o_t < T, p_zb, p_u + i_b * stride_ub


@triton.jit
def _tser_loss_fwd_kernel(
    p_z, p_u, p_y, p_stats,
    T, B, C, stride_zt, stride_zb, stride_ub, stride_y, ignore_index, inv_T, inv_tau, inv_tau_h,
    off_sample, off_part,
    T_TILE: tl.constexpr, BLOCK_C: tl.constexpr, TS_CE: tl.constexpr, TS_KL: tl.constexpr, HAS_ENT: tl.constexpr,
    VEC: tl.constexpr, SOFT: tl.constexpr,
):
    NEED_MEAN: tl.constexpr = (not TS_CE) or (not TS_KL)
    p_row, p_sample, p_part = p_stats, p_stats + off_sample, p_stats + off_part
    C, i_b, o_t, m_t, p_zb, p_ub = _program_tile(p_z, p_u, T, C, stride_zt, stride_zb, stride_ub, T_TILE, VEC)
    i_y, counts, bad = _label(p_y, i_b, stride_y, ignore_index, C, SOFT)
    lse_u, neg_ent_u = _teacher_lse(p_ub, C, inv_tau, BLOCK_C)

    # per row of the tile: CE at 1 (lse, z_y), KL at τ (lse, Σ p_u·z/τ), entropy at τ_H (lse, Σ e·a)
    b_m1, b_s1 = _lse_start(T_TILE)
    b_zy = tl.zeros([T_TILE], tl.float32)
    b_mk, b_sk = _lse_start(T_TILE)
    b_xk = tl.zeros([T_TILE], tl.float32)
    b_mh, b_sh = _lse_start(T_TILE)
    b_wh = tl.zeros([T_TILE], tl.float32)
    # the same for the time-mean row z̄ (one row: [1])
    b_m1m, b_s1m = _lse_start(1)
    b_zym = tl.zeros([1], tl.float32)
    b_mkm, b_skm = _lse_start(1)
    b_xkm = tl.zeros([1], tl.float32)
    b_qs = tl.zeros([1], tl.float32)  # Σ q of a soft target
    for i_c in range(0, tl.cdiv(C, BLOCK_C)):
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_z = m_t[:, None] & m_c[None, :]
        b_z = tl.load(p_zb + o_c[None, :], mask=m_z, other=0.0).to(tl.float32)  # [T_TILE, BC]
        b_is_y = (o_c == i_y)[None, :]
        if SOFT:
            b_q = _target_probs(p_y, i_b, stride_y, o_c, m_c)  # [1, BC]
            b_qs += tl.sum(b_q, axis=1)
        if TS_CE:
            b_m1, _, _, b_s1 = _online_rows(b_z, m_z, b_m1, b_s1)
            if SOFT:  # Σ q·z, with 0·(−inf) = 0 for a masked class the target gives no mass
                b_zy += tl.sum(_xlogx_term(b_q, tl.where(m_z, b_z, 0.0)), axis=1)
            else:
                b_zy += tl.sum(tl.where(b_is_y & m_z, b_z, 0.0), axis=1)
        if HAS_ENT:
            b_ah = b_z * inv_tau_h
            b_mh, b_scale, b_e, b_sh = _online_rows(b_ah, m_z, b_mh, b_sh)
            b_wh = b_wh * b_scale + tl.sum(_xlogx_term(b_e, b_ah), axis=1)
        b_pu = _teacher_probs(p_ub, o_c, m_c, inv_tau, lse_u)  # [1, BC]
        if TS_KL:
            b_mk, _, _, b_sk = _online_rows(b_z * inv_tau, m_z, b_mk, b_sk)
            b_xk += tl.sum(_xlogx_term(b_pu, b_z), axis=1) * inv_tau
        if NEED_MEAN:
            b_zm = tl.sum(b_z, axis=0)[None, :] * inv_T  # [1, BC]; the tile holds every timestep
            m_m = m_c[None, :]
            if not TS_CE:
                b_m1m, _, _, b_s1m = _online_rows(b_zm, m_m, b_m1m, b_s1m)
                if SOFT:
                    b_zym += tl.sum(_xlogx_term(b_q, b_zm), axis=1)
                else:
                    b_zym += tl.sum(tl.where(b_is_y & m_m, b_zm, 0.0), axis=1)
            if not TS_KL:
                b_mkm, _, _, b_skm = _online_rows(b_zm * inv_tau, m_m, b_mkm, b_skm)
                b_xkm += tl.sum(_xlogx_term(b_pu, b_zm), axis=1) * inv_tau

    # per-row statistics for the backward, and this tile's sums of the per-sample terms (rows past T
    # padded with sum 1 so that they stay finite)
    p_rows = p_row + (o_t.to(tl.int64) * B + i_b) * ROW_STATS
    ce = 0.0
    kl = 0.0
    ent = 0.0
    q_sum = tl.sum(b_qs, axis=0) if SOFT else 1.0  # CE(z, q) = Σq·lse(z) − Σ q·z (a class index: q one-hot)
    if TS_CE:
        b_lse1 = b_m1 + tl.log(tl.where(m_t, b_s1, 1.0))
        tl.store(p_rows + ROW_LSE, b_lse1, mask=m_t)
        ce = tl.sum(tl.where(m_t, b_lse1 * q_sum - b_zy, 0.0), axis=0)
    else:
        ce = tl.sum((b_m1m + tl.log(b_s1m)) * q_sum - b_zym, axis=0)
    if TS_KL:
        b_lsek = b_mk + tl.log(tl.where(m_t, b_sk, 1.0))
        tl.store(p_rows + ROW_LSE_KL, b_lsek, mask=m_t)
        kl = tl.sum(tl.where(m_t, neg_ent_u - b_xk + b_lsek, 0.0), axis=0)
    else:
        kl = tl.sum(neg_ent_u - b_xkm + b_mkm + tl.log(b_skm), axis=0)
    if HAS_ENT:
        b_sh = tl.where(m_t, b_sh, 1.0)
        b_lseh = b_mh + tl.log(b_sh)
        b_ent = b_lseh - b_wh / b_sh
        tl.store(p_rows + ROW_LSE_ENT, b_lseh, mask=m_t)
        tl.store(p_rows + ROW_ENTROPY, b_ent, mask=m_t)
        ent = tl.sum(tl.where(m_t, b_ent, 0.0), axis=0)
    i_tt = tl.program_id(1)
    p_p = p_part + (i_tt * B + i_b) * PARTIALS
    tl.store(p_p + PART_CE, ce * counts)
    tl.store(p_p + PART_KL, kl)
    tl.store(p_p + PART_ENTROPY, ent)
    tl.store(p_p + PART_BAD, bad)
    if i_tt == 0:
        p_s = p_sample + i_b * SAMPLE_STATS
        tl.store(p_s + SAMPLE_LSE_TEACHER, lse_u)
        if not TS_CE:
            tl.store(p_s + SAMPLE_LSE_MEAN, tl.sum(b_m1m + tl.log(b_s1m), axis=0))
        if not TS_KL:
            tl.store(p_s + SAMPLE_LSE_MEAN_KL, tl.sum(b_mkm + tl.log(b_skm), axis=0))
        tl.store(p_s + SAMPLE_LABELLED, counts)


@triton.jit
def _tser_loss_reduce_kernel(
    p_stats, p_loss, p_terms,
    B, n_part, ce_T, kl_T, inv_T, inv_TB, w_ce, w_kl, lam, off_sample, off_part, off_scalars,
    BLOCK: tl.constexpr,
):
    """One program: batch means of the terms, the loss, and the CE gradient weight for the backward."""
    p_sample, p_part, p_scalars = p_stats + off_sample, p_stats + off_part, p_stats + off_scalars
    b_ce = tl.zeros([BLOCK], tl.float32)
    b_kl = tl.zeros([BLOCK], tl.float32)
    b_ent = tl.zeros([BLOCK], tl.float32)
    b_bad = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n_part, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < n_part
        b_ce += tl.load(p_part + o * PARTIALS + PART_CE, mask=m, other=0.0)
        b_kl += tl.load(p_part + o * PARTIALS + PART_KL, mask=m, other=0.0)
        b_ent += tl.load(p_part + o * PARTIALS + PART_ENTROPY, mask=m, other=0.0)
        b_bad += tl.load(p_part + o * PARTIALS + PART_BAD, mask=m, other=0.0)
    b_counts = tl.zeros([BLOCK], tl.float32)
    for i in range(0, B, BLOCK):
        o = i + tl.arange(0, BLOCK)
        b_counts += tl.load(p_sample + o * SAMPLE_STATS + SAMPLE_LABELLED, mask=o < B, other=0.0)
    # CE averages over the labelled samples (0 when there are none); a bad label poisons everything
    n_lab = tl.maximum(tl.sum(b_counts, axis=0), 1.0)
    poison = tl.where(tl.sum(b_bad, axis=0) > 0, float("nan"), 0.0)
    ce = tl.sum(b_ce, axis=0) / (ce_T * n_lab) + poison
    kl = tl.sum(b_kl, axis=0) / (kl_T * B) + poison
    ent = tl.sum(b_ent, axis=0) * inv_TB + poison
    loss = w_ce * ce + w_kl * kl
    if lam > 0:
        loss -= lam * ent
    tl.store(p_loss, loss)
    tl.store(p_terms, ce)
    tl.store(p_terms + 1, kl)
    tl.store(p_terms + 2, ent)
    tl.store(p_scalars, w_ce * inv_T / n_lab + poison)


@triton.jit
def _tser_loss_bwd_kernel(
    p_z, p_u, p_y, p_stats, p_go, p_gz,
    T, B, C, stride_zt, stride_zb, stride_ub, stride_y, ignore_index, inv_T, inv_tau, inv_tau_h, w_kl, w_ent,
    off_sample, off_scalars,
    T_TILE: tl.constexpr, BLOCK_C: tl.constexpr, TS_CE: tl.constexpr, TS_KL: tl.constexpr, HAS_ENT: tl.constexpr,
    VEC: tl.constexpr, SOFT: tl.constexpr,
):
    NEED_MEAN: tl.constexpr = (not TS_CE) or (not TS_KL)
    p_row, p_sample, p_scalars = p_stats, p_stats + off_sample, p_stats + off_scalars
    C, i_b, o_t, m_t, p_zb, p_ub = _program_tile(p_z, p_u, T, C, stride_zt, stride_zb, stride_ub, T_TILE, VEC)
    p_gb = p_gz + (o_t.to(tl.int64)[:, None] * B + i_b) * C  # grad is dense [T, B, C]
    i_y, counts, bad = _label(p_y, i_b, stride_y, ignore_index, C, SOFT)
    q_sum = _target_sum(p_y, i_b, stride_y, C, BLOCK_C) if SOFT else 1.0  # dCE/dz = Σq·softmax(z) − q
    go = tl.load(p_go).to(tl.float32)
    # dL/dz weights, grad_output folded in before anything is rounded to z's dtype
    w_ce = tl.load(p_scalars) * go * counts
    w_kl = w_kl * go
    w_ent = w_ent * go
    p_s = p_sample + i_b * SAMPLE_STATS
    lse_u = tl.load(p_s + SAMPLE_LSE_TEACHER)
    p_rows = p_row + (o_t.to(tl.int64) * B + i_b) * ROW_STATS
    b_lse1 = tl.load(p_rows + ROW_LSE, mask=m_t, other=0.0)[:, None]  # only the enabled terms' slots are read
    b_lsek = tl.load(p_rows + ROW_LSE_KL, mask=m_t, other=0.0)[:, None]
    b_lseh = tl.load(p_rows + ROW_LSE_ENT, mask=m_t, other=0.0)[:, None]
    b_ent = tl.load(p_rows + ROW_ENTROPY, mask=m_t, other=0.0)[:, None]
    for i_c in range(0, tl.cdiv(C, BLOCK_C)):
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_z = m_t[:, None] & m_c[None, :]
        b_z = tl.load(p_zb + o_c[None, :], mask=m_z, other=0.0).to(tl.float32)  # [T_TILE, BC]
        if SOFT:
            b_onehot = _target_probs(p_y, i_b, stride_y, o_c, m_c)  # the target row's block
        else:
            b_onehot = (o_c == i_y).to(tl.float32)[None, :]
        b_pu = _teacher_probs(p_ub, o_c, m_c, inv_tau, lse_u)  # [1, BC]
        b_g = tl.zeros([T_TILE, BLOCK_C], tl.float32)
        if TS_CE:
            b_g += w_ce * (tl.exp(b_z - b_lse1) * q_sum - b_onehot)
        if TS_KL:
            b_g += w_kl * (tl.exp(b_z * inv_tau - b_lsek) - b_pu)
        if HAS_ENT:
            b_logp = b_z * inv_tau_h - b_lseh
            b_g += w_ent * _xlogx_term(tl.exp(b_logp), b_logp + b_ent)
        if NEED_MEAN:
            b_zm = tl.sum(b_z, axis=0)[None, :] * inv_T  # [1, BC]
            if not TS_CE:
                b_g += w_ce * (tl.exp(b_zm - tl.load(p_s + SAMPLE_LSE_MEAN)) * q_sum - b_onehot)
            if not TS_KL:
                b_g += w_kl * (tl.exp(b_zm * inv_tau - tl.load(p_s + SAMPLE_LSE_MEAN_KL)) - b_pu)
        tl.store(p_gb + o_c[None, :], b_g.to(p_gz.dtype.element_ty), mask=m_z)


MAX_TILE = 2048  # elements of z one program holds at once ([T_TILE, BLOCK_C])
REDUCE_BLOCK = 1024
# ptxas, left to itself, spilled 8-16 bytes of loop-carried scalars in a few fused-time variants at sm_90
MAXNREG = 128



@functools.lru_cache(maxsize=1024)
def tile_for(T: int, C: int, ts_ce: bool, ts_kl: bool) -> tuple[int, int, int]:
    """(T_TILE, BLOCK_C, num_warps): one row per program when every term is separated over time, else
    every timestep of a sample; BLOCK_C fills the rest of MAX_TILE (at least 16 lanes)."""
    t_tile = 1 if ts_ce and ts_kl else next_pow2(T)
    block_c = max(16, min(next_pow2(C), MAX_TILE // t_tile))
    tile = t_tile * block_c
    return t_tile, block_c, 8 if tile >= 2048 else 4 if tile >= 512 else 2 if tile >= 128 else 1


def _vec(C: int, *strides: int) -> int:
    """The largest power of two up to 16 dividing C and every row stride: a row block can then be read in
    vectors of that many elements (Triton's own specialisation only knows divisibility by 16)."""
    vec = 16
    for value in (C, *strides):
        while value % vec:
            vec //= 2
    return vec


@functools.lru_cache(maxsize=1024)
def _plan(shape: tuple, z_strides: tuple, u_stride: int, y_stride: int, alpha, tau, tau_h, lam, ts_ce, ts_kl,
          with_entropy, ignore_index, soft: bool = False) -> "Plan":
    """Everything the launches need besides the pointers, decided once per (shape, strides, arguments)."""
    T, B, C = shape
    t_tile, block_c, warps = tile_for(T, C, ts_ce, ts_kl)
    n_tt = -(-T // t_tile)
    off_sample, off_scalars, off_part = _stats_layout(T, B)
    common = (T, B, C, z_strides[0], z_strides[1], u_stride, y_stride, ignore_index, 1.0 / T, 1.0 / tau, 1.0 / tau_h)
    vec = _vec(C, z_strides[0], z_strides[1], u_stride)
    fwd_args = (*common, off_sample, off_part)
    fwd_kw = positional(_tser_loss_fwd_kernel, dict(
        T_TILE=t_tile, BLOCK_C=block_c, TS_CE=ts_ce, TS_KL=ts_kl, HAS_ENT=with_entropy or lam > 0, VEC=vec, SOFT=soft,
        num_warps=warps, maxnreg=MAXNREG))
    reduce_args = (B, n_tt * B, T if ts_ce else 1, T if ts_kl else 1, 1.0 / T, 1.0 / (T * B), 1.0 - alpha,
                   alpha * tau * tau, lam, off_sample, off_part, off_scalars)
    # dL/dz weights of the batch-mean terms (the CE one depends on the labelled count, read on the device)
    bwd_args = (*common, alpha * tau / (T * B), lam / (tau_h * T * B), off_sample, off_scalars)
    bwd_kw = positional(_tser_loss_bwd_kernel, dict(
        T_TILE=t_tile, BLOCK_C=block_c, TS_CE=ts_ce, TS_KL=ts_kl, HAS_ENT=lam > 0, VEC=vec, SOFT=soft, num_warps=warps))
    return Plan((B, n_tt), fwd_args, fwd_kw, reduce_args, bwd_args, bwd_kw, stats_size(T, B, C, ts_ce, ts_kl))


class Plan(NamedTuple):
    grid: tuple  # (samples, time tiles), forward and backward alike
    fwd_args: tuple  # after the pointers
    fwd_kw: tuple  # (constexprs in the kernel's order, options): see fastsnn.kernels.positional
    reduce_args: tuple
    bwd_args: tuple
    bwd_kw: tuple
    stats_size: int  # fp32 elements of the statistics buffer (stats_size for this tiling)


def _stats_layout(T, B) -> tuple:
    """The statistics buffer, fp32: ROW_STATS per (t, b) row, SAMPLE_STATS per sample, SCALARS, then PARTIALS
    per (time tile, sample), last because their count depends on the tiling: (offsets of the sample
    statistics, the scalars, the partials). Plain arithmetic: T and B may be symbolic (torch.compile)."""
    off_sample = T * B * ROW_STATS.value
    off_scalars = off_sample + B * SAMPLE_STATS.value
    return off_sample, off_scalars, off_scalars + SCALARS.value


@functools.lru_cache(maxsize=1024)
def stats_size(T: int, B: int, C: int, ts_ce: bool, ts_kl: bool) -> int:
    """fp32 elements of the statistics buffer the forward fills and the backward reads (O(T·B))."""
    return _stats_layout(T, B)[2] + -(-T // tile_for(T, C, ts_ce, ts_kl)[0]) * B * PARTIALS.value


def stats_size_bound(T, B):
    """stats_size for any tiling (room for one partial per row): what a graph traced with symbolic T and B
    allocates."""
    return _stats_layout(T, B)[2] + T * B * PARTIALS.value


def launch_plan(z, u, y, alpha, tau, lam, ts_ce, ts_kl, tau_h, ignore_index, with_entropy) -> Plan:
    """The launches' plan for these tensors (z [T, B, C] and u [B, C] with unit class stride, any other strides, 0
    included; y [B] integer, any stride, or a soft target [B, C], float, unit class stride) and settings: decided
    once per distinct (shape, strides, settings), one for the forward and the backward (the backward's launch does
    not depend on with_entropy)."""
    return _plan(z.shape, z.stride(), u.stride(0), y.stride(0), alpha, tau, tau_h, lam, ts_ce, ts_kl, with_entropy,
                 ignore_index, y.dim() == 2)


def tser_loss_forward(z, u, y, stats, loss, terms, plan: Plan):
    """Writes stats (fp32, at least plan.stats_size elements: per (t, b) row, per sample, partial sums, the CE
    gradient weight), loss (fp32 0-d) and terms (fp32 [3]: CE part, KL part, mean entropy): 2 launches."""
    _tser_loss_fwd_kernel[plan.grid](z, u, y, stats, *plan.fwd_args, *plan.fwd_kw[0], **plan.fwd_kw[1])
    _tser_loss_reduce_kernel[(1,)](stats, loss, terms, *plan.reduce_args, REDUCE_BLOCK, num_warps=4)


def tser_loss_backward(z, u, y, stats, grad_loss, grad_z, plan: Plan):
    """Writes grad_z (dense [T, B, C], z's dtype) = grad_loss · dL/dz (grad_loss: one element): 1 launch."""
    _tser_loss_bwd_kernel[plan.grid](z, u, y, stats, grad_loss, grad_z, *plan.bwd_args, *plan.bwd_kw[0],
                                     **plan.bwd_kw[1])
