"""TSER distillation loss: per sample, one program reads the teacher row and the T student rows, writes
the per-sample CE / KL / entropy terms and the whole gradient dL/dz in the same launch.

Rows are walked in BLOCK_C chunks with online (max-subtracted) log-sum-exp, so any class count works;
a time-fused term (z̄ = mean_t z_t) is summed block by block from the T rows.
"""
import torch
import triton
import triton.language as tl



@triton.jit
def _online_update(b_a, m_valid, b_m, b_s):
    """One block of an online log-sum-exp: returns (new max, rescale of the old sums, exp terms, new sum)."""
    b_m_new = tl.maximum(b_m, tl.max(tl.where(m_valid, b_a, float("-inf")), axis=0))
    b_scale = tl.exp(b_m - b_m_new)
    b_e = tl.exp(tl.where(m_valid, b_a, float("-inf")) - b_m_new)
    return b_m_new, b_scale, b_e, b_s * b_scale + tl.sum(b_e, axis=0)


@triton.jit
def _lse_start():
    """An empty online log-sum-exp: (running max, sum of exp); the finite start keeps masked lanes nan-free."""
    return tl.full([], -3.0e38, tl.float32), tl.zeros([], tl.float32)


@triton.jit
def _ce_update(b_row, o_c, m_c, i_y, b_m, b_s, b_zy):
    """CE statistics of a row at temperature 1: log-sum-exp state and the label's logit."""
    b_m, _, _, b_s = _online_update(b_row, m_c, b_m, b_s)
    return b_m, b_s, b_zy + tl.sum(tl.where(o_c == i_y, b_row, 0.0), axis=0)


@triton.jit
def _kl_update(b_row, b_pu, m_c, inv_tau, b_m, b_s, b_x):
    """KL statistics of a row at tau: log-sum-exp state and Σ p_u·z/τ."""
    b_m, _, _, b_s = _online_update(b_row * inv_tau, m_c, b_m, b_s)
    return b_m, b_s, b_x + tl.sum(tl.where(m_c, b_pu * b_row, 0.0), axis=0) * inv_tau


@triton.jit
def _teacher_probs(p_ub, o_c, m_c, inv_tau, b_lse_u):
    return tl.exp(tl.load(p_ub + o_c, mask=m_c, other=0.0).to(tl.float32) * inv_tau - b_lse_u)


@triton.jit
def _mean_row(p_zb, stride_zt, T, o_c, m_c, inv_T):
    """One block of z̄ = (1/T)·Σ_t z_t for one sample."""
    b_zm = tl.zeros_like(o_c).to(tl.float32)
    for t in range(T):
        b_zm += tl.load(p_zb + t * stride_zt + o_c, mask=m_c, other=0.0).to(tl.float32)
    return b_zm * inv_T


@triton.jit
def _tser_loss_fwd_kernel(
    p_z, p_u, p_y, p_grad, p_terms, p_stats,
    T, B, C, stride_zt, stride_zb, stride_ub,
    inv_T, inv_tau, inv_tau_h, w_ce, w_kl, w_ent,
    BLOCK_C: tl.constexpr, TS_CE: tl.constexpr, TS_KL: tl.constexpr, HAS_ENT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    p_zb = p_z + i_b * stride_zb
    p_gb = p_grad + i_b * stride_zb
    p_ub = p_u + i_b * stride_ub
    i_y = tl.load(p_y + i_b).to(tl.int64)
    NEED_MEAN: tl.constexpr = (not TS_CE) or (not TS_KL)

    # teacher at tau: log-sum-exp and Σ p_u·log p_u
    b_mu, b_su = _lse_start()
    b_wu = tl.zeros([], tl.float32)
    for i_c in range(0, tl.cdiv(C, BLOCK_C)):
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_u = tl.load(p_ub + o_c, mask=m_c, other=0.0).to(tl.float32) * inv_tau
        b_mu, b_scale, b_e, b_su = _online_update(b_u, m_c, b_mu, b_su)
        b_wu = b_wu * b_scale + tl.sum(b_e * b_u, axis=0)
    b_lse_u = b_mu + tl.log(b_su)
    b_neg_ent_u = tl.math.div_rn(b_wu, b_su) - b_lse_u

    # the time-mean row z̄, for a term fused over time
    b_ce = tl.zeros([], tl.float32)
    b_kl = tl.zeros([], tl.float32)
    b_lse1m = tl.zeros([], tl.float32)
    b_lsekm = tl.zeros([], tl.float32)
    if NEED_MEAN:
        b_m1, b_s1 = _lse_start()
        b_zy = tl.zeros([], tl.float32)
        b_mk, b_sk = _lse_start()
        b_xk = tl.zeros([], tl.float32)
        for i_c in range(0, tl.cdiv(C, BLOCK_C)):
            o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_zm = _mean_row(p_zb, stride_zt, T, o_c, m_c, inv_T)
            if not TS_CE:
                b_m1, b_s1, b_zy = _ce_update(b_zm, o_c, m_c, i_y, b_m1, b_s1, b_zy)
            if not TS_KL:
                b_pu = _teacher_probs(p_ub, o_c, m_c, inv_tau, b_lse_u)
                b_mk, b_sk, b_xk = _kl_update(b_zm, b_pu, m_c, inv_tau, b_mk, b_sk, b_xk)
        if not TS_CE:
            b_lse1m = b_m1 + tl.log(b_s1)
            b_ce = b_lse1m - b_zy
        if not TS_KL:
            b_lsekm = b_mk + tl.log(b_sk)
            b_kl = b_neg_ent_u - b_xk + b_lsekm

    b_ent = tl.zeros([], tl.float32)
    p_sb = p_stats + i_b * T * 4  # per (sample, t): lse at 1, lse at tau, lse at tau_h, entropy
    for t in range(T):
        p_zt = p_zb + t * stride_zt
        # statistics of z_t: CE at 1, KL at tau (with Σ p_u·z/τ), entropy at tau_h
        b_m1, b_s1 = _lse_start()
        b_zy = tl.zeros([], tl.float32)
        b_mk, b_sk = _lse_start()
        b_xk = tl.zeros([], tl.float32)
        b_mh, b_sh = _lse_start()
        b_wh = tl.zeros([], tl.float32)
        for i_c in range(0, tl.cdiv(C, BLOCK_C)):
            o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_z = tl.load(p_zt + o_c, mask=m_c, other=0.0).to(tl.float32)
            if TS_CE:
                b_m1, b_s1, b_zy = _ce_update(b_z, o_c, m_c, i_y, b_m1, b_s1, b_zy)
            if TS_KL:
                b_pu = _teacher_probs(p_ub, o_c, m_c, inv_tau, b_lse_u)
                b_mk, b_sk, b_xk = _kl_update(b_z, b_pu, m_c, inv_tau, b_mk, b_sk, b_xk)
            if HAS_ENT:
                b_ah = b_z * inv_tau_h
                b_mh, b_scale, b_e, b_sh = _online_update(b_ah, m_c, b_mh, b_sh)
                b_wh = b_wh * b_scale + tl.sum(b_e * b_ah, axis=0)
        b_lse1 = tl.zeros([], tl.float32)
        b_lsek = tl.zeros([], tl.float32)
        b_lseh = tl.zeros([], tl.float32)
        b_ent_t = tl.zeros([], tl.float32)
        if TS_CE:
            b_lse1 = b_m1 + tl.log(b_s1)
            b_ce += (b_lse1 - b_zy) * inv_T
        if TS_KL:
            b_lsek = b_mk + tl.log(b_sk)
            b_kl += (b_neg_ent_u - b_xk + b_lsek) * inv_T
        if HAS_ENT:
            b_lseh = b_mh + tl.log(b_sh)
            b_ent_t = b_lseh - tl.math.div_rn(b_wh, b_sh)
            b_ent += b_ent_t * inv_T
        if COMPUTE_GRAD:
            tl.store(p_sb + t * 4, b_lse1)
            tl.store(p_sb + t * 4 + 1, b_lsek)
            tl.store(p_sb + t * 4 + 2, b_lseh)
            tl.store(p_sb + t * 4 + 3, b_ent_t)
    tl.store(p_terms + i_b, b_ce)
    tl.store(p_terms + B + i_b, b_kl)
    tl.store(p_terms + 2 * B + i_b, b_ent)

    if COMPUTE_GRAD:
        tl.debug_barrier()  # the per-timestep statistics above are read back by every thread
        for i_c in range(0, tl.cdiv(C, BLOCK_C)):
            o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_pu = _teacher_probs(p_ub, o_c, m_c, inv_tau, b_lse_u)
            b_onehot = (o_c == i_y).to(tl.float32)
            # the part of the gradient that a time-fused term gives every timestep alike
            b_gm = tl.zeros([BLOCK_C], tl.float32)
            if NEED_MEAN:
                b_zm = _mean_row(p_zb, stride_zt, T, o_c, m_c, inv_T)
                if not TS_CE:
                    b_gm += w_ce * (tl.exp(b_zm - b_lse1m) - b_onehot)
                if not TS_KL:
                    b_gm += w_kl * (tl.exp(b_zm * inv_tau - b_lsekm) - b_pu)
            for t in range(T):
                b_z = tl.load(p_zb + t * stride_zt + o_c, mask=m_c, other=0.0).to(tl.float32)
                b_g = b_gm
                if TS_CE:
                    b_g += w_ce * (tl.exp(b_z - tl.load(p_sb + t * 4)) - b_onehot)
                if TS_KL:
                    b_g += w_kl * (tl.exp(b_z * inv_tau - tl.load(p_sb + t * 4 + 1)) - b_pu)
                if HAS_ENT:
                    b_logp = b_z * inv_tau_h - tl.load(p_sb + t * 4 + 2)
                    b_g += w_ent * tl.exp(b_logp) * (b_logp + tl.load(p_sb + t * 4 + 3))
                tl.store(p_gb + t * stride_zt + o_c, b_g.to(p_grad.dtype.element_ty), mask=m_c)


@triton.jit
def _scale_grad_kernel(p_g, p_go, n, BLOCK: tl.constexpr):
    b_go = tl.load(p_go).to(tl.float32)
    if b_go != 1.0:
        i = tl.program_id(0).to(tl.int64)
        o = i * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        b_g = tl.load(p_g + o, mask=m, other=0.0).to(tl.float32)
        tl.store(p_g + o, (b_g * b_go).to(p_g.dtype.element_ty), mask=m)


SCALE_BLOCK = 2048
# Without a register budget ptxas spills a few loop-carried scalars in some variants at 48-72 registers.
MAXNREG = 128


def block_for(C: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for C classes: one block per row up to 2048 classes."""
    block_c = max(16, min(triton.next_power_of_2(C), 2048))
    return block_c, 4 if block_c <= 1024 else 8


def tser_loss_forward(z, u, y, grad, terms, *, alpha, tau, tau_h, lam, ts_ce, ts_kl, with_entropy):
    """z [T, B, C] (last dim contiguous), u [B, C] (last dim contiguous), y [B] int; writes terms [3, B] fp32
    and, when grad is not None, grad (z's shape and strides). The entropy term is computed when lam > 0 or
    with_entropy."""
    T, B, C = z.shape
    block_c, warps = block_for(C)
    # dL/dz_t of the batch-mean loss: every term carries 1/(T·B); reciprocals are taken here, not per program
    scale = 1.0 / (T * B)
    # four fp32 statistics per (sample, timestep), handed from the loss pass to the gradient pass
    stats = torch.empty(B * T * 4 if grad is not None else 1, dtype=torch.float32, device=z.device)
    _tser_loss_fwd_kernel[(B,)](
        z, u, y, z if grad is None else grad, terms, stats,
        T, B, C, z.stride(0), z.stride(1), u.stride(0),
        1.0 / T, 1.0 / tau, 1.0 / tau_h, (1.0 - alpha) * scale, alpha * tau * scale, lam / tau_h * scale,
        BLOCK_C=block_c, TS_CE=ts_ce, TS_KL=ts_kl, HAS_ENT=with_entropy or lam > 0,
        COMPUTE_GRAD=grad is not None,
        num_warps=warps, maxnreg=MAXNREG,
    )


def scale_grad_(grad, grad_output):
    """grad *= grad_output (a one-element tensor) in place; nothing is read or written when it is exactly 1."""
    n = grad.numel()
    _scale_grad_kernel[(triton.cdiv(n, SCALE_BLOCK),)](grad, grad_output, n, BLOCK=SCALE_BLOCK, num_warps=4)
