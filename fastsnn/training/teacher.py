"""The frozen teacher: loaded from --teacher-weights (checked for role, architecture and class count before
any training), or on a bundled data set (digits, mnist5k) trained once per seed and validation split into a
cache shared by concurrent runs (its best epoch picked on the validation split)."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .. import models
from .. import rundir
from .config import BUNDLED_TEACHER_EPOCHS, DEFAULTS, TrainConfig, UsageError


def load_teacher(cfg: TrainConfig, num_classes: int, in_channels: int, device, log, train_fn) -> torch.nn.Module:
    """``train_fn(config) -> int`` trains a digits teacher when none is cached (the run entry point)."""
    path = cfg.teacher_weights
    if path is None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            path = cached_teacher(cfg, log, train_fn)
        if dist.is_initialized():
            dist.barrier()
            path = cached_teacher_path(cfg)
        try:
            state, header = ckpt.load_model_file(path, what="the cached teacher", role="teacher", arch=cfg.teacher)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{e}; delete it and the run trains a new {cfg.dataset} teacher") from None
    else:
        state, header = ckpt.load_model_file(path, what="--teacher-weights", role="teacher", arch=cfg.teacher)
    saved = header.get("config", {})
    imagenet = bool(saved.get("imagenet_stem", False)) or cfg.dataset == "imagenet"
    has_imagenet_stem = "imagenet" in models.model_spec(cfg.teacher).stems
    teacher = models.create(cfg.teacher, num_classes, in_channels=in_channels,
                            **({"imagenet": True} if imagenet and has_imagenet_stem else {}))
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != num_classes:
        raise UsageError(f"--teacher-weights {path} has {fc.shape[0]} classes, but {cfg.dataset} has {num_classes}")
    try:
        teacher.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"--teacher-weights {path} does not fit --teacher {cfg.teacher}: "
                         f"{' '.join(first[:2])[:300]}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def _cache_name(cfg: TrainConfig) -> str:
    return f"{DEFAULTS[cfg.dataset]['teacher']}-seed{cfg.seed}-val{cfg.val_fraction:g}"


def cached_teacher_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.cache_dir, _cache_name(cfg) + ".pt")


def teacher_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration that trains the cached teacher of ``cfg``'s bundled data set, seed and split."""
    return dataclasses.replace(
        TrainConfig(), ann=True, dataset=cfg.dataset, arch=DEFAULTS[cfg.dataset]["teacher"],
        epochs=BUNDLED_TEACHER_EPOCHS, seed=cfg.seed, val_fraction=cfg.val_fraction, device="cpu",
        out=os.path.join(cfg.cache_dir, _cache_name(cfg)), overwrite=True, quiet=True, cache_dir=cfg.cache_dir,
        threads=cfg.threads, tensorboard=False)


def cached_teacher(cfg: TrainConfig, log, train_fn) -> str:
    """The teacher for this data set, seed and split, trained once into the cache; concurrent runs (the
    ablation, a user's parallel experiments) wait on one lock instead of training it side by side."""
    path = cached_teacher_path(cfg)
    if os.path.isfile(path) and not os.access(cfg.cache_dir, os.W_OK):  # a read-only cache: no lock to take
        log(f"teacher: reusing the cached {cfg.dataset} teacher {path}")
        return path
    lock = rundir.RunLock(cfg.cache_dir, name=f".{os.path.basename(path)}.lock", wait=True)
    try:
        lock.__enter__()
    except OSError as e:
        raise UsageError(f"--cache-dir {cfg.cache_dir} (FASTSNN_CACHE) cannot be written ({e.strerror}): the "
                         f"{cfg.dataset} teacher is cached there; give a writable --cache-dir, or --teacher-weights"
                         ) from None
    try:
        if os.path.isfile(path):
            log(f"teacher: reusing the cached {cfg.dataset} teacher {path}")
            return path
        log(f"teacher: training a {cfg.dataset} teacher ({BUNDLED_TEACHER_EPOCHS} epochs), cached at {path}")
        sub = teacher_config(cfg)
        if train_fn(sub) != 0:
            raise RuntimeError(f"training the {cfg.dataset} teacher failed")
        ckpt.save_atomic(ckpt.load(os.path.join(sub.out, "best.pt"), what=f"{cfg.dataset} teacher"), path)
    finally:
        lock.__exit__(None, None, None)
    return path
