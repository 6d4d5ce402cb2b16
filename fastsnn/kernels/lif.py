"""Multistep LIF/IF neuron: one forward kernel, one reverse-time backward kernel.

Tensors are viewed as [T, N]: time outermost, the N neurons of a timestep dense in memory (any dense
layout, e.g. channels_last, as long as every tensor of a call shares it). Outputs have time stride N; the
input x has time stride N, or 0 when one timestep is broadcast over T (direct encoding). The
membrane state stays in fp32 registers; the backward recomputes h from the saved input.
"""
import torch
import triton
import triton.language as tl

NEURON_IF = 0
NEURON_LIF = 1  # decay_input=True
NEURON_LIF_NO_DECAY = 2  # decay_input=False

MAX_CHUNK = 8  # timesteps whose h the backward keeps in registers at once


@triton.jit
def _charge(b_v, b_x, tau, v_reset, NEURON: tl.constexpr):
    if NEURON == 0:
        b_h = b_v + b_x
    elif NEURON == 1:
        b_h = b_v + tl.math.div_rn(b_x - (b_v - v_reset), tau)
    else:
        b_h = b_v - tl.math.div_rn(b_v - v_reset, tau) + b_x
    return b_h


@triton.jit
def _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET: tl.constexpr):
    b_s = (b_h >= v_threshold).to(tl.float32)
    if HARD_RESET:
        b_v = v_reset * b_s + b_h * (1.0 - b_s)
    else:
        b_v = b_h - v_threshold * b_s
    return b_s, b_v


@triton.jit
def _surrogate_grad(b_u, alpha, SURROGATE: tl.constexpr):
    if SURROGATE == 0:
        b_w = 1.5707963267948966 * alpha * b_u
        b_g = alpha * 0.5 / (1.0 + b_w * b_w)
    elif SURROGATE == 1:
        b_sig = tl.sigmoid(alpha * b_u)
        b_g = alpha * b_sig * (1.0 - b_sig)
    elif SURROGATE == 2:
        b_g = tl.maximum(alpha - alpha * alpha * tl.abs(b_u), 0.0)
    else:
        b_au = alpha * b_u
        b_g = alpha * 0.5641895835477563 * tl.exp(-b_au * b_au)
    return b_g


@triton.jit
def _lif_fwd_kernel(
    p_x, p_s, p_v0, p_vT,
    N, stride_xt, tau, v_threshold, v_reset, has_v_init, store_v,
    T: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr, BLOCK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_v = tl.load(p_v0 + o_n, mask=m_n & (has_v_init != 0), other=v_reset).to(tl.float32)
    for t in range(T):
        b_x = tl.load(p_x + t * stride_xt + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_h = _charge(b_v, b_x, tau, v_reset, NEURON)
        b_s, b_v = _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        tl.store(p_s + t * N + o_n, b_s.to(p_s.dtype.element_ty), mask=m_n)
    tl.store(p_vT + o_n, b_v, mask=m_n & (store_v != 0))


@triton.jit
def _lif_bwd_kernel(
    p_x, p_gs, p_v0, p_gvT, p_gx, p_gv0,
    N, stride_xt, tau, v_threshold, v_reset, alpha, has_v_init, has_grad_v,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, DETACH_RESET: tl.constexpr, BLOCK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_v0 = tl.load(p_v0 + o_n, mask=m_n & (has_v_init != 0), other=v_reset).to(tl.float32)
    b_gv = tl.load(p_gvT + o_n, mask=m_n & (has_grad_v != 0), other=0.0).to(tl.float32)
    if NEURON == 0:
        dh_dv = 1.0
        dh_dx = 1.0
    elif NEURON == 1:
        dh_dv = 1.0 - 1.0 / tau
        dh_dx = 1.0 / tau
    else:
        dh_dv = 1.0 - 1.0 / tau
        dh_dx = 1.0
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    for i_c in tl.static_range(NUM_CHUNKS - 1, -1, -1):
        # v at the chunk's first step: rerun the forward from t = 0 (nothing to do for the first chunk)
        b_v = b_v0
        for t in range(i_c * CHUNK):
            b_x = tl.load(p_x + t * stride_xt + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_h = _charge(b_v, b_x, tau, v_reset, NEURON)
            b_s, b_v = _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        b_hs = ()  # CHUNK x [BLOCK] fp32
        for j in tl.static_range(CHUNK):
            if i_c * CHUNK + j < T:
                b_x = tl.load(p_x + (i_c * CHUNK + j) * stride_xt + o_n, mask=m_n, other=0.0).to(tl.float32)
                b_h = _charge(b_v, b_x, tau, v_reset, NEURON)
                b_hs = b_hs + (b_h,)
                b_s, b_v = _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        for j in tl.static_range(CHUNK - 1, -1, -1):
            if i_c * CHUNK + j < T:
                b_h = b_hs[j]
                b_gs = tl.load(p_gs + (i_c * CHUNK + j) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
                b_u = b_h - v_threshold
                b_sg = _surrogate_grad(b_u, alpha, SURROGATE)
                if HARD_RESET:
                    b_dv_dh = 1.0 - (b_u >= 0).to(tl.float32)
                    if not DETACH_RESET:
                        b_dv_dh += (v_reset - b_h) * b_sg
                else:
                    if DETACH_RESET:
                        b_dv_dh = 1.0
                    else:
                        b_dv_dh = 1.0 - v_threshold * b_sg
                b_gh = b_gs * b_sg + b_gv * b_dv_dh
                tl.store(p_gx + (i_c * CHUNK + j) * N + o_n, (b_gh * dh_dx).to(p_gx.dtype.element_ty), mask=m_n)
                b_gv = b_gh * dh_dv
    tl.store(p_gv0 + o_n, b_gv, mask=m_n & (has_v_init != 0))


FWD_BLOCK, FWD_WARPS = 1024, 4
BWD_BLOCK, BWD_WARPS = 512, 8


_FP32_PLACEHOLDERS = {}


def _fp32_placeholder(device):
    """A one-element fp32 tensor passed for an absent optional pointer, which the kernels never touch."""
    if device not in _FP32_PLACEHOLDERS:
        _FP32_PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _FP32_PLACEHOLDERS[device]


def _or_placeholder(t, like):
    return _fp32_placeholder(like.device) if t is None else t


def chunk_for(T: int) -> int:
    return min(T, MAX_CHUNK)


def lif_forward(x, spikes, v_init, v_final, *, neuron, tau, v_threshold, v_reset, hard_reset):
    """x, spikes: [T, ...] sharing one dense time-major layout; v_init/v_final: fp32 [...] or None."""
    T, N = x.shape[0], x[0].numel()
    grid = (triton.cdiv(N, FWD_BLOCK),)
    _lif_fwd_kernel[grid](
        x, spikes, _or_placeholder(v_init, x), _or_placeholder(v_final, x),
        N, x.stride(0), tau, v_threshold, v_reset, int(v_init is not None), int(v_final is not None),
        T=T, NEURON=neuron, HARD_RESET=hard_reset, BLOCK=FWD_BLOCK, num_warps=FWD_WARPS,
    )


def lif_backward(x, grad_spikes, v_init, grad_v_final, grad_x, grad_v_init, *, neuron, tau, v_threshold,
                 v_reset, hard_reset, surrogate, alpha, detach_reset):
    """Writes grad_x ([T, ...], x's layout) and grad_v_init (fp32, when v_init is given)."""
    T, N = x.shape[0], x[0].numel()
    grid = (triton.cdiv(N, BWD_BLOCK),)
    _lif_bwd_kernel[grid](
        x, grad_spikes, _or_placeholder(v_init, x), _or_placeholder(grad_v_final, x),
        grad_x, _or_placeholder(grad_v_init, x),
        N, x.stride(0), tau, v_threshold, v_reset, alpha, int(v_init is not None), int(grad_v_final is not None),
        T=T, CHUNK=chunk_for(T), NEURON=neuron, HARD_RESET=hard_reset, SURROGATE=surrogate,
        DETACH_RESET=detach_reset, BLOCK=BWD_BLOCK, num_warps=BWD_WARPS,
    )
