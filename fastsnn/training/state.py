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
                  num_classes: int, in_channels: int) -> dict:
    return {**ckpt.describe(role=cfg.role, arch=cfg.arch), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg.saved(), "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "ranks": ranks,
            "best_acc": state.best_acc, "best_epoch": state.best_epoch, "history": state.history,
            "num_classes": num_classes, "in_channels": in_channels, "dataset": cfg.dataset}


def read(path: str, *, what: str = "--resume", role: str | None = None, arch: str | None = None) -> dict:
    """A whole training checkpoint of this role/architecture, loaded with ``weights_only=True``."""
    obj = ckpt.check_training_checkpoint(ckpt.load(path, what=what), path, what=what, role=role, arch=arch)
    missing = [k for k in ("optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "ranks", "history")
               if k not in obj]
    if missing:
        raise ckpt.CheckpointError(f"{what} {path}: incomplete checkpoint, missing {', '.join(missing)}")
    return obj


def restore(obj: dict, *, rank: int, world: int, model, optimizer, scheduler, scaler, device) -> TrainState:
    """Loads the tensors into the given objects and returns the state; the caller sets the RNG last."""
    model.load_state_dict(obj["model"])
    optimizer.load_state_dict(obj["optimizer"])
    scheduler.load_state_dict(obj["scheduler"])
    scaler.load_state_dict(obj["scaler"])
    ranks = obj["ranks"]
    if obj["step_in_epoch"] and len(ranks) != world:
        raise ckpt.CheckpointError(f"--resume: the checkpoint was written mid-epoch by {len(ranks)} ranks and "
                                   f"cannot continue on {world}; resume from an end-of-epoch checkpoint")
    mine = ranks[min(rank, len(ranks) - 1)]
    mid = bool(obj["step_in_epoch"])
    return TrainState(epoch=obj["epoch"], step_in_epoch=obj["step_in_epoch"], best_acc=obj["best_acc"],
                      best_epoch=obj["best_epoch"], history=list(obj["history"]),
                      sums=mine["sums"].to(device) if mid else zero_sums(device),
                      images_seen=mine["images_seen"] if mid else 0, elapsed=mine["elapsed"] if mid else 0.0,
                      rng=mine["rng"])
