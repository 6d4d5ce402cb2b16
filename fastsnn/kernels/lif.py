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
import functools

import numpy as np
import torch
import triton
import triton.language as tl

# The NEURON constexpr: how the membrane charges (v: membrane, x: input, v_reset: 0 for soft reset)
NEURON_IF: tl.constexpr = tl.constexpr(0)  # h = v + x
NEURON_LIF: tl.constexpr = tl.constexpr(1)  # h = v + (x − (v − v_reset)) / τ   (decay_input=True)
NEURON_LIF_NO_DECAY: tl.constexpr = tl.constexpr(2)  # h = v − (v − v_reset) / τ + x   (decay_input=False)
NEURON_CODES = {"if": NEURON_IF.value, "lif": NEURON_LIF.value, "lif_no_decay": NEURON_LIF_NO_DECAY.value}
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

MAX_CHUNK = 8  # timesteps per chunk: loads issued together, h kept in registers by the backward
NUM_WARPS = 4


@triton.jit
def _divide(b_a, tau, inv_tau, DIVIDE: tl.constexpr):
    if DIVIDE == DIVIDE_RN:
        b_q = tl.math.div_rn(b_a, tau)
    else:  # DIVIDE_FMA: Markstein's correction of the reciprocal product
        b_q = b_a * inv_tau
        b_e = tl.fma(-b_q, tau, b_a)
        b_q = tl.fma(b_e, inv_tau, b_q)
    return b_q


@triton.jit
def _charge(b_v, b_x, tau, inv_tau, v_reset, NEURON: tl.constexpr, DIVIDE: tl.constexpr):
    if NEURON == NEURON_IF:
        b_h = b_v + b_x
    elif NEURON == NEURON_LIF:
        b_h = b_v + _divide(b_x - (b_v - v_reset), tau, inv_tau, DIVIDE)
    else:  # NEURON_LIF_NO_DECAY
        b_h = b_v - _divide(b_v - v_reset, tau, inv_tau, DIVIDE) + b_x
    return b_h


@triton.jit
def _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET: tl.constexpr):
    b_fired = b_h >= v_threshold
    if HARD_RESET:
        b_v = tl.where(b_fired, v_reset, b_h)  # v_reset·s + h·(1 − s)
    else:
        b_v = tl.where(b_fired, b_h - v_threshold, b_h)  # h − v_threshold·s
    return b_fired, b_v


@triton.jit
def _surrogate_grad(b_u, alpha, SURROGATE: tl.constexpr):
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
def _membrane_grad(b_h, b_gs, b_gv, v_threshold, v_reset, alpha, SURROGATE: tl.constexpr, HARD_RESET: tl.constexpr,
                   DETACH_RESET: tl.constexpr):
    """dL/dh at one step: the spike's surrogate term plus the gradient of the membrane carried to the next step
    (b_gs: dL/ds_t, b_gv: dL/dv_t) through the reset."""
    b_u = b_h - v_threshold
    b_sg = _surrogate_grad(b_u, alpha, SURROGATE)
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


@triton.jit
def _lif_fwd_kernel(
    p_x, p_s, p_v0, p_vT, p_ck,
    N, stride_xt, tau, inv_tau, v_threshold, v_reset, has_v_init, store_v,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr, DIVIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
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
            b_h = _charge(b_v, b_xs[j], tau, inv_tau, v_reset, NEURON, DIVIDE)
            b_fired, b_v_next = _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
            tl.store(p_s + t * N + o_n, b_fired.to(p_s.dtype.element_ty), mask=m_n & (t < T))
            b_v = tl.where(t < T, b_v_next, b_v)
    tl.store(p_vT + o_n, b_v, mask=m_n & (store_v != 0))


@triton.jit
def _lif_bwd_kernel(
    p_x, p_gs, p_v0, p_ck, p_gvT, p_gx, p_gv0,
    N, stride_xt, tau, inv_tau, v_threshold, v_reset, alpha, has_v_init, has_grad_v,
    T: tl.constexpr, CHUNK: tl.constexpr, NEURON: tl.constexpr, HARD_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, DETACH_RESET: tl.constexpr, DIVIDE: tl.constexpr, SUM_OVER_TIME: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NUM_CHUNKS: tl.constexpr = (T + CHUNK - 1) // CHUNK
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_gv = tl.load(p_gvT + o_n, mask=m_n & (has_grad_v != 0), other=0.0).to(tl.float32)
    b_gx_sum = tl.zeros([BLOCK], tl.float32)  # Σ_t dL/dx_t, for an input broadcast over time
    if NEURON == NEURON_IF:
        dh_dv = 1.0
        dh_dx = 1.0
    elif NEURON == NEURON_LIF:
        dh_dv = 1.0 - inv_tau
        dh_dx = inv_tau
    else:  # NEURON_LIF_NO_DECAY
        dh_dv = 1.0 - inv_tau
        dh_dx = 1.0
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
        for j in tl.static_range(CHUNK):
            b_h = _charge(b_v, b_xs[j], tau, inv_tau, v_reset, NEURON, DIVIDE)
            b_hs += (b_h,)
            _, b_v = _fire_and_reset(b_h, v_threshold, v_reset, HARD_RESET)
        for j in tl.static_range(CHUNK - 1, -1, -1):
            t = i_c * CHUNK + j
            b_gh = _membrane_grad(b_hs[j], b_gss[j], b_gv, v_threshold, v_reset, alpha, SURROGATE, HARD_RESET,
                                  DETACH_RESET)
            b_gx = b_gh * dh_dx
            if SUM_OVER_TIME:
                b_gx_sum += tl.where(t < T, b_gx, 0.0)
            else:
                tl.store(p_gx + t * N + o_n, b_gx.to(p_gx.dtype.element_ty), mask=m_n & (t < T))
            b_gv = tl.where(t < T, b_gh * dh_dv, b_gv)  # steps past T (a partial last chunk) pass it through
    if SUM_OVER_TIME:
        tl.store(p_gx + o_n, b_gx_sum.to(p_gx.dtype.element_ty), mask=m_n)
    tl.store(p_gv0 + o_n, b_gv, mask=m_n & (has_v_init != 0))


_FP32_PLACEHOLDERS = {}


def _fp32_placeholder(device):
    """A one-element fp32 tensor passed for an absent optional pointer, which the kernels never touch."""
    if device not in _FP32_PLACEHOLDERS:
        _FP32_PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _FP32_PLACEHOLDERS[device]


def chunk_for(T: int) -> int:
    return min(T, MAX_CHUNK)


def checkpoints_for(T: int) -> int:
    """Membrane checkpoints the forward writes for the backward: one per chunk boundary."""
    return -(-T // MAX_CHUNK) - 1


UNALIGNED_ELEMENTS = 2  # per thread when 16-byte vectors are impossible (each element then needs its own address)


@functools.lru_cache(maxsize=256)
def _launch_constants(spec) -> tuple[tuple, dict]:
    """(tau, inv_tau, v_threshold, v_reset) as the kernels take them, and the spec's constexprs. inv_tau is
    RN32(1/τ32), which the FMA division needs (1/τ rounded once from the fp32 τ, not via fp64)."""
    tau = np.float32(spec.tau)
    scalars = (float(tau), float(np.float32(1.0) / tau), spec.v_threshold, spec.v_rest)
    return scalars, dict(NEURON=NEURON_CODES[spec.kind], HARD_RESET=spec.hard_reset)


@functools.lru_cache(maxsize=1024)
def _plan(backward: bool, T: int, N: int, x_time_stride: int, itemsize: int, cuda: bool, spec, sum_over_time=False):
    """Everything a launch needs besides the pointers, decided once per (direction, shape, layout, dtype,
    device type, spec): the scalar arguments, and the grid and keyword arguments for the two blocks. BLOCK
    (for NUM_WARPS warps) gives 16 bytes per thread (4 fp32 or 8 fp16/bf16 values) when every pointer is
    16-byte aligned and N and the time stride are multiples of that (what lets Triton's JIT prove 128-bit
    accesses), else UNALIGNED_ELEMENTS values per thread; per call only the pointers' alignment is read.
    DIVIDE: the FMA division on CUDA; CPU tensors reach a kernel only under the interpreter, whose fma is
    not fused: div_rn there."""
    per_thread = 16 // itemsize
    scalars, codes = _launch_constants(spec)
    kw = dict(T=T, CHUNK=chunk_for(T), DIVIDE=DIVIDE_FMA.value if cuda else DIVIDE_RN.value, num_warps=NUM_WARPS,
              **codes)
    if backward:
        scalars = (*scalars, spec.alpha)
        kw.update(SURROGATE=SURROGATE_CODES[spec.surrogate], DETACH_RESET=spec.detach_reset,
                  SUM_OVER_TIME=sum_over_time)
    variants = []
    for aligned in (False, True):
        block = (per_thread if aligned else UNALIGNED_ELEMENTS) * 32 * NUM_WARPS
        variants.append(((-(-N // block),), {**kw, "BLOCK": block}))
    shape_aligned = N % per_thread == 0 and x_time_stride % per_thread == 0
    return scalars, variants[0], variants[1] if shape_aligned else variants[0]


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def lif_forward(x, spikes, v_init, v_final, checkpoints, spec):
    """x, spikes: [T, ...] sharing one dense time-major layout (x may have time stride 0); v_init/v_final:
    fp32 [...] or None; checkpoints: fp32 [checkpoints_for(T), ...] or None when T <= MAX_CHUNK."""
    N, x_stride = spikes.stride(0), x.stride(0)  # spikes is dense time-major: its time stride is N
    scalars, unaligned, aligned = _plan(False, x.shape[0], N, x_stride, x.element_size(), x.is_cuda, spec)
    addresses = x.data_ptr() | spikes.data_ptr() | _ptr(v_init) | _ptr(v_final) | _ptr(checkpoints)
    grid, kw = unaligned if addresses % 16 else aligned
    none = _fp32_placeholder(x.device)
    _lif_fwd_kernel[grid](
        x, spikes, none if v_init is None else v_init, none if v_final is None else v_final,
        none if checkpoints is None else checkpoints,
        N, x_stride, *scalars, int(v_init is not None), int(v_final is not None), **kw)


def lif_backward(x, grad_spikes, v_init, checkpoints, grad_v_final, grad_x, grad_v_init, spec, sum_over_time=False):
    """Writes grad_x (x's layout; with sum_over_time, for an x broadcast over time, one timestep holding
    Σ_t dL/dx_t) and grad_v_init (fp32, when v_init is given)."""
    N, x_stride = grad_spikes.stride(0), x.stride(0)  # grad_spikes is dense time-major: its time stride is N
    scalars, unaligned, aligned = _plan(True, x.shape[0], N, x_stride, x.element_size(), x.is_cuda, spec,
                                        sum_over_time)
    addresses = (x.data_ptr() | grad_spikes.data_ptr() | grad_x.data_ptr() | _ptr(v_init) | _ptr(checkpoints)
                 | _ptr(grad_v_final) | _ptr(grad_v_init))
    grid, kw = unaligned if addresses % 16 else aligned
    none = _fp32_placeholder(x.device)
    _lif_bwd_kernel[grid](
        x, grad_spikes, none if v_init is None else v_init, none if checkpoints is None else checkpoints,
        none if grad_v_final is None else grad_v_final, grad_x, none if grad_v_init is None else grad_v_init,
        N, x_stride, *scalars, int(v_init is not None), int(grad_v_final is not None), **kw)
