"""Building what a run needs from its configuration: the device and thread count, the process group, the
model, the optimizer and its schedule, the data loaders and autocast."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .. import data as datasets
from .. import models
from .config import TrainConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed(cfg: TrainConfig) -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    world = world_size()
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, local_rank


def device_for(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def set_threads(cfg: TrainConfig, device: torch.device) -> None:
    """--threads N wins; on the CPU the small models of the bundled data sets get one intra-op thread unless
    OMP_NUM_THREADS says otherwise (measured on 2 cores: three parallel default runs 73-99 s each with PyTorch's
    default, 24 s each with one thread; `pytest bench/test_bench_program.py --benchmark-only` times them)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and cfg.dataset in datasets.BUNDLED and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The student (or, with --ann, the teacher being trained) the configuration describes."""
    kw = dict(in_channels=in_channels)
    if cfg.imagenet_stem:
        kw["imagenet"] = True
    if cfg.ann:
        return models.create(cfg.arch, num_classes, **kw)
    return models.create(cfg.arch, num_classes, T=cfg.T, neuron=cfg.neuron, tau=cfg.membrane_tau,
                         v_threshold=cfg.v_threshold, v_reset=cfg.v_reset, surrogate=cfg.surrogate,
                         alpha=cfg.surrogate_alpha, detach_reset=cfg.detach_reset, connect=cfg.sew_connect,
                         recompute=cfg.recompute, **kw)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up then cosine decay, as a function of the global step."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_for(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, steps_per_epoch: int):
    """(optimizer, scheduler, scaler)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    return optimizer, scheduler, scaler


def align_schedule(scheduler, global_step: int) -> None:
    """After a resume whose --epochs or --batch-size changed the schedule: the step count the schedule sees
    is this run's, and the learning rate is the new schedule's at that step (unchanged flags: a no-op)."""
    scheduler.last_epoch = global_step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(global_step)


def loader_for(dataset, sampler, batch: int, cfg: TrainConfig, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0 and device.type == "cuda", drop_last=False)


def eval_loader(dataset, cfg: TrainConfig, device, rank: int, world: int):
    """This rank's share of an evaluation set (validation or test), in order."""
    if dataset is None:
        return None
    sampler = datasets.EpochSampler(len(dataset), seed=0, epoch=0, rank=rank, world=world, shuffle=False)
    return loader_for(dataset, sampler, cfg.batch_size // world, cfg, device)


def autocast(cfg: TrainConfig, device: torch.device):
    if device.type != "cuda" or cfg.amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
