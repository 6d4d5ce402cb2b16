"""TSER loss: the fused Triton kernel (interpreted on the CPU) against the reference and its autograd."""
import itertools

import pytest
import torch

import fastsnn
from fastsnn import reference
from helpers import assert_close

VARIANTS = list(itertools.product([True, False], [True, False], [0.0, 0.05]))  # ts_ce, ts_kl, lam


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
        assert_close(terms[key], ref_terms[key].float(), torch.float32, scale=max(1.0, float(ref_terms[key].abs())) * 10)
    assert_close(grad, ref_grad.to(dtype), dtype)
    assert ref_grad.abs().sum() > 0


@pytest.mark.parametrize("ts_ce,ts_kl,lam", VARIANTS)
@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("C", [2, 10, 100, 1000, 1031])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(ts_ce, ts_kl, lam, T, C, dtype):
    _compare(T, 5, C, dtype, ts_ce, ts_kl, lam, tau=4.0)


@pytest.mark.parametrize("ts_ce,ts_kl,lam", VARIANTS)
def test_logits_of_magnitude_1e4(ts_ce, ts_kl, lam):
    _compare(4, 3, 100, torch.float32, ts_ce, ts_kl, lam, scale=1e4)


def test_more_classes_than_one_block():
    _compare(2, 3, 32768 + 17, torch.float32, True, True, 0.01)


def test_entropy_temperature_and_mixed_dtypes():
    _compare(4, 7, 100, torch.float16, True, True, 0.1, teacher_dtype=torch.float32, entropy_tau=2.0, alpha=0.3)


def test_ablation_rows_are_distinct_losses():
    # Table 3's five rows: none, TS on CE, TS on KL, both, both + entropy
    z, u, y = _data(4, 9, 10, torch.float32)
    rows = [dict(ts_ce=False, ts_kl=False, lam=0.0), dict(ts_ce=True, ts_kl=False, lam=0.0),
            dict(ts_ce=False, ts_kl=True, lam=0.0), dict(ts_ce=True, ts_kl=True, lam=0.0),
            dict(ts_ce=True, ts_kl=True, lam=0.05)]
    losses = [float(fastsnn.tser_loss(z, u, y, backend="triton", **row).detach()) for row in rows]
    assert len(set(losses)) == 5


def test_teacher_gets_no_gradient():
    z, u, y = _data(2, 3, 10, torch.float32)
    u.requires_grad_()
    fastsnn.tser_loss(z, u, y, backend="triton").backward()
    assert u.grad is None and z.grad is not None


def test_backward_with_unit_grad_output_returns_the_stored_gradient():
    z, u, y = _data(2, 3, 10, torch.float32)
    loss = fastsnn.tser_loss(z, u, y, backend="triton")
    (g1,) = torch.autograd.grad(loss, z)
    ref = torch.autograd.grad(reference.tser_loss(z, u, y), z)[0]
    assert_close(g1, ref)


def test_second_backward_is_refused():
    z, u, y = _data(2, 3, 10, torch.float32)
    loss = fastsnn.tser_loss(z, u, y, backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        loss.backward()


def test_non_finite_logits_give_a_non_finite_loss():
    for bad in (float("nan"), float("inf"), float("-inf")):
        z, u, y = _data(2, 3, 10, torch.float32)
        with torch.no_grad():
            z[1, 2, 3] = bad
        assert not torch.isfinite(fastsnn.tser_loss(z, u, y, backend="triton"))
        z, u, y = _data(2, 3, 10, torch.float32)
        u[0, 0] = bad
        assert not torch.isfinite(fastsnn.tser_loss(z, u, y, backend="triton"))


def test_saved_bytes_are_the_gradient_only():
    z, u, y = _data(4, 5, 100, torch.float16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fastsnn.tser_loss(z, u, y, backend="triton")
    assert sum(saved) == z.numel() * z.element_size()


def test_no_gradient_buffer_without_grad():
    z, u, y = _data(2, 3, 10, torch.float32)
    with torch.no_grad():
        loss = fastsnn.tser_loss(z, u, y, backend="triton")
    assert_close(loss, reference.tser_loss(z, u, y))


def test_module_matches_functional():
    z, u, y = _data(4, 5, 10, torch.float32)
    module = fastsnn.TSERLoss(alpha=0.7, tau=3.0, lam=0.02)
    assert float(module(z, u, y).detach()) == float(fastsnn.tser_loss(z, u, y, alpha=0.7, tau=3.0, lam=0.02).detach())
    assert "lam=0.02" in repr(module)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    z, u, y = _data(4, 5, 10, torch.float32)

    def step(z, u, y):
        return fastsnn.tser_loss(z * 2.0, u, y, backend="triton")

    eager = step(z, u, y)
    g_eager = torch.autograd.grad(eager, z)[0]
    compiled = torch.compile(step, fullgraph=True)(z, u, y)
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
    ((Z, U, Y.float()), {}, TypeError, "target must be an integer tensor"),
    ((Z, U, Y[:2]), {}, ValueError, "target must have shape [B] = [3]"),
    ((Z, U, torch.tensor([0, 10, 1])), {}, ValueError, "target must hold class indices in [0, 10), got min 0 and max 10"),
    ((Z, U, torch.tensor([0, -1, 1])), {}, ValueError, "target must hold class indices in [0, 10), got min -1"),
    ((Z, U, Y), dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
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
