"""Compiled Triton on a GPU. The kernel tests (test_lif.py, test_bn_lif.py, test_tser_loss.py,
test_properties.py) take a `device` parameter: this file's launcher re-runs them in a process with
FASTSNN_COMPILED=1, where their device is "cuda" and the kernels run compiled (bf16 included); the checks
below need a whole model or the training program. Everything here is skipped without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

import fastsnn
from fastsnn import models
from fastsnn.backend import INTERPRET

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_CUDA = torch.cuda.is_available()
compiled_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA and compiled Triton")
DEVICE_TEST_FILES = ["test_lif.py", "test_bn_lif.py", "test_plif.py", "test_spike_storage.py", "test_tser_loss.py",
                     "test_properties.py", "test_cuda.py"]


@pytest.mark.skipif(not HAS_CUDA or not INTERPRET, reason="needs CUDA; launches the compiled run")
def test_compiled_run_on_the_gpu(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FASTSNN_COMPILED": "1"}
    quick = ["--quick"] if request.config.getoption("--quick") else ["--full"]  # compiled, every case is fast
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *quick,
                           *DEVICE_TEST_FILES], capture_output=True, text=True, env=env, timeout=3600, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


@compiled_only
@pytest.mark.parametrize("arch", models.available()["students"])
def test_one_bf16_channels_last_training_step_of_each_student(arch):
    size = 64 if models.REGISTRY[arch].default_stem == "imagenet" else 8 if arch.startswith("digits") else 32
    model = models.create(arch, 10, T=4).cuda().to(memory_format=torch.channels_last)
    channels = models.REGISTRY[arch].in_channels
    images = torch.randn(8, channels, size, size, device="cuda").to(memory_format=torch.channels_last)
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
                           "--channels-last", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@compiled_only
@pytest.mark.parametrize("deterministic", [True, False], ids=["cudnn-deterministic", "cudnn-default"])
@pytest.mark.parametrize("arch", ["spiking_resnet19", "sew_resnet18", "spiking_vgg11"])
def test_recompute_on_cuda_matches_the_stored_step(arch, deterministic, monkeypatch):
    """recompute=True against recompute=False on the GPU, fp32, channels_last. With cuDNN deterministic (and
    benchmark off) the recomputed convolution is the forward's, so everything is bit-identical, as on the CPU.
    With cuDNN's defaults the recompute may run another algorithm than the forward, whose output differs in the
    last bits: the forward (logits, loss, running statistics) stays identical, and the gradients agree to fp32
    rounding through one BatchNorm backward and a surrogate (a relative 1e-3 of each gradient's largest entry;
    a spike-threshold crossing is never involved, the forward's spikes being the ones kept)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    size = 64 if models.REGISTRY[arch].default_stem == "imagenet" else 32
    plain = models.create(arch, 10, T=4).cuda().to(memory_format=torch.channels_last)
    other = models.create(arch, 10, T=4, recompute=True).cuda().to(memory_format=torch.channels_last)
    other.load_state_dict(plain.state_dict())
    images = torch.randn(8, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    teacher, target = torch.randn(8, 10, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    results = []
    for model in (plain, other):
        logits = model(images)
        loss = fastsnn.tser_loss(logits, teacher, target)
        loss.backward()
        results.append((logits, loss))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for a, b in zip(plain.buffers(), other.buffers()):
        assert torch.equal(a, b)
    for (name, a), b in zip(plain.named_parameters(), other.parameters()):
        if deterministic:
            assert torch.equal(a.grad, b.grad), name
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-3 * a.grad.abs().max().item() + 1e-12,
                                       msg=name)
