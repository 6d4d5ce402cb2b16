"""python -m fastsnn.train: distil an ANN teacher into a spiking student with the TSER loss.

With no arguments it runs the whole job on scikit-learn's bundled 8×8 digits on the CPU: a small ANN
teacher (trained once and cached), then a spiking student distilled with TSER. `--ann` trains a teacher
with the same program; its checkpoint is a valid --teacher-weights. Many GPUs: torchrun.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import rundir
from . import data as datasets
from . import models
from .ops.tser_loss import tser_loss

METHODS = ("tser", "ts", "skd", "ce")
# per data set: lr, weight decay, batch size, epochs
DEFAULTS = {
    "digits": dict(lr=0.05, weight_decay=5e-4, batch_size=64, epochs=15, arch="digits_snn", teacher="digits_ann"),
    "cifar10": dict(lr=0.1, weight_decay=5e-4, batch_size=128, epochs=300, arch="spiking_resnet19",
                    teacher="resnet19"),
    "cifar100": dict(lr=0.1, weight_decay=5e-4, batch_size=128, epochs=300, arch="spiking_resnet19",
                     teacher="resnet19"),
    "imagenet": dict(lr=0.2, weight_decay=1e-4, batch_size=256, epochs=100, arch="sew_resnet34",
                     teacher="resnet34"),
}
DIGITS_TEACHER_EPOCHS = 30


class UsageError(Exception):
    """Bad input found before anything was written: one line, exit code 2."""


class TooManyBadSteps(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastsnn.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--arch", help="student (or with --ann, teacher) name; default per data set")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(datasets.DATASETS)} (default digits)")
    g.add_argument("--data-dir", help="data location (CIFAR: torchvision's folder; ImageNet: train/ and val/)")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir when missing")
    g.add_argument("--ann", action="store_true", help="train an ANN (a teacher) with plain cross-entropy")
    g.add_argument("--imagenet-stem", action="store_true", help="7x7 stride-2 stem with max-pool for resnet18/34")
    g = p.add_argument_group("distillation (paper eq. 7-11)")
    g.add_argument("--method", default="tser", help=f"one of {', '.join(METHODS)} (ce: no teacher)")
    g.add_argument("--alpha", type=float, default=0.5, help="KL weight (default 0.5)")
    g.add_argument("--tau", type=float, default=5.0, help="distillation temperature (default 5)")
    g.add_argument("--lam", type=float, default=0.01, help="entropy weight for tser (default 0.01)")
    g.add_argument("--entropy-tau", type=float, help="entropy temperature (default: --tau)")
    g.add_argument("--ts-ce", action=argparse.BooleanOptionalAction, default=None,
                   help="per-timestep CE (ablation switch; default from --method)")
    g.add_argument("--ts-kl", action=argparse.BooleanOptionalAction, default=None,
                   help="per-timestep KL (ablation switch; default from --method)")
    g.add_argument("--teacher", help="teacher architecture (default: the student's counterpart)")
    g.add_argument("--teacher-weights", help="teacher state_dict or fastsnn.train checkpoint")
    g = p.add_argument_group("student neuron")
    g.add_argument("--T", type=int, default=4, help="timesteps (default 4)")
    g.add_argument("--neuron", default="lif", choices=("lif", "if"))
    g.add_argument("--lif-tau", type=float, default=2.0, help="membrane time constant (default 2)")
    g.add_argument("--surrogate", default="atan", help="atan (default), sigmoid, piecewise_quadratic or erf")
    g.add_argument("--detach-reset", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--sew-connect", default="ADD", choices=("ADD", "AND", "IAND"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch, split across ranks")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up before the cosine decay")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="for --method ce and --ann")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--autoaugment", action="store_true", help="CIFAR AutoAugment")
    g.add_argument("--cutout", type=int, default=0, help="CIFAR Cutout square side (0: off)")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--workers", type=int, help="DataLoader workers (default 0 for digits, else 8)")
    g.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"), help="autocast on CUDA")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0,
                   help="CPU intra-op threads (0: auto = 1 for the small digits models on the CPU unless "
                        "OMP_NUM_THREADS is set, so parallel runs do not oversubscribe the cores; else PyTorch's)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/<timestamp>); a folder that already holds a run "
                                 "is refused unless --resume continues it or --overwrite is given")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--resume", help="continue from a checkpoint (last.pt)")
    g.add_argument("--max-bad-steps", type=int, default=10, help="non-finite losses in a row before stopping")
    g.add_argument("--stop-after-epochs", type=int, default=0,
                   help="end this invocation after N epochs (a time-limited job); --resume continues the run")
    g.add_argument("--cache-dir", default=os.environ.get("FASTSNN_CACHE", os.path.expanduser("~/.cache/fastsnn")),
                   help="where the digits teacher is cached")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------------------------- setup

def _fill_defaults(args) -> None:
    if args.dataset not in datasets.DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(datasets.DATASETS)}, got {args.dataset!r}")
    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    d = DEFAULTS[args.dataset]
    for key in ("lr", "weight_decay", "batch_size", "epochs"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    if args.arch is None:
        args.arch = d["teacher"] if args.ann else d["arch"]
    if args.teacher is None:
        args.teacher = models.REGISTRY[args.arch].teacher or d["teacher"] if args.arch in models.REGISTRY else d["teacher"]
    if args.workers is None:
        args.workers = 0 if args.dataset == "digits" else 8
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.0 if args.dataset == "digits" else 5.0
    ts = {"tser": (True, True), "ts": (True, True), "skd": (False, False), "ce": (False, False)}[args.method]
    args.ts_ce = ts[0] if args.ts_ce is None else args.ts_ce
    args.ts_kl = ts[1] if args.ts_kl is None else args.ts_kl
    if args.method != "tser":
        args.lam = 0.0


def _validate(args, world: int) -> None:
    names = models.available()
    if args.ann:
        if args.arch not in names["teachers"]:
            raise UsageError(f"--arch with --ann must be a teacher: {', '.join(names['teachers'])}; got {args.arch!r}")
    elif args.arch not in names["students"]:
        raise UsageError(f"--arch must be one of {', '.join(names['students'])} (or a teacher with --ann); "
                         f"got {args.arch!r}")
    if not args.ann and args.method != "ce" and args.teacher not in names["teachers"]:
        raise UsageError(f"--teacher must be one of {', '.join(names['teachers'])}, got {args.teacher!r}")
    problem = datasets.check_data_dir(args.dataset, args.data_dir, args.download)
    if problem:
        raise UsageError(problem)
    from .ops.tser_loss import TAU_RANGE
    from .surrogate import SURROGATES

    if args.surrogate not in SURROGATES:
        raise UsageError(f"--surrogate must be one of {', '.join(SURROGATES)}, got {args.surrogate!r}")
    for name in ("alpha", "tau", "lam", "entropy_tau", "lif_tau", "lr", "weight_decay", "momentum",
                 "label_smoothing", "grad_clip", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    low, high = TAU_RANGE
    entropy_tau = args.tau if args.entropy_tau is None else args.entropy_tau
    for name, value, ok, rule in [
        ("--tau", args.tau, low <= args.tau <= high, f"in [{low}, {high}]"),
        ("--entropy-tau", entropy_tau, low <= entropy_tau <= high, f"in [{low}, {high}]"),
        ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)"),
        ("--workers", args.workers, args.workers >= 0, ">= 0"),
        ("--grad-clip", args.grad_clip, args.grad_clip >= 0, ">= 0 (0: off)"),
        ("--warmup-epochs", args.warmup_epochs, args.warmup_epochs >= 0, ">= 0"),
        ("--cutout", args.cutout, args.cutout >= 0, ">= 0"),
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"), ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--T", args.T, args.T >= 1, ">= 1"), ("--lr", args.lr, args.lr > 0, "> 0"),
        ("--alpha", args.alpha, 0 <= args.alpha <= 1, "in [0, 1]"), 
        ("--lam", args.lam, args.lam >= 0, ">= 0"), ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
        ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1, "in [0, 1)"),
        ("--save-every", args.save_every, args.save_every >= 0, ">= 0"),
        ("--max-bad-steps", args.max_bad_steps, args.max_bad_steps >= 1, ">= 1"),
        ("--threads", args.threads, args.threads >= 0, ">= 0"),
        ("--stop-after-epochs", args.stop_after_epochs, args.stop_after_epochs >= 0, ">= 0"),
        ("--lif-tau", args.lif_tau, args.lif_tau > 1, "> 1"),
    ]:
        if not ok:
            raise UsageError(f"{name} must be {rule}, got {value}")
    if args.label_smoothing and not (args.ann or args.method == "ce"):
        raise UsageError("--label-smoothing applies to --method ce and --ann only (the TSER loss has none)")
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available")
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f"--resume {args.resume}: no such file")
    if args.teacher_weights and not os.path.isfile(args.teacher_weights):
        raise UsageError(f"--teacher-weights {args.teacher_weights}: no such file")
    if not args.ann and args.method != "ce" and args.dataset != "digits" and not args.teacher_weights:
        raise UsageError(f"--method {args.method} on {args.dataset} needs --teacher-weights (train one with --ann)")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _distributed(args) -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    world = _world_size()
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, local_rank


def _set_threads(args, device) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and args.dataset == "digits" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # measured: 3 parallel default runs 73-99 s each with the default, 24 s with 1


def _device(args, local_rank: int) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _build_student(args, num_classes, in_channels):
    kw = dict(in_channels=in_channels)
    if args.imagenet_stem:
        kw["imagenet"] = True
    if args.ann:
        return models.create(args.arch, num_classes, **kw)
    return models.create(args.arch, num_classes, T=args.T, neuron=args.neuron, tau=args.lif_tau,
                         surrogate=args.surrogate, detach_reset=args.detach_reset, connect=args.sew_connect, **kw)


def _load_teacher(args, num_classes, in_channels, device, log):
    """The frozen teacher, its weights checked against the architecture before any training."""
    path = args.teacher_weights
    if path is None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            path = _cached_digits_teacher(args, log)
        if dist.is_initialized():
            dist.barrier()
            path = _cached_digits_teacher_path(args)
    state, header = ckpt.load_model_file(path, what="--teacher-weights", role="teacher", arch=args.teacher)
    saved_args = header.get("args", {})
    imagenet = bool(saved_args.get("imagenet_stem", False)) or args.dataset == "imagenet"
    has_imagenet_stem = "imagenet" in models.model_spec(args.teacher).stems
    teacher = models.create(args.teacher, num_classes, in_channels=in_channels,
                            **({"imagenet": True} if imagenet and has_imagenet_stem else {}))
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != num_classes:
        raise UsageError(f"--teacher-weights {path} has {fc.shape[0]} classes, but {args.dataset} has {num_classes}")
    try:
        teacher.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"--teacher-weights {path} does not fit --teacher {args.teacher}: "
                         f"{' '.join(first[:2])[:300]}") from None
    teacher.to(device).eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def _cached_digits_teacher_path(args) -> str:
    return os.path.join(args.cache_dir, f"digits_ann-seed{args.seed}.pt")


def _cached_digits_teacher(args, log) -> str:
    """The digits teacher for this seed, trained once into the cache; concurrent runs (the ablation, a
    user's parallel experiments) wait on one lock instead of training it side by side."""
    path = _cached_digits_teacher_path(args)
    os.makedirs(args.cache_dir, exist_ok=True)
    with rundir.RunLock(args.cache_dir, name=f".{os.path.basename(path)}.lock", wait=True):
        if os.path.isfile(path):
            log(f"teacher: reusing the cached digits teacher {path}")
            return path
        log(f"teacher: training a digits teacher ({DIGITS_TEACHER_EPOCHS} epochs), cached at {path}")
        run_dir = os.path.join(args.cache_dir, f"digits_ann-seed{args.seed}")
        code = main(["--ann", "--dataset", "digits", "--arch", "digits_ann", "--epochs", str(DIGITS_TEACHER_EPOCHS),
                     "--seed", str(args.seed), "--device", "cpu", "--out", run_dir, "--overwrite", "--quiet"],
                    _nested=True)
        if code != 0:
            raise RuntimeError("training the digits teacher failed")
        ckpt.save_atomic(ckpt.load(os.path.join(run_dir, "best.pt"), what="digits teacher"), path)
    return path


def _param_groups(model, weight_decay):
    """No weight decay on BN parameters and biases."""
    decay, no_decay = [], []
    for p_ in model.parameters():
        (no_decay if p_.dim() <= 1 else decay).append(p_)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(args, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------------------- the loop

def compute_loss(args, student_logits, teacher_logits, target):
    """The training loss and its terms {ce, kl, entropy} (detached fp32 scalars)."""
    if args.ann:
        loss = F.cross_entropy(student_logits.float(), target, label_smoothing=args.label_smoothing)
        zero = torch.zeros((), device=loss.device)
        return loss, {"ce": loss.detach(), "kl": zero, "entropy": zero}
    if args.method == "ce":
        loss = F.cross_entropy(student_logits.float().mean(0), target, label_smoothing=args.label_smoothing)
        zero = torch.zeros((), device=loss.device)
        return loss, {"ce": loss.detach(), "kl": zero, "entropy": zero}
    return tser_loss(student_logits, teacher_logits, target, alpha=args.alpha, tau=args.tau, lam=args.lam,
                     ts_ce=args.ts_ce, ts_kl=args.ts_kl, entropy_tau=args.entropy_tau, return_terms=True)


@torch.no_grad()
def evaluate(model, loader, device, args, world, *, spiking: bool):
    """Accuracy (%) of the time-mean logits (top-1 and top-5), of each timestep's logits, and the mean
    firing rate."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.float64)
    correct5 = torch.zeros((), device=device, dtype=torch.float64)
    per_t = torch.zeros(args.T if spiking else 1, device=device, dtype=torch.float64)
    total = torch.zeros((), device=device, dtype=torch.float64)
    recorder = models.record_firing_rates(model) if spiking else nullcontext(None)
    with recorder as rates:
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with _autocast(args, device):
                logits = model(images).float()
            if not spiking:
                logits = logits.unsqueeze(0)
            mean = logits.mean(0)
            correct += (mean.argmax(-1) == target).sum()
            top5 = mean.topk(min(5, mean.shape[-1]), dim=-1).indices
            correct5 += (top5 == target.unsqueeze(-1)).any(-1).sum()
            per_t += (logits.argmax(-1) == target).sum(-1)
            total += target.numel()
        firing = rates.mean() if spiking else float("nan")
    stats = torch.cat([correct.view(1), correct5.view(1), per_t, total.view(1)])
    if world > 1:
        dist.all_reduce(stats)
        if spiking:  # mean of the ranks' rates (each rank sees an equal share of the test set)
            f = torch.tensor([firing], device=device, dtype=torch.float64)
            dist.all_reduce(f)
            firing = float(f) / world
    total = float(stats[-1])
    model.train()
    return {"acc": 100.0 * float(stats[0]) / total, "acc5": 100.0 * float(stats[1]) / total,
            "per_timestep_acc": (100.0 * stats[2:-1] / total).tolist(), "firing_rate": firing}


def _autocast(args, device):
    if device.type != "cuda" or args.amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


class Progress:
    """A one-line progress bar on a terminal (a line every quarter of the epoch elsewhere)."""

    def __init__(self, total, prefix, enabled):
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.tty = sys.stderr.isatty()
        self.last_decile = 0

    def update(self, done, **fields):
        if not self.enabled:
            return
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if self.tty:
            width = 24
            filled = int(width * done / max(1, self.total))
            sys.stderr.write(f"\r{self.prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif 4 * done // max(1, self.total) > self.last_decile:
            self.last_decile = 4 * done // max(1, self.total)
            print(f"{self.prefix} {done}/{self.total} {text}", file=sys.stderr, flush=True)


def _make_loader(dataset, sampler, batch, args, device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0 and device.type == "cuda", drop_last=False)


def strict_json(obj):
    """obj with every non-finite float replaced by None, so that json.dumps(allow_nan=False) writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _json_line(row) -> str:
    return json.dumps(strict_json(row), allow_nan=False) + "\n"


def _write_plots(out, history, summary):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    for key in ("train_ce", "train_kl", "train_entropy"):
        ax1.plot(epochs, [h[key] for h in history], label=key.replace("train_", ""), alpha=0.7)
    ax1.set_xlabel("epoch"), ax1.legend(), ax1.set_title("training loss and terms")
    ax2.plot(epochs, [h["test_acc"] for h in history], label="test accuracy (time-mean)")
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train accuracy")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("%"), ax2.legend(), ax2.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    per_t = summary.get("per_timestep_acc") or []
    if per_t:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar([str(t + 1) for t in range(len(per_t))], per_t, color="tab:blue", label="timestep t alone")
        ax.axhline(summary["student_acc"], color="tab:red", label="time-mean logits")
        low = min(per_t + [summary["student_acc"]])
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set_xlabel("timestep"), ax.set_ylabel("test accuracy (%)"), ax.legend(loc="lower right")
        ax.set_title("per-timestep accuracy (paper Fig. 2)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "per_timestep_acc.png"), dpi=100)
        plt.close(fig)


def run(args, rank, world, local_rank, hold=None) -> dict:
    """One training run. ``hold(context_manager)`` keeps the run folder's lock for the caller's lifetime
    (main passes an ExitStack's enter_context); without it the lock is released when run returns."""
    if hold is None:
        with ExitStack() as held:
            return run(args, rank, world, local_rank, hold=held.enter_context)
    device = _device(args, local_rank)
    _set_threads(args, device)
    is_main = rank == 0
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    torch.manual_seed(args.seed + rank)
    if device.type == "cpu" and world == 1:
        torch.use_deterministic_algorithms(True, warn_only=True)

    spec = datasets.load(args.dataset, args.data_dir, download=args.download and is_main,
                         autoaugment=args.autoaugment, cutout=args.cutout)
    student = _build_student(args, spec.num_classes, spec.in_channels)
    teacher = None
    if not args.ann and args.method != "ce":
        teacher = _load_teacher(args, spec.num_classes, spec.in_channels, device, log)
    out = args.out
    if is_main:
        os.makedirs(out, exist_ok=True)
        hold(rundir.RunLock(out))

    student.to(device)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
    per_rank_batch = args.batch_size // world
    steps_per_epoch = math.ceil(len(spec.train) / args.batch_size)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(_param_groups(student, args.weight_decay), lr=args.lr, momentum=args.momentum,
                                    nesterov=False)
    else:
        optimizer = torch.optim.AdamW(_param_groups(student, args.weight_decay), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.amp == "fp16")

    start_epoch, start_step, best_acc, best_epoch, history = 0, 0, -1.0, None, []
    if args.resume:
        state = ckpt.check_training_checkpoint(ckpt.load(args.resume, what="--resume"), args.resume,
                                               what="--resume", role=_role(args), arch=args.arch)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        best_acc, best_epoch, history = state["best_acc"], state.get("best_epoch"), state["history"]
        ckpt.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        log(f"resumed from {args.resume}: epoch {start_epoch + 1}, step {start_step}")

    train_model = student
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    spiking = not args.ann
    teacher_acc = None
    test_loader = _make_loader(spec.test, datasets.EpochSampler(len(spec.test), seed=0, epoch=0, rank=rank,
                                                                world=world, shuffle=False),
                               per_rank_batch, args, device)
    if teacher is not None:
        teacher_acc = evaluate(teacher, test_loader, device, args, world, spiking=False)["acc"]
        log(f"teacher {args.teacher}: test accuracy {teacher_acc:.2f}%")

    def save(epoch, step_in_epoch, name="last.pt", extra_best=False):
        rng = [ckpt.rng_state()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not is_main:
            return
        state = {**ckpt.describe(role=_role(args), arch=args.arch), "model": student.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "step_in_epoch": step_in_epoch, "rng": rng, "args": vars(args), "best_acc": best_acc,
                 "best_epoch": best_epoch, "history": history, "arch": args.arch, "num_classes": spec.num_classes,
                 "in_channels": spec.in_channels, "dataset": args.dataset}
        ckpt.save_atomic(state, os.path.join(out, name))
        if extra_best:
            ckpt.save_atomic(state, os.path.join(out, "best.pt"))

    if is_main:  # the per-epoch log holds exactly the checkpoint's epochs, even after a kill between writes
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(_json_line(row) for row in history)

    train_sampler = datasets.EpochSampler(len(spec.train), seed=args.seed, epoch=start_epoch, rank=rank, world=world,
                                          global_batch=args.batch_size, drop_last=world > 1)
    loader = _make_loader(spec.train, train_sampler, per_rank_batch, args, device)
    bad_steps = 0
    last_epoch = args.epochs if not args.stop_after_epochs else min(args.epochs, start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        first_step = start_step if epoch == start_epoch else 0
        train_sampler.set_epoch(epoch, start=first_step * per_rank_batch)
        steps = first_step + len(loader)
        progress = Progress(steps, f"epoch {epoch + 1}/{args.epochs}", is_main and not args.quiet)
        sums = torch.zeros(6, device=device, dtype=torch.float64)  # loss, ce, kl, entropy, correct, seen
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        images_seen = 0
        train_model.train()
        for step, (images, target) in enumerate(loader, start=first_step):
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if args.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with _autocast(args, device):
                student_logits = train_model(images)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
            loss, terms = compute_loss(args, student_logits, teacher_logits, target)
            if not bool(torch.isfinite(loss.detach())):
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"epoch {epoch + 1} step {step + 1}: non-finite loss {float(loss.detach())}, step skipped "
                              f"({bad_steps} in a row)", RuntimeWarning, stacklevel=1)
                if bad_steps >= args.max_bad_steps:
                    raise TooManyBadSteps(
                        f"{bad_steps} non-finite losses in a row (--max-bad-steps {args.max_bad_steps}); stopped. "
                        f"The last good checkpoint in {out} is intact.")
                scheduler.step()
                continue
            bad_steps = 0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                mean_logits = student_logits.float().mean(0) if spiking else student_logits.float()
                batch = target.numel()
                sums += torch.stack([loss.detach().double() * batch, terms["ce"].double() * batch,
                                     terms["kl"].double() * batch, terms["entropy"].double() * batch,
                                     (mean_logits.argmax(-1) == target).sum().double(),
                                     torch.tensor(batch, device=device, dtype=torch.float64)])
            images_seen += target.numel()
            progress.update(step + 1, loss=float(loss.detach()), acc=100.0 * float(sums[4] / sums[5]),
                            img_s=images_seen * world / (time.perf_counter() - t0))
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
                save(epoch, step + 1)
        elapsed = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(sums)
        result = evaluate(student, test_loader, device, args, world, spiking=spiking)
        seen = max(1.0, float(sums[5]))
        row = {"epoch": epoch + 1, "train_loss": float(sums[0]) / seen, "train_ce": float(sums[1]) / seen,
               "train_kl": float(sums[2]) / seen, "train_entropy": float(sums[3]) / seen,
               "train_acc": 100.0 * float(sums[4]) / seen, "test_acc": result["acc"],
               "per_timestep_acc": result["per_timestep_acc"], "firing_rate": result["firing_rate"],
               "images_per_s": images_seen * world / max(elapsed, 1e-9),
               "peak_gpu_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
               "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed}
        history.append(row)
        improved = result["acc"] > best_acc
        if improved:
            best_acc, best_epoch = result["acc"], epoch + 1
        save(epoch + 1, 0, extra_best=improved)
        if is_main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(_json_line(row))
            log(_epoch_line(args, epoch, row))

    final = history[-1] if history else {}
    summary = {"student_acc": final.get("test_acc"), "teacher_acc": teacher_acc,
               "per_timestep_acc": final.get("per_timestep_acc"), "firing_rate": final.get("firing_rate"),
               "epochs": len(history), "method": "ann" if args.ann else args.method, "best_acc": best_acc,
               "best_epoch": best_epoch,
               "arch": args.arch, "teacher": None if teacher is None else args.teacher, "dataset": args.dataset,
               "T": None if args.ann else args.T, "world_size": world, "device": str(device)}
    if world > 1:
        checksum = torch.tensor([sum(float(p_.double().sum()) for p_ in student.parameters())], dtype=torch.float64)
        gathered = [None] * world
        dist.all_gather_object(gathered, float(checksum))
        summary["rank_param_checksums"] = gathered
    if is_main:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(strict_json(summary), f, indent=2, allow_nan=False)
        _write_plots(out, history, summary)
        log(f"done: {_role(args)} {summary['student_acc']:.2f}% after the last epoch, best {best_acc:.2f}% at epoch "
            f"{best_epoch} (best.pt)" + (f"; teacher {teacher_acc:.2f}%" if teacher_acc is not None else "")
            + f"; run directory {out}")
    return summary


def _epoch_line(args, epoch, row) -> str:
    """One line per epoch; the teacher stage (--ann) has no KL, entropy or firing rate to report."""
    head = f"{_role(args)} epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}"
    if not args.ann:
        head += f" (ce {row['train_ce']:.4f} kl {row['train_kl']:.4f} entropy {row['train_entropy']:.4f})"
    head += f" train {row['train_acc']:.2f}% test {row['test_acc']:.2f}%"
    if not args.ann:
        head += (f" per-timestep {' '.join(f'{a:.1f}' for a in row['per_timestep_acc'])}"
                 f" firing {row['firing_rate']:.4f}")
    return head + f" lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s"


def main(argv=None, _nested=False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    interrupted = False
    try:
        _fill_defaults(args)
        if args.resume and not _nested:
            _merge_resumed_args(args, argv)
        _validate(args, 1 if _nested else _world_size())
        _check_out(args, _nested)
        rank, world, local_rank = (0, 1, 0) if _nested else _distributed(args)
        with ExitStack() as held:  # the run folder's lock, taken once the inputs have all been checked
            run(args, rank, world, local_rank, hold=held.enter_context)
    except (UsageError, ckpt.CheckpointError, rundir.RunFolderError, datasets.DataError) as e:
        print(f"fastsnn.train: error: {e}", file=sys.stderr)
        return 2
    except TooManyBadSteps as e:
        print(f"fastsnn.train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _nested:
            raise
        interrupted = True
        last = os.path.join(args.out, "last.pt") if args.out else ""
        hint = (f"resume with: python -m fastsnn.train --resume {last}" if os.path.isfile(last)
                else "no checkpoint had been written yet")
        print(f"\nfastsnn.train: interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        if not _nested and dist.is_initialized():
            try:
                if not interrupted:  # every rank leaves together: no rank tears the group down under another
                    dist.barrier()
            finally:
                dist.destroy_process_group()
    return 0


def _check_out(args, nested: bool) -> None:
    """Resolve the default run folder (recorded in the checkpoint, so a resume continues there) and refuse
    one that cannot take this run, before anything is written."""
    if not args.out:
        args.out = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if not nested and int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 owns the folder
    resuming = bool(args.resume) and os.path.isdir(args.out) and os.path.samefile(
        os.path.dirname(os.path.abspath(args.resume)), args.out)
    problem = rundir.check(args.out, resuming=resuming, overwrite=args.overwrite)
    if problem:
        raise UsageError(problem)


def given_flags(argv) -> set[str]:
    """The destinations of the flags actually present in ``argv`` (``--no-ts-ce``, abbreviations and
    ``--flag=value`` included): the parser re-run with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _role(args) -> str:
    return "teacher" if args.ann else "student"


def _merge_resumed_args(args, argv) -> None:
    """A resumed run continues with its saved arguments; flags given now (other than --resume) win. Which
    flags were given is asked of argparse itself (a second parse that fills in no defaults)."""
    state = ckpt.check_training_checkpoint(ckpt.load(args.resume, what="--resume"), args.resume, what="--resume")
    saved = state["args"]
    given = given_flags(sys.argv[1:] if argv is None else argv)
    for key, value in saved.items():
        if key not in given and key not in ("resume", "stop_after_epochs", "quiet", "overwrite") \
                and hasattr(args, key):
            setattr(args, key, value)
    # the checkpoint must hold the model this invocation would build
    ckpt.check_training_checkpoint(state, args.resume, what="--resume", role=_role(args), arch=args.arch)


if __name__ == "__main__":
    sys.exit(main())
