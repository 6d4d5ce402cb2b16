"""Run folders that never lose data.

- A run refuses to start into a folder that already holds a run (a checkpoint or a metrics log) unless it
  resumes that run or ``--overwrite`` is given; a path that is a file or cannot be written is refused
  before anything is created.
- A run holds an exclusive lock on ``<run>/.lock`` for its whole life (``fcntl.flock``: released by the
  kernel however the process ends, SIGKILL included), so a second run on the same folder is refused
  instead of interleaving its logs and overwriting the first run's checkpoints.
"""
from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.json", "metrics.csv", "config.yaml")
LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message is one line naming it."""


def holds_run(out: str) -> bool:
    return os.path.isdir(out) and any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check(out: str, *, resuming: bool, overwrite: bool, flag: str = "--out") -> str | None:
    """Why ``out`` cannot take this run (one line), or None. Creates nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"{flag} {out} is a file, not a folder"
    existing = _nearest_existing(out)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {out} cannot be created or written ({existing} is not a writable folder)"
    if holds_run(out) and not resuming and not overwrite:
        return (f"{flag} {out} already holds a run; continue it with --resume {os.path.join(out, 'last.pt')}, "
                f"start over with --overwrite, or choose another {flag}")
    return None


class RunLock:
    """``with RunLock(out):`` holds the folder's lock; a second holder gets :class:`RunFolderError`, or with
    ``wait=True`` waits for the first to finish (how concurrent runs share one cached teacher)."""

    def __init__(self, out: str, *, name: str = LOCK_NAME, wait: bool = False):
        self.path = os.path.join(out, name)
        self.wait = wait
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(f"{os.path.dirname(self.path)} is in use by another run (pid {holder}); "
                                     f"wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays (unlinking would race a waiter)
            self.fd = None
        return False


def remove_partial_writes(out: str) -> list[str]:
    """Deletes the temporary files a killed run left mid-write (``.tmp-*``: never a checkpoint, which is
    only ever renamed into place whole); call it while holding the folder's lock."""
    removed = []
    for name in os.listdir(out):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(out, name))
            removed.append(name)
    return removed
