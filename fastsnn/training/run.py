"""One training run from a configuration, and the command-line entry point ``python -m fastsnn.train``."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from contextlib import ExitStack

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .. import data as datasets
from .. import rundir
from . import config as config_mod
from . import setup
from . import state as state_mod
from ..neuron import convert_sync_bn
from .config import TrainConfig, UsageError, augment_of, mix_of
from .ema import ModelEma
from .loop import Session, TooManyBadSteps, evaluate, save, selection, train_epoch
from .report import Reporter, epoch_line
from .teacher import load_teacher

PROG = "fastsnn.train"


def prepare(argv=None, world: int = 1) -> tuple[TrainConfig, list[str]]:
    """The validated configuration the command line asks for and, on --resume, the changes it makes to
    the saved one. Raises UsageError / CheckpointError / RunFolderError; writes nothing."""
    cfg, given = config_mod.parse(argv)
    changes = []
    if cfg.resume:
        changes = _merge_resume(cfg, given)
    config_mod.check_method_settings(cfg, given)
    config_mod.resolve(cfg)
    config_mod.validate(cfg, world)
    check_out(cfg)
    return cfg, changes


def _merge_resume(cfg: TrainConfig, given: set[str]) -> list[str]:
    config_mod.check_file("--resume", cfg.resume)
    requested_role = cfg.role if "ann" in given else None
    requested_arch = cfg.arch if "arch" in given else None
    obj = state_mod.read(cfg.resume, role=requested_role, arch=requested_arch)
    if "out" not in given:
        cfg.out = os.path.dirname(cfg.resume) or "."
    given = given - {"out"}
    saved = {k: v for k, v in config_mod.check_saved(obj["config"], f"--resume {cfg.resume}").items() if k != "out"}
    return config_mod.merge_resumed(cfg, saved, given, mid_epoch=bool(obj["step_in_epoch"]))


def check_out(cfg: TrainConfig) -> None:
    """Refuse a run folder that cannot take this run, before anything is written (it is checked again when
    the run takes its lock, see claim_out). Without --out the run gets a fresh folder under runs/ then."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 owns the folder
    if not cfg.out:
        problem = rundir.check(rundir.DEFAULT_PARENT, resuming=True, overwrite=False)
    else:
        problem = rundir.check(cfg.out, resuming=_resuming_in_place(cfg), overwrite=cfg.overwrite)
    if problem:
        raise UsageError(problem)


def _resuming_in_place(cfg: TrainConfig) -> bool:
    return bool(cfg.resume) and bool(cfg.out) and os.path.isdir(cfg.out) and os.path.samefile(
        os.path.dirname(os.path.abspath(cfg.resume)), cfg.out)


def claim_out(cfg: TrainConfig, rank: int, world: int, hold, log) -> None:
    """Rank 0 takes the run folder's lock (held through ``hold`` for the run's life) before any other work and
    checks the folder again under it; ``cfg.out`` becomes the folder (a fresh one without --out) on every rank.
    Raises RunFolderError on every rank when the folder is refused."""
    folder, problem = cfg.out, None
    if rank == 0:
        try:
            folder = hold(rundir.claim(cfg.out, resuming=_resuming_in_place(cfg), overwrite=cfg.overwrite, log=log))
        except rundir.RunFolderError as e:
            problem = str(e)
        else:
            for name in rundir.remove_partial_writes(folder):
                log(f"removed {name}, a partial write of an interrupted run")
    if world > 1:
        shared = [folder, problem]
        dist.broadcast_object_list(shared, src=0)
        folder, problem = shared
    if problem:
        raise rundir.RunFolderError(problem)
    cfg.out = folder


def build_session(cfg: TrainConfig, rank: int, world: int, local_rank: int, hold) -> Session:
    device = setup.device_for(cfg, local_rank)
    setup.set_threads(cfg, device)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu" and world == 1:
        torch.use_deterministic_algorithms(True, warn_only=True)
    spec = datasets.split_validation(datasets.load(cfg.dataset, cfg.data_dir, download=cfg.download and rank == 0,
                                                   augment=augment_of(cfg)), cfg.val_fraction)
    model = setup.build_model(cfg, spec.num_classes, spec.in_channels)
    teacher = None
    if cfg.uses_teacher:
        teacher = load_teacher(cfg, spec.num_classes, spec.in_channels, device, log, train_nested)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn:  # the student's fused BatchNorm + neuron ops (and an ANN's BatchNorms) across the ranks
        model = convert_sync_bn(model)
    ema = ModelEma(model, cfg.model_ema, cfg.model_ema_warmup) if cfg.model_ema else None
    per_rank_batch = cfg.batch_size // world
    sampler = datasets.EpochSampler(len(spec.train), seed=cfg.seed, epoch=0, rank=rank, world=world,
                                    global_batch=cfg.batch_size, drop_last=world > 1)
    steps_per_epoch = math.ceil(len(sampler) / per_rank_batch)
    optimizer, scheduler, scaler = setup.optimizer_for(cfg, model, device, steps_per_epoch)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
        if teacher is not None:  # the teacher too: it runs every step (inference only, no_grad, eval mode)
            teacher = torch.compile(teacher)
    reporter = hold(Reporter(cfg.out, enabled=rank == 0, tensorboard=cfg.tensorboard, log=log))
    return Session(cfg=cfg, rank=rank, world=world, device=device, model=model, train_model=train_model,
                   teacher=teacher, optimizer=optimizer, scheduler=scheduler, scaler=scaler, sampler=sampler,
                   loader=setup.loader_for(spec.train, sampler, per_rank_batch, cfg, device),
                   test_loader=setup.eval_loader(spec.test, cfg, device, rank, world),
                   val_loader=setup.eval_loader(spec.val, cfg, device, rank, world), per_rank_batch=per_rank_batch,
                   num_classes=spec.num_classes, in_channels=spec.in_channels, out=cfg.out, reporter=reporter,
                   log=log, mix=mix_of(cfg, spec.num_classes, rank), ema=ema)


def restore(s: Session, changes: list[str]) -> state_mod.TrainState:
    """The state to start from: fresh, or the --resume checkpoint's (RNG restored last)."""
    cfg = s.cfg
    if not cfg.resume:
        return state_mod.TrainState(sums=state_mod.zero_sums(s.device))
    obj = state_mod.read(cfg.resume, role=cfg.role, arch=cfg.arch)
    state = state_mod.restore(obj, rank=s.rank, world=s.world, model=s.model, optimizer=s.optimizer,
                              scheduler=s.scheduler, scaler=s.scaler, device=s.device, path=cfg.resume, ema=s.ema)
    if any(c.split()[0] in ("epochs", "batch_size") for c in changes):
        setup.align_schedule(s.scheduler, state.epoch * len(s.loader) + state.step_in_epoch)
    if s.mix is not None and state.mix is not None:  # mixup/CutMix's own generator, where this rank left it
        state_mod.loaded("--resume", cfg.resume, "mixup/CutMix generator state",
                         lambda: s.mix.load_state_dict(state.mix))
    state_mod.set_rng(state, cfg.resume)
    s.log(f"resumed from {cfg.resume}: epoch {state.epoch + 1}, step {state.step_in_epoch}"
          + (f"; changed: {', '.join(changes)}" if changes else ""))
    return state


def run(cfg: TrainConfig, rank: int = 0, world: int = 1, local_rank: int = 0, hold=None,
        changes: list[str] = ()) -> dict:
    """One training run of a validated configuration (see :func:`prepare`); returns the summary.
    ``hold(context_manager)`` keeps the run folder's lock for the caller's lifetime; without it the lock is
    released when run returns."""
    if hold is None:
        with ExitStack() as held:
            return run(cfg, rank, world, local_rank, held.enter_context, changes)
    claim_out(cfg, rank, world, hold, (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None))
    s = build_session(cfg, rank, world, local_rank, hold)
    state = restore(s, list(changes))
    teacher_acc = None
    if s.teacher is not None:
        teacher_acc = evaluate(s.teacher, s.test_loader, s.device, dataclasses.replace(cfg, ann=True),
                               world)["acc"]
        s.log(f"teacher {cfg.teacher}: test accuracy {teacher_acc:.2f}%")
    s.reporter.start(config_mod.to_yaml(cfg), state.history)
    last = cfg.epochs if not cfg.stop_after_epochs else min(cfg.epochs, state.epoch + cfg.stop_after_epochs)
    summary = _summary(s, state, teacher_acc)
    for epoch in range(state.epoch, last):
        row = train_epoch(s, state, epoch)
        acc, row["selected_model"] = selection(row, s.val_loader is not None)
        best = state.record_epoch(row, acc)
        save(s, state, best=best)
        summary = _summary(s, state, teacher_acc)
        s.reporter.epoch(row, state.history, summary)
        s.log(epoch_line(cfg.role, cfg.spiking, cfg.epochs, row))
    summary = _summary(s, state, teacher_acc, final=True)
    s.reporter.summary(summary)
    if state.history:
        s.log(f"done: {cfg.role} test accuracy {summary['student_acc']:.2f}% at epoch {state.best_epoch}, the best "
              f"on the {summary['selected_on']} set (best.pt); {summary['final_acc']:.2f}% after the last epoch "
              f"{len(state.history)}"
              + (f"; teacher {teacher_acc:.2f}%" if teacher_acc is not None else "") + f"; run directory {s.out}")
    return summary


def _summary(s: Session, state, teacher_acc, final: bool = False) -> dict:
    cfg = s.cfg
    last = state.history[-1] if state.history else {}
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    chosen = "ema_" if best.get("selected_model") == "ema" else ""  # best.pt's better weights: raw or the EMA's
    summary = {"student_acc": best.get(chosen + "test_acc"), "final_acc": last.get("test_acc"),
               "teacher_acc": teacher_acc, "best_model": best.get("selected_model") if s.ema is not None else None,
               "per_timestep_acc": best.get("per_timestep_acc"), "acc_at_t": best.get(chosen + "acc_at_t"),
               "firing_rate": best.get("firing_rate"),
               "epochs": len(state.history), "method": "ann" if cfg.ann else cfg.method, "best_acc": best.get(
                   "test_acc"), "best_epoch": state.best_epoch, "arch": cfg.arch,
               "teacher": cfg.teacher if s.teacher is not None else None, "dataset": cfg.dataset,
               "T": cfg.T if cfg.spiking else None, "world_size": s.world, "device": str(s.device),
               "selected_on": "validation" if s.val_loader is not None else "test",
               "val_acc": best.get(chosen + "val_acc"), "val_fraction": cfg.val_fraction}
    if s.ema is not None:
        summary.update(raw_acc=best.get("test_acc"), ema_acc=best.get("ema_test_acc"),
                       final_ema_acc=last.get("ema_test_acc"))
    if final and s.world > 1:
        checksum = float(sum(float(p.double().sum()) for p in s.model.parameters()))
        gathered = [None] * s.world
        dist.all_gather_object(gathered, checksum)
        summary["rank_param_checksums"] = gathered
    return summary


def train_nested(cfg: TrainConfig) -> int:
    """Trains ``cfg`` in this process (a bundled data set's cached teacher); 0 on success."""
    config_mod.resolve(cfg)
    config_mod.validate(cfg)
    check_out(cfg)
    run(cfg)
    return 0


def main(argv=None) -> int:
    cfg = None
    interrupted = False
    try:
        cfg, changes = prepare(argv, setup.world_size())
        rank, world, local_rank = setup.distributed(cfg)
        with ExitStack() as held:  # the run folder's lock, taken once the inputs have all been checked
            run(cfg, rank, world, local_rank, held.enter_context, changes)
    except (UsageError, ckpt.CheckpointError, rundir.RunFolderError, datasets.DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TooManyBadSteps as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        last = os.path.join(cfg.out, "last.pt") if cfg is not None and cfg.out else ""
        hint = (f"resume with: python -m fastsnn.train --resume {last}" if last and os.path.isfile(last)
                else "no checkpoint had been written yet")
        print(f"\n{PROG}: interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            try:
                if not interrupted:  # every rank leaves together: no rank tears the group down under another
                    dist.barrier()
            finally:
                dist.destroy_process_group()
    return 0
