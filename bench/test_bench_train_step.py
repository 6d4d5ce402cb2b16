"""One training step (forward, TSER loss, backward, SGD step) of fastsnn's network against the same network
with SpikingJelly 2.0 LIFNode neurons and the eager loss; and the bytes each saves for backward."""
import json
import os

import pytest
import torch

import fastsnn
from common import run_benchmark, saved_bytes
from fastsnn import models, reference

HAS_CUDA = torch.cuda.is_available()
CASES = {"sew_resnet34": dict(size=224, batch=32, cpu_batch=1), "spiking_resnet19": dict(size=32, batch=128, cpu_batch=2)}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(arch, provider, device):
    """(model, loss_fn): fastsnn's, or the same network with SpikingJelly neurons and the eager loss."""
    torch.manual_seed(0)
    model = models.create(arch, 100 if arch != "sew_resnet34" else 1000, T=4, surrogate="atan", detach_reset=True)
    if provider == "spikingjelly":
        sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
        sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
        for name, m in list(models.spiking_neurons(model).items()):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    sj_neuron.LIFNode(tau=2.0, surrogate_function=sj_surrogate.ATan(), detach_reset=True,
                                      step_mode="m"))
        return model.to(device), reference.tser_loss
    return model.to(device), fastsnn.tser_loss


def _reset(model):
    for m in model.modules():
        if hasattr(m, "reset") and not isinstance(m, torch.nn.BatchNorm2d):
            m.reset()


def _step_fn(model, loss_fn, images, teacher_logits, target, optimizer, amp):
    def step():
        _reset(model)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss = loss_fn(logits, teacher_logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.skipif(not HAS_CUDA, reason="GPU rows need CUDA")
@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("provider", ["fastsnn", "spikingjelly"])
def test_train_step_gpu(benchmark, provider, arch):
    case = CASES[arch]
    benchmark.group = f"train step {arch} T=4 {case['size']}px B={case['batch']} bf16"
    model, loss_fn = build(arch, provider, "cuda")
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(case["batch"], 3, case["size"], case["size"], device="cuda").to(
        memory_format=torch.channels_last)
    classes = model.fc.out_features
    teacher_logits = torch.randn(case["batch"], classes, device="cuda")
    target = torch.randint(0, classes, (case["batch"],), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run_benchmark(benchmark, _step_fn(model, loss_fn, images, teacher_logits, target, optimizer, True),
                  bytes_moved=None, copy_gbs=None, rounds=10, warmup=3, provider=provider, op="train_step",
                  arch=arch, batch=case["batch"])
    benchmark.extra_info["images/s"] = round(case["batch"] / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("arch", list(CASES))
def test_saved_activation_bytes(benchmark, arch):
    """Bytes saved for backward by one training step's forward and loss, fastsnn vs SpikingJelly neurons.
    Runs on the CPU too (fastsnn's kernels interpreted there); written to bench/results/saved_bytes.json."""
    case = CASES[arch]
    device = "cuda" if HAS_CUDA else "cpu"
    batch = case["batch"] if HAS_CUDA else case["cpu_batch"]
    images = torch.randn(batch, 3, case["size"], case["size"], device=device)
    row = {"arch": arch, "T": 4, "batch": batch, "image_size": case["size"], "device": device}
    for provider in ("fastsnn", "spikingjelly"):
        model, loss_fn = build(arch, provider, device)
        classes = model.fc.out_features
        teacher_logits = torch.randn(batch, classes, device=device)
        target = torch.randint(0, classes, (batch,), device=device)
        row[f"{provider}_MB"] = round(saved_bytes(lambda: loss_fn(model(images), teacher_logits, target)) / 2**20, 2)
    row["ratio"] = round(row["fastsnn_MB"] / row["spikingjelly_MB"], 3)
    benchmark.extra_info.update(row)
    benchmark.group = "saved bytes"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"saved_bytes-{device}.json")
    existing = json.load(open(path)) if os.path.exists(path) else {}
    existing[arch] = row
    with open(path, "w") as f:
        json.dump(existing, f, indent=2)
    assert row["fastsnn_MB"] > 0 and row["spikingjelly_MB"] > 0
