"""One training step (forward, TSER loss, backward, SGD step) of fastsnn's network against the same network
with SpikingJelly 2.0 LIFNode neurons on its Triton kernels, the same loss (fastsnn.tser_loss) on every side;
fastsnn also unfused (BatchNorm then neuron, dense convolutions: the gain of fusion and of packing each show) and
compiled (torch.compile mode="reduce-overhead": CUDA graphs); and the bytes each saves for backward. Rows record;
bench/report.py writes."""
import pytest
import torch

import fastsnn
from common import DEVICE, GPU_ROWS, fastsnn_path, prepare_spikingjelly, record, run_benchmark, saved_bytes, \
    size, spikingjelly_path, timings
from fastsnn import models

CASES = {"sew_resnet34": dict(image=224, batch=32, classes=1000, tiny=(32, 1)),
         "spiking_resnet19": dict(image=32, batch=128, classes=100, tiny=(8, 1))}
PROVIDERS = ["fastsnn", "fastsnn-recompute", "fastsnn-unfused", "spikingjelly", "fastsnn-compiled"]


def build(arch, provider, device, dtype=torch.float32, T=4):
    """(model, loss_fn, path): fastsnn's (fused BatchNorm + neuron, spikes saved as bits; "fastsnn-recompute":
    the same with recompute=True, no convolution output saved; "fastsnn-unfused": BatchNorm then neuron,
    nn.Conv2d/nn.MaxPool2d; "fastsnn-compiled": fastsnn's under torch.compile with mode="reduce-overhead"), or
    the unfused network (same weights) with SpikingJelly neurons. The loss is fastsnn.tser_loss for every
    provider."""
    torch.manual_seed(0)
    # the others: nn.Conv2d, nn.MaxPool2d, BN then neuron
    fastsnn_own = provider in ("fastsnn", "fastsnn-recompute", "fastsnn-compiled")
    model = models.create(arch, CASES[arch]["classes"], T=T, surrogate="atan", detach_reset=True,
                          fuse_bn=fastsnn_own, pack_spikes=fastsnn_own, recompute=provider == "fastsnn-recompute")
    if provider in ("fastsnn", "fastsnn-recompute", "fastsnn-unfused"):
        return model.to(device), fastsnn.tser_loss, fastsnn_path(device)
    if provider == "fastsnn-compiled":
        return (torch.compile(model.to(device), mode="reduce-overhead"), fastsnn.tser_loss,
                fastsnn_path(device) + "+torch.compile(reduce-overhead)")
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    for name in list(models.spiking_neurons(model)):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                sj_neuron.LIFNode(tau=2.0, surrogate_function=sj_surrogate.ATan(), detach_reset=True, step_mode="m"))
    model = model.to(device)
    prepare_spikingjelly(model, dtype, device)
    return model, fastsnn.tser_loss, spikingjelly_path(device, dtype)


def _reset(model):
    for m in model.modules():
        if hasattr(m, "reset") and not isinstance(m, torch.nn.BatchNorm2d):
            m.reset()


def _forward_loss(model, loss_fn, images, teacher_logits, target, amp):
    _reset(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
    return loss_fn(logits.float(), teacher_logits, target)


def _step_fn(model, loss_fn, images, teacher_logits, target, optimizer, amp):
    def step():
        loss = _forward_loss(model, loss_fn, images, teacher_logits, target, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.skipif(not GPU_ROWS, reason="GPU rows need CUDA (or FASTSNN_BENCH_DRY_RUN=1)")
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, copy_gbs, provider, arch, channels_last):
    if provider == "fastsnn-compiled" and not (arch == "spiking_resnet19" and channels_last):
        pytest.skip("one compiled row: spiking_resnet19, channels_last")
    case = CASES[arch]
    image, batch = size((case["image"], case["batch"]), case["tiny"])
    amp = DEVICE == "cuda"  # bf16 autocast on the GPU
    benchmark.group = f"train step {arch} T=4 {image}px B={batch} {'bf16' if amp else 'fp32'} " + \
        ("channels_last" if channels_last else "nchw")
    model, loss_fn, path = build(arch, provider, DEVICE, torch.bfloat16 if amp else torch.float32)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    images = torch.randn(batch, 3, image, image, device=DEVICE).to(memory_format=layout)
    teacher_logits = torch.randn(batch, case["classes"], device=DEVICE)
    target = torch.randint(0, case["classes"], (batch,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _step_fn(model, loss_fn, images, teacher_logits, target, optimizer, amp)
    # floor: every activation saved for backward written once in the forward and read once in the backward
    # (counted on the eager module: a compiled fastsnn student saves what the eager one does, tests/test_bn_lif.py)
    eager_model = getattr(model, "_orig_mod", model)
    activations = saved_bytes(lambda: _forward_loss(eager_model, loss_fn, images, teacher_logits, target, amp))
    run_benchmark(benchmark, step, bytes_moved=None, floor_bytes=2 * activations, copy_gbs=copy_gbs, path=path,
                  items=batch, provider=provider, op="train_step", arch=arch, image=image, batch=batch,
                  channels_last=channels_last, dtype="bf16" if amp else "fp32", saved_bytes=activations)


SAVED_CASES = [("sew_resnet34", 4), ("spiking_resnet19", 2), ("spiking_resnet19", 4)]


@pytest.mark.parametrize("arch,T", SAVED_CASES, ids=[f"{a}-T{T}" for a, T in SAVED_CASES])
def test_saved_activation_bytes(benchmark, arch, T, monkeypatch):
    """Activation bytes saved for backward by one training step's forward and loss (parameters left out):
    fastsnn (fused BatchNorm + neuron, spikes as bits), the same with recompute=True, fastsnn unfused with dense
    convolutions, and the same
    network with SpikingJelly neurons (fp32; on the CPU at batch 1 with fastsnn's kernel launches no-op'd:
    what is saved depends on shapes only, and interpreting them at 224 px takes an hour). Recorded in
    extra_info; report.py tabulates."""
    case = CASES[arch]
    image, batch = case["image"], (case["batch"] if DEVICE == "cuda" else 1)
    if DEVICE != "cuda":
        from triton.runtime.jit import KernelInterface

        from fastsnn.ops import spike_storage

        monkeypatch.setattr(KernelInterface, "__getitem__", lambda kernel, grid: (lambda *a, **k: None))
        # no kernel runs, so the spikes are not 0/1: the checked mode (FASTSNN_CHECK_SPIKES) would refuse them
        monkeypatch.setattr(spike_storage, "CHECK_DEFAULT", False)
    images = torch.randn(batch, 3, image, image, device=DEVICE)
    row = {"op": "saved_bytes", "arch": arch, "T": T, "batch": batch, "image": image, "path": fastsnn_path(DEVICE),
           "provider": "fastsnn"}
    for provider in ("fastsnn", "fastsnn-recompute", "fastsnn-unfused", "spikingjelly"):
        model, loss_fn, _ = build(arch, provider, DEVICE, T=T)
        teacher_logits = torch.randn(batch, case["classes"], device=DEVICE)
        target = torch.randint(0, case["classes"], (batch,), device=DEVICE)
        row[f"{provider.replace('-', '_')}_bytes"] = saved_bytes(lambda: loss_fn(model(images), teacher_logits,
                                                                                 target))
    row["ratio"] = round(row["fastsnn_bytes"] / row["spikingjelly_bytes"], 3)
    row["ratio_recompute"] = round(row["fastsnn_recompute_bytes"] / row["spikingjelly_bytes"], 4)
    row["ratio_unfused"] = round(row["fastsnn_unfused_bytes"] / row["spikingjelly_bytes"], 3)
    benchmark.group = "saved bytes"
    record(benchmark, dict(row, gpu_row=False))


# the teacher of each student (the training program's pairing) and, for the CPU rows, a size a CPU steps through
TEACHERS = {"sew_resnet34": ("resnet34", dict(imagenet=True), (64, 2)),
            "spiking_resnet19": ("resnet19", {}, (32, 4))}


@pytest.mark.parametrize("arch", list(TEACHERS))
def test_teacher_share(benchmark, copy_gbs, arch):
    """The teacher's share of a distillation step (issue 29 item 7): the teacher's forward as the training program
    runs it (eval mode, no_grad, the student's autocast and memory format) against the whole step (that forward,
    then the student's forward, TSER loss, backward and SGD step). GPU rows: fastsnn's student, bf16, channels_last,
    the headline sizes (device clocks); CPU rows (no FASTSNN_BENCH_DRY_RUN): both networks in plain PyTorch
    (backend="reference", unfused) at a small size, wall clock: what a CPU run of the program pays."""
    case = CASES[arch]
    teacher_name, teacher_kwargs, cpu_size = TEACHERS[arch]
    if GPU_ROWS:
        image, batch = size((case["image"], case["batch"]), case["tiny"])
        student, loss_fn, path = build(arch, "fastsnn", DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    else:
        image, batch = cpu_size
        torch.manual_seed(0)
        student = models.create(arch, case["classes"], T=4, backend="reference", fuse_bn=False, pack_spikes=False)
        loss_fn, path = fastsnn.tser_loss, "cpu: plain PyTorch (backend='reference', unfused)"
    amp = DEVICE == "cuda"
    layout = torch.channels_last
    student = student.to(DEVICE, memory_format=layout)
    teacher = models.create(teacher_name, case["classes"], **teacher_kwargs).to(DEVICE, memory_format=layout).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    images = torch.randn(batch, 3, image, image, device=DEVICE).to(memory_format=layout)
    target = torch.randint(0, case["classes"], (batch,), device=DEVICE)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def teacher_forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return teacher(images).float()

    def step():
        _step_fn(student, loss_fn, images, teacher_forward(), target, optimizer, amp)()

    benchmark.group = f"teacher share {arch}+{teacher_name} T=4 {image}px B={batch} {'bf16' if amp else 'fp32'}"
    teacher_t, step_t = timings(teacher_forward), timings(step)
    record(benchmark, dict(op="teacher_share", provider="fastsnn", arch=arch, teacher=teacher_name, image=image,
                           batch=batch, dtype="bf16" if amp else "fp32", path=path, device=DEVICE, gpu_row=GPU_ROWS,
                           kernel_method=step_t["kernel_method"], teacher_kernel_us=teacher_t["kernel_us"],
                           step_kernel_us=step_t["kernel_us"], teacher_eager_us=teacher_t["eager_us"],
                           step_eager_us=step_t["eager_us"],
                           teacher_share=round(teacher_t["kernel_us"] / step_t["kernel_us"], 3),
                           **{"images/s": float(f"{batch / (step_t['eager_us'] * 1e-6):.4g}")}))
