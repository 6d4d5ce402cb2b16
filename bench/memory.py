"""Memory report: activation bytes saved for backward by one training step (forward + TSER loss), fastsnn's
students (as built by default, and with recompute=True: no convolution output saved) against the same networks
with SpikingJelly 2.0 LIFNodes (and PyTorch's BatchNorm, convolutions and pools), for T = 1 … 8; the largest
batch whose saved activations fit a 24 GB card; a plot against T; and what the recompute costs: the
convolution MACs it adds to a training step, counted exactly (torch.utils.flop_counter over the step's
forward and backward), as a fraction of the step's convolution MACs without it.

    python bench/memory.py [--out DIR] [--T 1 2 4 8] [--device cuda]

On the CPU (the default) the count is made at batch 1 with fastsnn's kernel launches replaced by no-ops: what
autograd saves depends on shapes only, not on values (the benchmark row test_saved_activation_bytes checks the
same figures). On CUDA the kernels run, at batch 8, and the peak allocated memory of the step is added.
Bytes per sample = bytes / batch; the largest batch = ⌊24 GB / bytes per sample⌋ (activations only: parameters,
optimizer state and workspace come on top). Writes memory.md and memory.png (matplotlib, when installed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NETWORKS = {"sew_resnet34": (224, 1000), "spiking_resnet19": (32, 100), "spiking_vgg11": (32, 100)}
CARD_BYTES = 24 * 10**9


def _build(arch: str, provider: str, device: str, T: int):
    """The networks of test_bench_train_step.build (fastsnn's, or with SpikingJelly neurons), spiking_vgg11 added."""
    import test_bench_train_step as tb

    tb.CASES.setdefault("spiking_vgg11", dict(image=32, batch=128, classes=100, tiny=(8, 1)))
    return tb.build(arch, provider, device, T=T)


PROVIDERS = ("fastsnn", "fastsnn-recompute", "spikingjelly")


def measure(arch: str, T: int, provider: str, device: str, batch: int) -> dict:
    from common import saved_bytes

    image, classes = NETWORKS[arch]
    model, loss_fn, _ = _build(arch, provider, device, T)
    images = torch.randn(batch, 3, image, image, device=device)
    teacher, target = torch.randn(batch, classes, device=device), torch.randint(0, classes, (batch,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    def step():
        loss = loss_fn(model(images), teacher, target)
        if device == "cuda":  # for the peak; on the CPU the launches are no-ops and only the count matters
            loss.backward()
    nbytes = saved_bytes(step)
    row = {"arch": arch, "T": T, "provider": provider, "batch": batch, "image": image, "bytes": nbytes,
           "bytes_per_sample": nbytes / batch, "max_batch_24GB": int(CARD_BYTES // (nbytes / batch))}
    if device == "cuda":
        row["peak_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def recompute_macs(arch: str, T: int, device: str, batch: int) -> dict:
    """Convolution MACs of one training step of the recompute=True student, counted by
    torch.utils.flop_counter (MACs = FLOPs / 2): the forward's convolutions, the backward's gradient
    convolutions (aten.convolution_backward), and the convolutions the backward recomputes (aten.convolution
    calls inside the backward: the only ones there)."""
    from torch.utils.flop_counter import FlopCounterMode

    image, classes = NETWORKS[arch]
    model, loss_fn, _ = _build(arch, "fastsnn-recompute", device, T)
    images = torch.randn(batch, 3, image, image, device=device)
    teacher, target = torch.randn(batch, classes, device=device), torch.randint(0, classes, (batch,), device=device)
    conv, conv_backward = torch.ops.aten.convolution, torch.ops.aten.convolution_backward
    with FlopCounterMode(display=False) as forward:
        loss = loss_fn(model(images), teacher, target)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    fwd, bwd = forward.get_flop_counts()["Global"], backward.get_flop_counts()["Global"]
    step = (fwd.get(conv, 0) + bwd.get(conv_backward, 0)) // 2
    recomputed = bwd.get(conv, 0) // 2
    return {"arch": arch, "T": T, "batch": batch, "step_conv_macs": step, "recomputed_conv_macs": recomputed,
            "recompute_fraction": recomputed / step}


def table(rows: list[dict], macs: list[dict] = ()) -> str:
    lines = ["| network | T | fastsnn MB/sample | fastsnn recompute MB/sample | SpikingJelly neurons MB/sample | "
             "ratio | ratio recompute | largest batch in 24 GB (fastsnn / recompute / SpikingJelly) |",
             "|---|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["arch"], r["T"]), {})[r["provider"]] = r
    for (arch, T), cells in by_key.items():
        f, c, s = cells["fastsnn"], cells["fastsnn-recompute"], cells["spikingjelly"]
        lines.append(f"| {arch} ({f['image']} px) | {T} | {f['bytes_per_sample'] / 2**20:.1f} | "
                     f"{c['bytes_per_sample'] / 2**20:.2f} | {s['bytes_per_sample'] / 2**20:.1f} | "
                     f"{f['bytes'] / s['bytes']:.3f} | {c['bytes'] / s['bytes']:.4f} | "
                     f"{f['max_batch_24GB']} / {c['max_batch_24GB']} / {s['max_batch_24GB']} |")
    if macs:
        lines += ["", "What the recompute costs: convolution MACs per training step (forward + backward), per sample",
                  "", "| network | T | step's conv GMACs | recomputed GMACs | fraction |", "|---|---|---|---|---|"]
        lines += [f"| {m['arch']} | {m['T']} | {m['step_conv_macs'] / m['batch'] / 1e9:.3f} | "
                  f"{m['recomputed_conv_macs'] / m['batch'] / 1e9:.3f} | {m['recompute_fraction']:.3f} |" for m in macs]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(NETWORKS), figsize=(4 * len(NETWORKS), 3.2))
    for ax, arch in zip(axes, NETWORKS):
        for provider, style in (("fastsnn", "o-"), ("fastsnn-recompute", "^-"), ("spikingjelly", "s--")):
            pts = sorted((r["T"], r["bytes_per_sample"] / 2**20) for r in rows
                         if r["arch"] == arch and r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=provider)
        ax.set_title(arch)
        ax.set_xlabel("T")
        ax.set_ylabel("MB saved per sample")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for memory.md, memory.json, memory.png")
    parser.add_argument("--T", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--macs", action=argparse.BooleanOptionalAction, default=True,
                        help="count the recompute's convolution MACs (runs one backward per network and T)")
    parser.add_argument("--macs-T", type=int, nargs="+", help="the T values for the MAC count (default: --T)")
    opts = parser.parse_args(argv)
    if opts.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may reach a kernel launcher only this way
        from triton.runtime.jit import KernelInterface

        from fastsnn.ops import spike_storage

        KernelInterface.__getitem__ = lambda kernel, grid: (lambda *a, **k: None)
        spike_storage.CHECK_DEFAULT = False  # no kernel runs, so the spikes are not 0/1: nothing to check
    batch = 1 if opts.device == "cpu" else 8
    rows, macs = [], []
    for arch in opts.arch:
        for T in opts.T:
            for provider in PROVIDERS:
                rows.append(measure(arch, T, provider, opts.device, batch))
                print(json.dumps(rows[-1]), flush=True)
        if opts.macs:
            for T in opts.macs_T or opts.T:
                macs.append(recompute_macs(arch, T, opts.device, batch))
                print(json.dumps(macs[-1]), flush=True)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "memory.json"), "w") as f:
        json.dump({"saved": rows, "recompute_macs": macs}, f, indent=1)
    text = table(rows, macs)
    with open(os.path.join(opts.out, "memory.md"), "w") as f:
        f.write(f"Activation bytes saved for backward per training step, {opts.device}, batch {batch}, fp32\n\n"
                + text + "\n")
    print(text)
    if plot(rows, os.path.join(opts.out, "memory.png")):
        print(f"plot: {os.path.join(opts.out, 'memory.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
