"""The training state and the one place that knows a training checkpoint's keys.

A checkpoint is :func:`fastsnn.checkpoint.describe`'s header (format, version, role, arch) plus the keys
below, every value a tensor or a plain container so that it loads with ``weights_only=True``:

========================  =====================================================================
``model``                 the student's (or, with --ann, the teacher's) state_dict
``optimizer``             optimizer, ``scheduler``, ``scaler`` state_dicts
``config``                the run's :class:`~fastsnn.training.config.TrainConfig` (controls left out)
``epoch``                 epochs finished; ``step_in_epoch``: steps of the next epoch already taken
``ranks``                 per rank: RNG states and the epoch's running sums so far (a resumed epoch's
                          metrics row equals the uninterrupted one)
``best_acc``              best test accuracy and its ``best_epoch``; ``history``: one row per epoch
``num_classes``           ``in_channels``, ``dataset``: what the model was built for
========================  =====================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import checkpoint as ckpt

SUMS = ("loss", "ce", "kl", "entropy", "correct", "seen")  # the running sums of an epoch, in this order


def zero_sums(device="cpu") -> torch.Tensor:
    return torch.zeros(len(SUMS), device=device, dtype=torch.float64)


@dataclass
class TrainState:
    """Where a run is: everything besides the model/optimizer tensors that a resume must restore."""
    epoch: int = 0
    step_in_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    # this rank's running sums of the current epoch, and its images and seconds so far
    sums: torch.Tensor = field(default_factory=zero_sums)
    images_seen: int = 0
    elapsed: float = 0.0
    rng: dict | None = None  # this rank's generator states, restored at resume
    mix: dict | None = None  # this rank's mixup/CutMix generator state (fastsnn.data.Mix), restored at resume

    def rank_part(self) -> dict:
        return {"rng": ckpt.rng_state(), "sums": self.sums.detach().cpu().clone(), "images_seen": self.images_seen,
                "elapsed": float(self.elapsed)}

    def record_epoch(self, row: dict, acc: float) -> bool:
        """Appends the epoch's row; True when it is the best so far (ties keep the earlier epoch)."""
        self.history.append(row)
        self.epoch, self.step_in_epoch = row["epoch"], 0
        self.sums, self.images_seen, self.elapsed = zero_sums(self.sums.device), 0, 0.0
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, row["epoch"]
            return True
        return False


def to_checkpoint(state: TrainState, *, cfg, model, optimizer, scheduler, scaler, ranks: list[dict],
                  num_classes: int, in_channels: int, ema=None) -> dict:
    return {**ckpt.describe(role=cfg.role, arch=cfg.arch), "model": model.state_dict(),
            **({} if ema is None else {"model_ema": ema.state_dict()}),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg.saved(), "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "ranks": ranks,
            "best_acc": state.best_acc, "best_epoch": state.best_epoch, "history": state.history,
            "num_classes": num_classes, "in_channels": in_channels, "dataset": cfg.dataset}


def read(path: str, *, what: str = "--resume", role: str | None = None, arch: str | None = None) -> dict:
    """A whole training checkpoint of this role/architecture, loaded with ``weights_only=True``."""
    obj = ckpt.check_training_checkpoint(ckpt.load(path, what=what), path, what=what, role=role, arch=arch)
    missing = [k for k in ("optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "ranks", "history",
                           "best_acc", "best_epoch") if k not in obj]
    if missing:
        raise ckpt.CheckpointError(f"{what} {path}: incomplete checkpoint, missing {', '.join(missing)}")
    problem = _structure_problem(obj)
    if problem:
        raise ckpt.CheckpointError(f"{what} {path}: not a checkpoint fastsnn.train wrote: {problem}")
    return obj


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _structure_problem(obj: dict) -> str | None:
    """What in a training checkpoint has the wrong type or shape (the keys' values as to_checkpoint writes
    them), or None."""
    model = obj["model"]
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return "model is not a state_dict of named tensors"
    ema = obj.get("model_ema")
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("module"), dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ema["module"].items())
            and _is_int(ema.get("updates"))):
        return "model_ema is not {module: a state_dict of named tensors, updates: an integer >= 0}"
    for key in ("optimizer", "scheduler", "scaler"):
        if not isinstance(obj[key], dict):
            return f"{key} is not a state_dict"
    if not all(_is_number(v) for v in obj["scaler"].values()):  # GradScaler's state: numbers (none when disabled)
        return "scaler holds values that are not numbers"
    for key in ("num_classes", "in_channels"):
        if not _is_int(obj[key], 1):
            return f"{key} is {obj[key]!r}, not a count >= 1"
    for key in ("epoch", "step_in_epoch"):
        if not _is_int(obj[key]):
            return f"{key} is {obj[key]!r}, not an integer >= 0"
    if not _is_number(obj["best_acc"]) or not (obj["best_epoch"] is None or _is_int(obj["best_epoch"], 1)):
        return "best_acc/best_epoch are not a number and an epoch"
    if not isinstance(obj["history"], list) or len(obj["history"]) != obj["epoch"] or not all(
            isinstance(row, dict) and _is_int(row.get("epoch"), 1) for row in obj["history"]):
        return f"history is not {obj['epoch']} rows of epoch metrics"
    ranks = obj["ranks"]
    if not isinstance(ranks, list) or not ranks:
        return "ranks is not a non-empty list"
    for part in ranks:
        if not isinstance(part, dict) or not isinstance(part.get("rng"), dict) or not _is_int(
                part.get("images_seen")) or not _is_number(part.get("elapsed")):
            return "ranks holds an entry without rng, images_seen and elapsed"
        sums = part.get("sums")
        if not isinstance(sums, torch.Tensor) or sums.shape != (len(SUMS),) or not sums.is_floating_point():
            return f"a rank's running sums are not {len(SUMS)} numbers"
    return None


def loaded(what: str, path: str, part: str, load) -> None:
    """load(), a CheckpointError line naming the part of the checkpoint that does not fit."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ckpt.CheckpointError(f"{what} {path}: its {part} does not fit this run ({reason})") from None


def restore(obj: dict, *, rank: int, world: int, model, optimizer, scheduler, scaler, device, path: str,
            what: str = "--resume", ema=None) -> TrainState:
    """Loads the tensors into the given objects and returns the state; the caller sets the RNG last
    (:func:`set_rng`). A part that does not fit is one CheckpointError line."""
    loaded(what, path, "model", lambda: model.load_state_dict(obj["model"]))
    if ema is not None:
        if "model_ema" not in obj:
            raise ckpt.CheckpointError(f"{what} {path}: the run keeps a weight EMA (--model-ema) but the checkpoint "
                                       f"holds none")
        loaded(what, path, "weight EMA", lambda: ema.load_state_dict(obj["model_ema"]))
    loaded(what, path, "optimizer state", lambda: optimizer.load_state_dict(obj["optimizer"]))
    loaded(what, path, "scheduler state", lambda: scheduler.load_state_dict(obj["scheduler"]))
    loaded(what, path, "gradient scaler state", lambda: scaler.load_state_dict(obj["scaler"]))
    ranks = obj["ranks"]
    if obj["step_in_epoch"] and len(ranks) != world:
        raise ckpt.CheckpointError(f"{what}: the checkpoint was written mid-epoch by {len(ranks)} ranks and "
                                   f"cannot continue on {world}; resume from an end-of-epoch checkpoint")
    mine = ranks[min(rank, len(ranks) - 1)]
    mid = bool(obj["step_in_epoch"])
    return TrainState(epoch=obj["epoch"], step_in_epoch=obj["step_in_epoch"], best_acc=obj["best_acc"],
                      best_epoch=obj["best_epoch"], history=list(obj["history"]),
                      sums=mine["sums"].to(device, torch.float64) if mid else zero_sums(device),
                      images_seen=mine["images_seen"] if mid else 0, elapsed=mine["elapsed"] if mid else 0.0,
                      rng=mine["rng"], mix=mine.get("mix"))


def set_rng(state: TrainState, path: str, what: str = "--resume") -> None:
    """The resumed rank's generator states, restored (last, after everything that draws from them)."""
    loaded(what, path, "random generator state", lambda: ckpt.set_rng_state(state.rng))
