"""TSER loss: the Triton kernels against the reference and its autograd, on every device of this process
(tests taking `device` run with it as torch's default device: interpreted on CPU tensors by default,
compiled on CUDA under FASTSNN_COMPILED=1, see test_cuda.py)."""
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F

import fastsnn
from fastsnn import reference
from helpers import assert_close, case_id, count_launches, product_cases

VARIANTS = list(itertools.product([True, False], [True, False], [0.0, 0.05]))  # ts_ce, ts_kl, lam
VARIANT_IDS = [case_id(ts_ce=a, ts_kl=b, ent=lam > 0) or "skd" for a, b, lam in VARIANTS]


def _data(T, B, C, dtype, scale=3.0, teacher_dtype=None):
    z = (torch.randn(T, B, C) * scale).to(dtype).requires_grad_()
    u = (torch.randn(B, C) * scale).to(teacher_dtype or dtype)
    y = torch.randint(0, C, (B,))
    return z, u, y


def _loss_and_grad(fn, z, u, y, **kw):
    loss, terms = fn(z, u, y, return_terms=True, **kw)
    (grad,) = torch.autograd.grad(loss * 3.0, z)  # grad_output != 1
    return loss, terms, grad


def _compare(T, B, C, dtype, ts_ce, ts_kl, lam, scale=3.0, teacher_dtype=None, **kw):
    z, u, y = _data(T, B, C, dtype, scale, teacher_dtype)
    kw = dict(ts_ce=ts_ce, ts_kl=ts_kl, lam=lam, **kw)
    loss, terms, grad = _loss_and_grad(fastsnn.tser_loss, z, u, y, backend="triton", **kw)
    # the reference in fp64 on the same (rounded) inputs
    ref_loss, ref_terms, ref_grad = _loss_and_grad(reference.tser_loss, z, u, y, compute_dtype=torch.float64, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert not any(v.requires_grad for v in terms.values())
    assert grad.dtype == dtype
    magnitude = max(1.0, float(ref_loss.detach().abs()))
    assert_close(loss, ref_loss.float(), torch.float32, scale=magnitude * 10)
    for key in ("ce", "kl", "entropy"):
        assert_close(terms[key], ref_terms[key].float(), torch.float32,
                     scale=max(1.0, float(ref_terms[key].abs())) * 10)
    assert_close(grad, ref_grad.to(dtype), dtype)
    assert ref_grad.abs().sum() > 0


@pytest.mark.parametrize("variant,T,C,dtype", product_cases(
    variant={"tser": (True, True, 0.05), "ts": (True, True, 0.0), "ts_ce-ent": (True, False, 0.05),
             "ts_ce": (True, False, 0.0), "ts_kl-ent": (False, True, 0.05), "ts_kl": (False, True, 0.0),
             "skd-ent": (False, False, 0.05), "skd": (False, False, 0.0)},
    T=[1, 2, 4, 8], C=[2, 10, 100, 1000, 1031, 5000], dtype=[torch.float32, torch.float16, torch.bfloat16]))
def test_kernel_matches_reference(device, variant, T, C, dtype):
    ts_ce, ts_kl, lam = variant
    _compare(T, 5, C, dtype, ts_ce, ts_kl, lam, tau=4.0)


@pytest.mark.parametrize("ts_ce,ts_kl,lam", VARIANTS, ids=VARIANT_IDS)
def test_logits_of_magnitude_1e4(device, ts_ce, ts_kl, lam):
    _compare(4, 3, 100, torch.float32, ts_ce, ts_kl, lam, scale=1e4)


def test_more_classes_than_one_block(device):
    _compare(2, 3, 32768 + 17, torch.float32, True, True, 0.01)


def test_entropy_temperature_and_mixed_dtypes(device):
    _compare(4, 7, 100, torch.float16, True, True, 0.1, teacher_dtype=torch.float32, entropy_tau=2.0, alpha=0.3)


def test_ablation_rows_are_distinct_losses(device):
    # Table 3's five rows: none, TS on CE, TS on KL, both, both + entropy
    z, u, y = _data(4, 9, 10, torch.float32)
    rows = [dict(ts_ce=False, ts_kl=False, lam=0.0), dict(ts_ce=True, ts_kl=False, lam=0.0),
            dict(ts_ce=False, ts_kl=True, lam=0.0), dict(ts_ce=True, ts_kl=True, lam=0.0),
            dict(ts_ce=True, ts_kl=True, lam=0.05)]
    losses = [float(fastsnn.tser_loss(z, u, y, backend="triton", **row).detach()) for row in rows]
    assert len(set(losses)) == 5


def test_teacher_gets_no_gradient(device):
    z, u, y = _data(2, 3, 10, torch.float32)
    u.requires_grad_()
    fastsnn.tser_loss(z, u, y, backend="triton").backward()
    assert u.grad is None and z.grad is not None


def test_backward_with_unit_grad_output_returns_the_stored_gradient(device):
    z, u, y = _data(2, 3, 10, torch.float32)
    loss = fastsnn.tser_loss(z, u, y, backend="triton")
    (g1,) = torch.autograd.grad(loss, z)
    ref = torch.autograd.grad(reference.tser_loss(z, u, y), z)[0]
    assert_close(g1, ref)


def test_second_backward_gives_the_same_gradient(device):
    z, u, y = _data(2, 3, 10, torch.float32)
    loss = fastsnn.tser_loss(z, u, y, backend="triton")
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2.0, z)
    assert torch.equal(g1 * 2.0, g2)


def test_non_finite_logits_give_a_non_finite_loss(device):
    """NaN and +inf logits poison the loss; a −inf logit is a class of probability 0 (see the masked-class
    tests below), which is infinite only where the other side gives that class a probability > 0."""
    for bad in (float("nan"), float("inf")):
        z, u, y = _data(2, 3, 10, torch.float32)
        with torch.no_grad():
            z[1, 2, 3] = bad
        assert not torch.isfinite(fastsnn.tser_loss(z, u, y, backend="triton"))
        z, u, y = _data(2, 3, 10, torch.float32)
        u[0, 0] = bad
        assert not torch.isfinite(fastsnn.tser_loss(z, u, y, backend="triton"))
    z, u, y = _data(2, 3, 10, torch.float32)
    with torch.no_grad():
        z[1, 2, 3] = float("-inf")  # KL(p_u ‖ q) with q = 0 where p_u > 0
    assert fastsnn.tser_loss(z, u, y, backend="triton") == float("inf")


def _paper_formula(z, u, y, *, alpha, tau, lam, ts_ce, ts_kl, keep_graph=False):
    """The TSER loss (paper eq. 7-11, our τ² and batch-mean conventions) in float64, written with xlogy, whose
    xlogy(0, ·) = 0 is the 0·log 0 = 0 convention: KL(p‖q) = Σ xlogy(p, p) − xlogy(p, q), H(q) = −Σ xlogy(q, q).
    keep_graph: differentiable in z (give a float64 leaf)."""
    z, u = (z if keep_graph else z.detach()).double(), u.double()
    p = torch.softmax(u / tau, dim=-1)

    def ce(logits):
        if y.is_floating_point():  # soft targets: −Σ q·log softmax, a class with q = 0 adding nothing
            q = y.double()
            return -torch.where(q > 0, q * torch.log_softmax(logits, dim=-1), 0.0).sum(-1)
        return -torch.log_softmax(logits, dim=-1).gather(-1, y.view(-1, 1).expand(*logits.shape[:-1], 1))[..., 0]

    def kl(logits):
        q = torch.softmax(logits / tau, dim=-1)
        return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)

    mean = z.mean(0)
    ce_part = (ce(z).mean(0) if ts_ce else ce(mean)).mean()
    kl_part = (kl(z).mean(0) if ts_kl else kl(mean)).mean()
    q = torch.softmax(z / tau, dim=-1)
    entropy = -torch.special.xlogy(q, q).sum(-1).mean()
    return (1 - alpha) * ce_part + alpha * tau * tau * kl_part - lam * entropy


@pytest.mark.parametrize("ts_ce,ts_kl,lam", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("masked", ["teacher", "both"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_masked_classes_follow_zero_log_zero(device, backend, masked, ts_ce, ts_kl, lam):
    """−inf logits (masked classes, as in class-incremental training) on the teacher's side, or on both sides:
    the loss is the paper's formula with 0·log 0 = 0 (finite), and with masks on both sides it equals the loss of
    the classes that are left, whose gradients it gives, the masked classes getting gradient 0."""
    T, B, C = 3, 4, 13
    z, u, y = _data(T, B, C, torch.float32)
    masks = torch.zeros(B, C, dtype=torch.bool)
    masks[0, [2, 5]] = masks[2, 11] = masks[3, [0, 1, 12]] = True
    y = torch.tensor([3, 0, 10, 7])  # labels outside the masks
    kw = dict(alpha=0.5, tau=4.0, lam=lam, ts_ce=ts_ce, ts_kl=ts_kl)
    u = u.masked_fill(masks, float("-inf"))
    if masked != "teacher":
        z = z.detach().masked_fill(masks.expand(T, B, C), float("-inf")).requires_grad_()
    loss = fastsnn.tser_loss(z, u, y, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss * 3.0, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, _paper_formula(z, u, y, **kw).float(), torch.float32, scale=10.0)
    if masked == "teacher":
        return
    assert (grad[masks.expand(T, B, C)] == 0).all()
    for b in range(B):  # each sample alone, its masked classes removed
        kept = ~masks[b]
        z_b = z.detach()[:, b:b + 1, kept].clone().requires_grad_()
        y_b = y[b:b + 1] - masks[b, :y[b]].sum()
        loss_b = reference.tser_loss(z_b, u[b:b + 1, kept], y_b, compute_dtype=torch.float64, **kw)
        (grad_b,) = torch.autograd.grad(loss_b * 3.0 / B, z_b)
        assert_close(grad[:, b:b + 1, kept], grad_b.float(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ts_ce,ts_kl", [(True, True), (False, True)], ids=["ts", "fused-ce"])
def test_saved_bytes_are_the_inputs_and_row_statistics(device, dtype, ts_ce, ts_kl):
    T, B, C = 4, 5, 100
    z, u, y = _data(T, B, C, dtype)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastsnn.tser_loss(z, u, y, ts_ce=ts_ce, ts_kl=ts_kl, backend="triton")
    # z, u and y by reference (they exist anyway) and one fp32 buffer: 4 statistics per (t, b) row, 4 per
    # sample, 1 scalar, 4 partial sums per (time tile, sample) (a row per tile when every term is separated
    # over time, else the T = 4 timesteps of a sample in one tile), and the returned loss and 3 terms
    time_tiles = T if ts_ce and ts_kl else 1
    expected = z.numel() * z.element_size() + u.numel() * u.element_size() + y.numel() * y.element_size()
    expected += (T * B * 4 + B * 4 + 1 + time_tiles * B * 4 + 4) * 4
    assert sum(saved.values()) == expected


def test_no_gradient_buffer_without_grad(device):
    z, u, y = _data(2, 3, 10, torch.float32)
    with torch.no_grad():
        loss = fastsnn.tser_loss(z, u, y, backend="triton")
    assert_close(loss, reference.tser_loss(z, u, y))


def test_module_matches_functional():
    z, u, y = _data(4, 5, 10, torch.float32)
    module = fastsnn.TSERLoss(alpha=0.7, tau=3.0, lam=0.02)
    assert float(module(z, u, y).detach()) == float(fastsnn.tser_loss(z, u, y, alpha=0.7, tau=3.0, lam=0.02).detach())
    assert "lam=0.02" in repr(module)


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_torch_compile_fullgraph(device, dynamic):
    """Traced without a break; a second shape re-traces with symbolic sizes (Dynamo's automatic dynamic
    shapes; with dynamic=True from the start, and the scalar arguments symbolic too), which the fake kernels
    must size from T and B alone."""
    torch._dynamo.reset()

    def step(z, u, y, lam):
        return fastsnn.tser_loss(z * 2.0, u, y, lam=lam, backend="triton")

    compiled_step = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for T, B, C in ((4, 5, 10), (3, 6, 12), (5, 7, 12)):
        z, u, y = _data(T, B, C, torch.float32)
        lam = 0.01 * T
        eager = step(z, u, y, lam)
        g_eager = torch.autograd.grad(eager, z)[0]
        compiled = compiled_step(z, u, y, lam)
        g_compiled = torch.autograd.grad(compiled, z)[0]
        assert_close(compiled, eager)
        assert_close(g_compiled, g_eager)


Z = torch.randn(2, 3, 10)
U = torch.randn(3, 10)
Y = torch.tensor([0, 9, 4])


@pytest.mark.parametrize("args,kwargs,exc,words", [
    ((Z[0], U, Y), {}, ValueError, "student_logits must have shape [T, B, C]"),
    ((Z, U[:2], Y), {}, ValueError, "teacher_logits must have shape [B, C] = [3, 10]"),
    ((Z, U[:, :9], Y), {}, ValueError, "teacher_logits must have shape [B, C] = [3, 10]"),
    ((Z, U, Y.float()), {}, ValueError, "a float target holds soft targets (probabilities) of shape [B, C] = [3, 10]"),
    ((Z, U, torch.full((3, 10), 0.1).index_fill(1, torch.tensor([2]), -0.1)), {}, ValueError,
     "a soft target must hold probabilities (finite, >= 0), got 3 entries"),
    ((Z, U, torch.full((3, 10), float("nan"))), {}, ValueError, "a soft target must hold probabilities"),
    ((Z, U, Y.double()), {}, TypeError, "or a float tensor of soft targets [B, C]"),
    ((Z, U, Y[:2]), {}, ValueError, "target must have shape [B] = [3]"),
    ((Z, U, torch.tensor([0, 10, 1])), {}, ValueError,
     "target must hold class indices in [0, 10) or ignore_index=-100, got min 0 and max 10"),
    ((Z, U, torch.tensor([0, -1, 1])), {}, ValueError,
     "target must hold class indices in [0, 10) or ignore_index=-100, got min -1"),
    ((Z, U, torch.tensor([0, -100, 1])), dict(ignore_index=1), ValueError, "got min -100"),
    ((Z, U, Y.bool()), {}, TypeError, "target must be an integer tensor of class indices (int64, int32"),
    ((Z, U, Y), dict(tau=0.0), ValueError, "tau must be a number in [0.05, 100.0], got 0.0"),
    ((Z, U, Y), dict(tau=1e4), ValueError, "tau must be a number in [0.05, 100.0], got 10000.0"),
    ((Z, U, Y), dict(tau=float("nan")), ValueError, "tau must be a number in [0.05, 100.0]"),
    ((Z, U, Y), dict(entropy_tau=-1.0), ValueError, "entropy_tau must be a number in [0.05, 100.0], or None"),
    ((Z, U, Y), dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    ((Z, U, Y), dict(alpha=1.5), ValueError, "alpha must be in [0, 1]"),
    ((Z, U, Y), dict(alpha=-0.1), ValueError, "alpha must be in [0, 1]"),
    ((Z, U, Y), dict(lam=-0.01), ValueError, "lam must be a finite number >= 0"),
    ((Z, U, Y), dict(entropy_tau=0), ValueError, "entropy_tau must be"),
    ((Z, U, Y), dict(ts_ce=1), TypeError, "ts_ce must be True or False"),
    ((Z, U, Y), dict(backend="cuda"), ValueError, "backend must be one of"),
    ((torch.randn(0, 3, 10), U, Y), {}, ValueError, "T, B and C >= 1"),
    ((torch.randn(2, 3, 0), U[:, :0], Y), {}, ValueError, "T, B and C >= 1"),
    ((Z.long(), U, Y), {}, TypeError, "student_logits must have a floating dtype"),
    ((Z, U, Y.to("meta")), {}, ValueError, "all tensors must be on one device"),
])
def test_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        fastsnn.tser_loss(*args, **kwargs)
    assert words in str(info.value) and str(info.value).startswith("tser_loss:")


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="tser_loss: alpha must be in"):
        fastsnn.TSERLoss(alpha=2.0)


# ---- hostile layouts, dtypes and labels: the kernel path and the reference agree on every one ----

def _check_against_reference(z, u, y, grad_output=3.0, leaves=None, **kw):
    """Loss, terms and gradients (w.r.t. `leaves`, default z) of both paths on the very same tensors."""
    leaves = leaves or [z]
    loss, terms = fastsnn.tser_loss(z, u, y, return_terms=True, backend="triton", **kw)
    grads = torch.autograd.grad(loss * grad_output, leaves)
    ref, ref_terms = reference.tser_loss(z, u, y, return_terms=True, compute_dtype=torch.float64, **kw)
    ref_grads = torch.autograd.grad(ref * grad_output, leaves)
    magnitude = max(1.0, float(ref.detach().abs()))
    assert_close(loss, ref.float().detach(), torch.float32, scale=10 * magnitude)
    for key in terms:
        assert_close(terms[key], ref_terms[key].float(), torch.float32,
                     scale=10 * max(1.0, float(ref_terms[key].abs())))
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert_close(got, want.to(got.dtype), got.dtype)
    assert sum(float(g.abs().sum()) for g in ref_grads) > 0
    return grads


def _logits_layout(kind, T, B, C):
    """(leaf, student_logits view of it) for one hostile layout."""
    if kind == "batch-slice":  # every other sample: non-dense, classes adjacent
        leaf = torch.randn(T, 2 * B + 1, C) * 3
        return leaf.requires_grad_(), lambda t: t[:, 1::2]
    if kind == "class-slice":  # a window of a wider class dim
        leaf = torch.randn(T, B, C + 7) * 3
        return leaf.requires_grad_(), lambda t: t[..., 3:3 + C]
    if kind == "batch-major":  # [B, T, C] transposed to [T, B, C]
        leaf = torch.randn(B, T, C) * 3
        return leaf.requires_grad_(), lambda t: t.transpose(0, 1)
    if kind == "time-expanded":  # one row of logits repeated over T (time stride 0)
        leaf = torch.randn(1, B, C) * 3
        return leaf.requires_grad_(), lambda t: t.expand(T, B, C)
    if kind == "class-strided":  # classes 2 elements apart: copied
        leaf = torch.randn(T, B, C, 2) * 3
        return leaf.requires_grad_(), lambda t: t[..., 0]
    if kind == "offset":  # a view starting 5 elements into its storage
        leaf = torch.randn(T * B * C + 9) * 3
        return leaf.requires_grad_(), lambda t: t[5:5 + T * B * C].view(T, B, C)
    raise ValueError(kind)


LAYOUTS = ["batch-slice", "class-slice", "batch-major", "time-expanded", "class-strided", "offset"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("ts_ce,ts_kl,lam", [(True, True, 0.05), (False, False, 0.0), (True, False, 0.05)],
                         ids=["tser", "skd", "ts_ce-ent"])
@pytest.mark.parametrize("C", [10, 1031])
def test_hostile_logit_layouts(device, kind, ts_ce, ts_kl, lam, C):
    T, B = 3, 5
    leaf, view = _logits_layout(kind, T, B, C)
    before = leaf.detach().clone()
    u, y = torch.randn(B, C) * 3, torch.randint(0, C, (B,))
    (grad,) = _check_against_reference(view(leaf), u, y, leaves=[leaf], ts_ce=ts_ce, ts_kl=ts_kl, lam=lam)
    assert torch.equal(leaf.detach(), before), "the loss wrote into its input"
    # the gradient reaches only the viewed elements of the leaf
    mask = torch.zeros_like(leaf, dtype=torch.bool)
    view(mask).fill_(True) if kind != "time-expanded" else mask.fill_(True)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("kind", ["batch-expanded", "transposed", "class-slice"])
def test_hostile_teacher_layouts(device, kind):
    T, B, C = 3, 4, 37
    if kind == "batch-expanded":
        u = torch.randn(1, C).expand(B, C)
    elif kind == "transposed":
        u = torch.randn(C, B).t()
    else:
        u = torch.randn(B, C + 5)[:, 2:2 + C]
    z, _, y = _data(T, B, C, torch.float32)
    _check_against_reference(z, u * 3, y)


@pytest.mark.parametrize("kind", ["column", "every-other", "expanded-int32", "offset-int16"])
def test_strided_targets_are_read_by_stride(device, kind):
    T, B, C = 2, 6, 11
    if kind == "column":
        y = torch.randint(0, C, (B, 3))[:, 1]
    elif kind == "every-other":
        y = torch.randint(0, C, (2 * B,))[::2]
    elif kind == "expanded-int32":
        y = torch.tensor([4], dtype=torch.int32).expand(B)
    else:
        y = torch.randint(0, C, (B + 3,), dtype=torch.int16)[3:]
    z, u, _ = _data(T, B, C, torch.float32)
    _check_against_reference(z, u, y)
    dense = fastsnn.tser_loss(z, u, y.contiguous().long(), backend="triton")
    assert float(dense.detach()) == float(fastsnn.tser_loss(z, u, y, backend="triton").detach())


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8],
                         ids=["int8", "int16", "int32", "int64", "uint8"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_every_integer_target_dtype_on_both_paths(device, dtype, backend):
    z, u, y = _data(2, 5, 10, torch.float32)
    loss = fastsnn.tser_loss(z, u, y.to(dtype), backend=backend)
    assert_close(loss, reference.tser_loss(z, u, y, compute_dtype=torch.float64).float())


@pytest.mark.parametrize("ts_ce", [True, False], ids=["ts_ce", "fused_ce"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ignore_index_leaves_the_sample_out_of_ce_only(device, ts_ce, backend):
    T, B, C = 3, 6, 10
    z, u, y = _data(T, B, C, torch.float32)
    y[[1, 4]] = -100
    loss, terms = fastsnn.tser_loss(z, u, y, ts_ce=ts_ce, return_terms=True, backend=backend)
    keep = y != -100
    if ts_ce:
        want_ce = torch.stack([F.cross_entropy(z[t], y) for t in range(T)]).mean()
    else:
        want_ce = F.cross_entropy(z.mean(0), y)  # F.cross_entropy's own ignore_index=-100 rule
    assert_close(terms["ce"], want_ce.detach())
    # KL and entropy still count every sample
    full = fastsnn.tser_loss(z, u, torch.where(keep, y, 0), ts_ce=ts_ce, return_terms=True, backend=backend)[1]
    assert_close(terms["kl"], full["kl"])
    assert_close(terms["entropy"], full["entropy"])
    if backend == "triton":
        _check_against_reference(z, u, y, ts_ce=ts_ce)


def test_ignore_index_inside_the_class_range_and_all_ignored(device):
    z, u, y = _data(2, 5, 10, torch.float32)
    y[:2] = 3
    _check_against_reference(z, u, y, ignore_index=3)
    y_none = torch.full((5,), -100)
    loss, terms = fastsnn.tser_loss(z, u, y_none, return_terms=True, backend="triton")
    assert float(terms["ce"]) == 0.0 and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()
    _check_against_reference(z, u, y_none)


@pytest.mark.parametrize("label", [10, -1, 127])
def test_bad_label_without_a_host_check_poisons_loss_terms_and_gradient(device, label):
    """The CUDA rule (no host sync), exercised on both paths by skipping the CPU's host check."""
    from fastsnn.kernels.tser_loss import launch_plan
    from fastsnn.ops.tser_loss import TSER_LOSS

    z, u, y = _data(2, 4, 10, torch.float32)
    y[2] = label
    settings = (0.5, 5.0, 0.01, True, True, 5.0, -100)  # alpha, tau, lam, ts_ce, ts_kl, entropy_tau, ignore_index
    loss, terms = TSER_LOSS(z, u, y, True, *settings, launch_plan(z, u, y, *settings, True))
    (grad,) = torch.autograd.grad(loss, z)
    ref, ref_terms = reference.tser_loss(z, u, y, return_terms=True)
    (ref_grad,) = torch.autograd.grad(ref, z)
    for value in (loss, terms, grad, ref, *ref_terms.values(), ref_grad):
        assert torch.isnan(value).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("grad_output", [65536.0, 1.0 / 65536], ids=["scale64k", "scale1/64k"])
def test_half_precision_gradient_keeps_full_precision_under_loss_scaling(device, dtype, grad_output):
    z, u, y = _data(4, 64, 1000, dtype)
    loss = fastsnn.tser_loss(z, u, y, backend="triton")
    (grad,) = torch.autograd.grad(loss, z, grad_outputs=torch.tensor(grad_output))
    ref = reference.tser_loss(z, u, y, compute_dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad(ref, z, grad_outputs=torch.tensor(grad_output, dtype=torch.float32))
    want = ref_grad.to(dtype)  # the best a half-precision gradient can be: fp64, rounded once
    assert_close(grad, want, dtype, scale=grad_output)
    # no underflow beyond the reference's own rounding
    assert int((grad == 0).sum()) <= int((want == 0).sum())


@pytest.mark.parametrize("tau", [0.05, 100.0])
def test_tau_at_the_ends_of_its_range(device, tau):
    z, u, y = _data(4, 7, 100, torch.float32)
    _check_against_reference(z, u, y, tau=tau, entropy_tau=tau)


@pytest.mark.parametrize("ts_ce,ts_kl,lam", [(True, True, 0.05), (False, False, 0.0), (False, True, 0.05)],
                         ids=["tser", "skd", "fused_ce-ent"])
def test_forward_and_backward_take_three_launches(device, ts_ce, ts_kl, lam, monkeypatch):
    # the CPU's host label check (an error there, a NaN on CUDA) is not part of the CUDA path counted here
    monkeypatch.setattr(sys.modules["fastsnn.ops.tser_loss"], "_check_labels_on_host", lambda *args: None)
    z, u, y = _data(4, 16, 1000, torch.float32)
    go = torch.tensor(2.0)
    with count_launches() as launches:
        loss, terms = fastsnn.tser_loss(z, u, y, ts_ce=ts_ce, ts_kl=ts_kl, lam=lam, return_terms=True,
                                        backend="triton")
        torch.autograd.grad(loss, z, grad_outputs=go)
    assert len(launches["triton"]) == 3, launches
    assert launches["aten"] == [], launches


# ---- soft targets (mixup/CutMix, label smoothing): against the formula, on hostile layouts ----

def _soft_target_layout(kind, B, C, generator):
    """A soft target [B, C] (rows of probabilities, some classes with no mass) in one layout."""
    rows = torch.softmax(torch.randn(B, C, generator=generator) * 2, dim=-1)
    rows[:, 1] = 0.0
    rows = rows / rows.sum(-1, keepdim=True)
    if kind == "dense":
        return rows
    if kind == "transposed":  # class stride B: copied to unit class stride
        return rows.t().contiguous().t()
    if kind == "batch-slice":  # every other row of a bigger buffer, offset
        big = torch.zeros(2 * B + 1, C)
        big[1::2] = rows
        return big[1::2]
    if kind == "broadcast":  # one row for the whole batch (row stride 0)
        return rows[:1].expand(B, C)
    if kind == "unnormalised":  # rows summing to 0.5..1.5: CE = Σq·lse(z) − Σ q·z
        return rows * torch.linspace(0.5, 1.5, B).unsqueeze(1)
    if kind == "smoothed-mix":  # what the training loop builds: a mixup of label-smoothed one-hots
        y1, y2 = torch.randint(0, C, (B,), generator=generator), torch.randint(0, C, (B,), generator=generator)
        hot = [F.one_hot(y, C).float() * 0.9 + 0.1 / C for y in (y1, y2)]
        return 0.7 * hot[0] + 0.3 * hot[1]
    raise ValueError(kind)


SOFT_LAYOUTS = ["dense", "transposed", "batch-slice", "broadcast", "unnormalised", "smoothed-mix"]


@pytest.mark.parametrize("kind", SOFT_LAYOUTS)
@pytest.mark.parametrize("ts_ce,ts_kl,lam", VARIANTS, ids=VARIANT_IDS)
def test_soft_targets_match_the_formula(device, kind, ts_ce, ts_kl, lam):
    g = torch.Generator().manual_seed(7)
    T, B, C = 3, 5, 37
    z = (torch.randn(T, B, C, generator=g) * 3).to(device).requires_grad_()
    u = (torch.randn(B, C, generator=g) * 3).to(device)
    q = _soft_target_layout(kind, B, C, g).to(device)
    kw = dict(alpha=0.4, tau=4.0, lam=lam, ts_ce=ts_ce, ts_kl=ts_kl)
    want = _paper_formula(z, u, q, **kw)
    zd = z.detach().double().requires_grad_()
    want_grad, = torch.autograd.grad(_paper_formula(zd, u, q, keep_graph=True, **kw), zd)
    for backend in ("triton", "reference"):
        loss = fastsnn.tser_loss(z, u, q, backend=backend, **kw)
        grad, = torch.autograd.grad(loss, z)
        assert_close(loss, want.float(), torch.float32, scale=10 * max(1.0, float(want.abs())))
        assert_close(grad, want_grad.float(), torch.float32)
    _check_against_reference(z, u, q, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_soft_targets(device, dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 12, generator=g).to(device, dtype).requires_grad_()
    u = torch.randn(4, 12, generator=g).to(device, dtype)
    q = torch.softmax(torch.randn(4, 12, generator=g), -1).to(device, dtype)
    _check_against_reference(z, u, q)


@pytest.mark.parametrize("ts_ce", [True, False], ids=["ts_ce", "fused_ce"])
def test_one_hot_soft_targets_give_the_class_index_loss(device, ts_ce):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 6, 11, generator=g).to(device).requires_grad_()
    u = torch.randn(6, 11, generator=g).to(device)
    y = torch.randint(0, 11, (6,), generator=g).to(device)
    hard = fastsnn.tser_loss(z, u, y, ts_ce=ts_ce, backend="triton")
    soft = fastsnn.tser_loss(z, u, F.one_hot(y, 11).float(), ts_ce=ts_ce, backend="triton")
    assert_close(soft, hard, torch.float32)
    assert_close(torch.autograd.grad(soft, z)[0], torch.autograd.grad(hard, z)[0], torch.float32)


def test_smoothed_soft_target_ce_is_cross_entropy_with_label_smoothing(device):
    """alpha = 0, lam = 0, ts_ce=False: the loss is CE of the time-mean logits, which F.cross_entropy gives with
    label_smoothing for the smoothed one-hot q = (1 − ε)·onehot + ε/C."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 6, 9, generator=g).to(device)
    y = torch.randint(0, 9, (6,), generator=g).to(device)
    q = F.one_hot(y, 9).float() * 0.8 + 0.2 / 9
    loss = fastsnn.tser_loss(z, torch.zeros(6, 9, device=device), q, alpha=0.0, lam=0.0, ts_ce=False,
                             backend="triton")
    assert_close(loss, F.cross_entropy(z.mean(0), y, label_smoothing=0.2), torch.float32)
