"""Compiled Triton on a GPU: the kernels against the reference, a model and the training program on CUDA.

Skipped without CUDA. Under the interpreter (the default test process) the one launcher test re-runs
this file in a subprocess with FASTSNN_COMPILED=1, so `python -m pytest` on a GPU machine checks the
compiled kernels too."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import fastsnn
from fastsnn import models, reference
from fastsnn.backend import INTERPRET
from helpers import assert_close

HAS_CUDA = torch.cuda.is_available()
compiled_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA and compiled Triton")


@pytest.mark.skipif(not HAS_CUDA or not INTERPRET, reason="needs CUDA; launches the compiled run")
def test_compiled_run_on_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FASTSNN_COMPILED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", os.path.abspath(__file__)],
                          capture_output=True, text=True, env=env, timeout=3600, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@compiled_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 4, 9])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid", "piecewise_quadratic", "erf"])
@pytest.mark.parametrize("v_reset,decay_input,detach_reset,with_v_init",
                         list(itertools.product([0.0, None], [True, False], [True, False], [True, False])))
def test_lif_compiled(dtype, T, surrogate, v_reset, decay_input, detach_reset, with_v_init):
    kw = dict(surrogate=surrogate, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset)
    x = (torch.randn(T, 3, 1037, device="cuda") * 1.5 + 0.4).to(dtype).requires_grad_()
    v0 = (torch.randn(3, 1037, device="cuda") * 0.5).to(dtype).requires_grad_() if with_v_init else None
    g, gv = torch.randn(T, 3, 1037, device="cuda"), torch.randn(3, 1037, device="cuda")
    inputs = [x] + ([v0] if with_v_init else [])

    def run(fn, **extra):
        s, v = fn(x, v_init=v0, return_v=True, **kw, **extra)
        return (s, v, *torch.autograd.grad((s.float() * g).sum() + (v * gv).sum(), inputs))

    got = run(fastsnn.lif_multistep, backend="triton")
    want = run(reference.lif_multistep)
    assert torch.equal(got[0], want[0])
    assert_close(got[1], want[1], torch.float32)
    for a, b in zip(got[2:], want[2:]):
        assert_close(a, b, dtype)


@compiled_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,C", [(1, 10), (4, 100), (4, 1000), (8, 1031), (2, 32785)])
@pytest.mark.parametrize("ts_ce,ts_kl,lam", list(itertools.product([True, False], [True, False], [0.0, 0.05])))
def test_tser_loss_compiled(dtype, T, C, ts_ce, ts_kl, lam):
    B = 37
    z = (torch.randn(T, B, C, device="cuda") * 3).to(dtype).requires_grad_()
    u = (torch.randn(B, C, device="cuda") * 3).to(dtype)
    y = torch.randint(0, C, (B,), device="cuda")
    kw = dict(ts_ce=ts_ce, ts_kl=ts_kl, lam=lam)
    loss, terms = fastsnn.tser_loss(z, u, y, return_terms=True, backend="triton", **kw)
    (grad,) = torch.autograd.grad(loss * 3, z)
    ref, ref_terms = reference.tser_loss(z, u, y, return_terms=True, compute_dtype=torch.float64, **kw)
    (ref_grad,) = torch.autograd.grad(ref * 3, z)
    assert_close(loss, ref.float().detach(), torch.float32, scale=10 * max(1.0, float(ref.detach().abs())))
    for key in terms:
        assert_close(terms[key], ref_terms[key].float(), torch.float32, scale=10 * max(1.0, float(ref_terms[key].abs())))
    assert_close(grad, ref_grad.to(dtype), dtype)


@compiled_only
def test_model_step_bf16_channels_last():
    model = models.create("sew_resnet18", 10, T=4).cuda().to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images)
    loss = fastsnn.tser_loss(logits, torch.randn(8, 10, device="cuda"), torch.randint(0, 10, (8,), device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (4, 8, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@compiled_only
def test_training_program_on_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FASTSNN_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "fastsnn.train", "--device", "cuda", "--amp", "bf16",
                           "--channels-last", "--epochs", "3", "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
