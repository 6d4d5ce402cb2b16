"""The training loop: the loss, one step, one epoch, the evaluation and the checkpoint writes."""
from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import checkpoint as ckpt
from .. import models
from ..ops.tser_loss import tser_loss
from .config import TrainConfig
from .report import Reporter, progress
from .setup import autocast
from .state import TrainState, to_checkpoint


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class Session:
    """Everything one run trains with; built by :func:`fastsnn.training.run.build_session`."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module          # the module whose state is saved
    train_model: torch.nn.Module    # the same, wrapped (DDP, torch.compile)
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    sampler: object
    loader: object
    test_loader: object
    val_loader: object              # None without a validation split (the test set then picks best.pt)
    per_rank_batch: int
    num_classes: int
    in_channels: int
    out: str
    reporter: Reporter
    log: Callable[[str], None]
    mix: object = None              # fastsnn.data.Mix: mixup/CutMix and soft targets, or None (class indices)
    ema: object = None              # fastsnn.training.ema.ModelEma of model, or None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_loss(cfg: TrainConfig, student_logits, teacher_logits, target):
    """The training loss and its terms {ce, kl, entropy} (detached fp32 scalars). target: class indices [B], or
    soft targets [B, C] (fastsnn.data.Mix: mixed and/or label-smoothed one-hots, which the CE term takes)."""
    if cfg.ann or cfg.method == "ce":
        logits = student_logits.float() if cfg.ann else student_logits.float().mean(0)
        smoothing = 0.0 if target.is_floating_point() else cfg.label_smoothing  # a soft target is smoothed already
        loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
        zero = torch.zeros((), device=loss.device)
        return loss, {"ce": loss.detach(), "kl": zero, "entropy": zero}
    return tser_loss(student_logits, teacher_logits, target, alpha=cfg.alpha, tau=cfg.kd_tau, lam=cfg.lam,
                     ts_ce=cfg.ts_ce, ts_kl=cfg.ts_kl, entropy_tau=cfg.entropy_tau, return_terms=True)


@torch.no_grad()
def evaluate(model, loader, device, cfg: TrainConfig, world: int = 1) -> dict:
    """Accuracy (%) of the time-mean logits (top-1 and top-5), of each timestep's logits alone
    (per_timestep_acc), of the running mean of the first t timesteps' logits for t = 1..T (acc_at_t: what a
    deployment at T = t would score, without retraining; its last entry is acc), and the mean firing rate (NaN
    for an ANN). The model's mode (train or eval) is left as it was: the teacher stays in eval mode."""
    was_training = model.training
    model.eval()
    spiking = cfg.spiking
    steps = cfg.T if spiking else 1
    # top1, top5, total, then per timestep: correct alone, correct with the running mean
    stats = torch.zeros(3 + 2 * steps, device=device, dtype=torch.float64)
    counts = torch.arange(1, steps + 1, device=device, dtype=torch.float32).view(-1, 1, 1)
    with (models.record_firing_rates(model) if spiking else nullcontext(None)) as rates:
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with autocast(cfg, device):
                logits = model(images).float()
            logits = logits if spiking else logits.unsqueeze(0)
            running = logits.cumsum(0) / counts  # [T, B, classes]: the mean of the first t timesteps' logits
            mean = running[-1]
            top5 = mean.topk(min(5, mean.shape[-1]), dim=-1).indices
            stats[0] += (mean.argmax(-1) == target).sum()
            stats[1] += (top5 == target.unsqueeze(-1)).any(-1).sum()
            stats[2] += target.numel()
            stats[3:3 + steps] += (logits.argmax(-1) == target).sum(-1)
            stats[3 + steps:] += (running.argmax(-1) == target).sum(-1)
        spikes = [sum(rates.sums.values()), sum(rates.counts.values())] if spiking else [0.0, 0.0]
    if world > 1:  # every image counted once (the ranks' shares have no padding): the sums are the whole set's
        dist.all_reduce(stats)
        spikes = torch.tensor(spikes, device=device, dtype=torch.float64)
        dist.all_reduce(spikes)
        spikes = spikes.tolist()
    firing = spikes[0] / spikes[1] if spiking and spikes[1] else float("nan")
    total = float(stats[2])
    model.train(was_training)
    return {"acc": 100.0 * float(stats[0]) / total, "acc5": 100.0 * float(stats[1]) / total,
            "per_timestep_acc": (100.0 * stats[3:3 + steps] / total).tolist(),
            "acc_at_t": (100.0 * stats[3 + steps:] / total).tolist(), "firing_rate": firing}


def save(s: Session, state: TrainState, *, best: bool = False) -> None:
    """last.pt (and best.pt) of the run, each written whole or not at all; every rank contributes its RNG
    states and running sums."""
    ranks = [dict(state.rank_part(), **({} if s.mix is None else {"mix": s.mix.state_dict()}))]
    if s.world > 1:
        gathered = [None] * s.world
        dist.all_gather_object(gathered, ranks[0])
        ranks = gathered
    if not s.is_main:
        return
    obj = to_checkpoint(state, cfg=s.cfg, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
                        scaler=s.scaler, ranks=ranks, num_classes=s.num_classes, in_channels=s.in_channels,
                        ema=s.ema)
    ckpt.save_atomic(obj, os.path.join(s.out, "last.pt"))
    if best:
        ckpt.save_atomic(obj, os.path.join(s.out, "best.pt"))


def train_step(s: Session, state: TrainState, images, target, bad_steps: int) -> tuple[float | None, int]:
    """One optimisation step; (loss, bad steps in a row). A non-finite loss skips the update with a warning."""
    cfg, device = s.cfg, s.device
    images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
    loss_target = target
    if s.mix is not None:  # mixed images (the teacher sees them too) and soft targets
        images, loss_target = s.mix(images, target)
    if cfg.channels_last:
        images = images.to(memory_format=torch.channels_last)
    with autocast(cfg, device):
        student_logits = s.train_model(images)
        teacher_logits = None
        if s.teacher is not None:
            with torch.no_grad():
                teacher_logits = s.teacher(images)
    loss, terms = compute_loss(cfg, student_logits, teacher_logits, loss_target)
    s.optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss.detach())):
        bad_steps += 1
        warnings.warn(f"step {state.step_in_epoch + 1} of epoch {state.epoch + 1}: non-finite loss "
                      f"{float(loss.detach())}, step skipped ({bad_steps} in a row)", RuntimeWarning, stacklevel=1)
        if bad_steps >= cfg.max_bad_steps:
            raise TooManyBadSteps(f"{bad_steps} non-finite losses in a row (--max-bad-steps {cfg.max_bad_steps}); "
                                  f"stopped. The last good checkpoint in {s.out} is intact.")
        s.scheduler.step()
        return None, bad_steps
    s.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    if s.ema is not None:
        s.ema.update(s.model)
    with torch.no_grad():
        mean_logits = student_logits.float().mean(0) if cfg.spiking else student_logits.float()
        batch = target.numel()
        state.sums += torch.stack([loss.detach().double() * batch, terms["ce"].double() * batch,
                                   terms["kl"].double() * batch, terms["entropy"].double() * batch,
                                   (mean_logits.argmax(-1) == target).sum().double(),
                                   torch.tensor(batch, device=device, dtype=torch.float64)])
    state.images_seen += batch
    return float(loss.detach()), 0


def train_epoch(s: Session, state: TrainState, epoch: int) -> dict:
    """Trains epoch ``epoch`` from ``state.step_in_epoch`` on; returns its metrics row."""
    cfg = s.cfg
    first = state.step_in_epoch
    s.sampler.set_epoch(epoch, start=first * s.per_rank_batch)
    steps = first + len(s.loader)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    bar = progress(steps, first, f"{cfg.role} epoch {epoch + 1}/{cfg.epochs}", s.is_main and not cfg.quiet)
    t0 = time.perf_counter() - state.elapsed  # a resumed epoch continues its clock
    bad_steps = 0
    s.train_model.train()
    with bar:
        for step, (images, target) in enumerate(s.loader, start=first):
            loss, bad_steps = train_step(s, state, images, target, bad_steps)
            state.step_in_epoch, state.elapsed = step + 1, time.perf_counter() - t0
            bar.update(1)
            if loss is not None and s.is_main and not cfg.quiet:
                acc = 100.0 * float(state.sums[4] / state.sums[5].clamp(min=1))
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.1f}", lr=f"{s.optimizer.param_groups[0]['lr']:.3g}",
                                refresh=False)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                save(s, state)
    return epoch_row(s, state, epoch)


def epoch_row(s: Session, state: TrainState, epoch: int) -> dict:
    sums = state.sums.clone()
    images = torch.tensor([state.images_seen], dtype=torch.float64, device=s.device)
    if s.world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(images)
    result = evaluate(s.model, s.test_loader, s.device, s.cfg, s.world)
    val = evaluate(s.model, s.val_loader, s.device, s.cfg, s.world)["acc"] if s.val_loader is not None else None
    ema = {}
    if s.ema is not None:  # the EMA weights, evaluated the same way
        ema_result = evaluate(s.ema.module, s.test_loader, s.device, s.cfg, s.world)
        ema = {"ema_test_acc": ema_result["acc"], "ema_test_acc5": ema_result["acc5"],
               "ema_acc_at_t": ema_result["acc_at_t"],
               "ema_val_acc": evaluate(s.ema.module, s.val_loader, s.device, s.cfg, s.world)["acc"]
               if s.val_loader is not None else None}
    seen = max(1.0, float(sums[5]))
    elapsed = max(state.elapsed, 1e-9)
    peak = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.type == "cuda" else None
    return {"epoch": epoch + 1, "train_loss": float(sums[0]) / seen, "train_ce": float(sums[1]) / seen,
            "train_kl": float(sums[2]) / seen, "train_entropy": float(sums[3]) / seen,
            "train_acc": 100.0 * float(sums[4]) / seen, "val_acc": val, "test_acc": result["acc"],
            "test_acc5": result["acc5"],
            "per_timestep_acc": result["per_timestep_acc"], "acc_at_t": result["acc_at_t"],
            "firing_rate": result["firing_rate"], "images_per_s": float(images[0]) / elapsed, "peak_gpu_mem_mb": peak,
            "lr": s.optimizer.param_groups[0]["lr"], "epoch_time_s": state.elapsed, **ema}


def selection(row: dict, on_validation: bool) -> tuple[float, str]:
    """(the accuracy best.pt is chosen on, "raw" or "ema": whose it is): the validation accuracy (else the test
    accuracy) of the raw weights, or of the EMA weights when the run keeps an EMA and it scores higher."""
    split = "val_acc" if on_validation else "test_acc"
    raw, ema = row[split], row.get("ema_" + split)
    return (ema, "ema") if ema is not None and ema > raw else (raw, "raw")
