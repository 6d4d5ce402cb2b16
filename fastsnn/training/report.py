"""What a run shows and leaves in its folder, refreshed every epoch.

``config.yaml`` (the resolved configuration; ``--config`` takes it back), ``metrics.jsonl`` (one strict-JSON
row per epoch: non-finite values are null), ``metrics.csv`` (the same rows), ``metrics.json`` (the summary,
``best_epoch`` included), ``curves.png`` and ``per_timestep_acc.png``, and TensorBoard event files under
``tensorboard/`` when the tensorboard package is installed. The per-epoch files are rewritten from the
checkpoint's history at the start of a run, so they always hold exactly the checkpoint's epochs, even after
a kill between two writes. Every file is written beside its target and renamed over it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile

from ..checkpoint import FILE_MODE, write_atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "metrics.json", "curves.png", "per_timestep_acc.png")


def strict_json(obj):
    """obj with every non-finite float replaced by None, so that json.dumps(allow_nan=False) writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_line(row: dict) -> str:
    return json.dumps(strict_json(row), allow_nan=False) + "\n"




def write_text(path: str, text: str) -> None:
    """``path`` holds ``text`` or its previous content, never a torn mix."""
    write_atomic(path, lambda f: f.write(text), binary=False)


def csv_text(history: list[dict]) -> str:
    """The rows as CSV; a list (per-timestep accuracy) becomes one column per entry."""
    flat = []
    for row in history:
        out = {}
        for key, value in strict_json(row).items():
            if isinstance(value, list):
                out.update({f"{key}_{i + 1}": v for i, v in enumerate(value)})
            else:
                out[key] = value
        flat.append(out)
    columns = list(dict.fromkeys(k for row in flat for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def epoch_line(role: str, spiking: bool, epochs: int, row: dict) -> str:
    """One line per epoch; the teacher stage (--ann) has no KL, entropy or firing rate to report."""
    head = f"{role} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}"
    if spiking:
        head += f" (ce {row['train_ce']:.4f} kl {row['train_kl']:.4f} entropy {row['train_entropy']:.4f})"
    head += f" train {row['train_acc']:.2f}%"
    if row.get("val_acc") is not None:
        head += f" val {row['val_acc']:.2f}%"
    head += f" test {row['test_acc']:.2f}%"
    if row.get("ema_test_acc") is not None:
        ema_val = row.get("ema_val_acc")
        head += (f" ema{'' if ema_val is None else f' val {ema_val:.2f}%'} test {row['ema_test_acc']:.2f}%")
    if spiking:
        head += f" per-timestep {' '.join(f'{a:.1f}' for a in row['per_timestep_acc'])}"
        if row.get("acc_at_t"):
            head += f" at-t {' '.join(f'{a:.1f}' for a in row['acc_at_t'])}"
        head += f" firing {row['firing_rate']:.4f}"
    return head + f" lr {row['lr']:.4g} {rate(row['images_per_s'])} img/s"


def rate(per_second: float) -> str:
    """A rate with the digits that matter: 4429, 12.5, 0.33 (a slow CPU run is not 0)."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Reporter:
    """The run folder's files and TensorBoard for the main rank; every method is a no-op elsewhere."""

    def __init__(self, out: str, *, enabled: bool, tensorboard: bool, log):
        self.out, self.enabled, self.log = out, enabled, log
        self.tensorboard = enabled and tensorboard
        self.writer = None

    def start(self, config_yaml: str, history: list[dict]) -> None:
        """Rewrites the files from `history` (a resumed run's epochs so far) and opens TensorBoard. On a resume,
        the last finished epoch may have been checkpointed but not logged (the run stopped in between): it is
        logged again, with TensorBoard told to drop any earlier event at or after that epoch (purge_step), so
        every epoch appears once."""
        if not self.enabled:
            return
        write_text(os.path.join(self.out, "config.yaml"), config_yaml)
        write_text(os.path.join(self.out, "metrics.jsonl"), "".join(json_line(r) for r in history))
        write_text(os.path.join(self.out, "metrics.csv"), csv_text(history) if history else "")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.log("note: tensorboard is not installed; no event files (pip install tensorboard)")
                return
            self.writer = SummaryWriter(os.path.join(self.out, "tensorboard"),
                                        purge_step=history[-1]["epoch"] if history else None)
            if history:
                self._log_scalars(history[-1])

    def epoch(self, row: dict, history: list[dict], summary: dict) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json_line(row))
        write_text(os.path.join(self.out, "metrics.csv"), csv_text(history))
        self.summary(summary)
        write_plots(self.out, history, summary)
        self._log_scalars(row)

    def _log_scalars(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and value is not None and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        for key in ("per_timestep_acc", "acc_at_t"):
            for t, acc in enumerate(row.get(key) or []):
                self.writer.add_scalar(f"{key}/t{t + 1}", acc, row["epoch"])
        self.writer.flush()

    def summary(self, summary: dict) -> None:
        if self.enabled:
            write_text(os.path.join(self.out, "metrics.json"),
                       json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over the epoch's steps (ETA, rate; lr and running loss as postfix) on stderr; on a
    terminal it redraws in place, elsewhere it prints a line at most every 30 s."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, unit="step", leave=True,
                dynamic_ncols=True, mininterval=0.1 if tty else 30.0, file=sys.stderr)


def write_plots(out: str, history: list[dict], summary: dict) -> None:
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
    _save(fig, out, "curves.png")
    per_t = summary.get("per_timestep_acc") or []
    if per_t and summary.get("student_acc") is not None:
        fig, ax = plt.subplots(figsize=(5, 4))
        labels = [str(t + 1) for t in range(len(per_t))]
        ax.bar(labels, per_t, color="tab:blue", label="timestep t alone")
        at_t = summary.get("acc_at_t") or []
        if len(at_t) == len(per_t):
            ax.plot(labels, at_t, color="tab:green", marker="o", label="mean of timesteps 1..t")
        ax.axhline(summary["student_acc"], color="tab:red", label="time-mean logits")
        low = min(per_t + at_t + [summary["student_acc"]])
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set_xlabel("timestep"), ax.set_ylabel("test accuracy (%)"), ax.legend(loc="lower right")
        ax.set_title("per-timestep accuracy (paper Fig. 2)")
        _save(fig, out, "per_timestep_acc.png")


def _save(fig, out, name):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=out)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, os.path.join(out, name))
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
