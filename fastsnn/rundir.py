"""Run folders that never lose data.

- A run refuses to start into a folder that already holds a run (a checkpoint or a metrics log) unless it
  resumes that run or ``--overwrite`` is given; a path that is a file or cannot be written is refused
  before anything is created.
- A run holds an exclusive lock on ``<run>/.lock`` for its whole life (``fcntl.flock``: released by the
  kernel however the process ends, SIGKILL included), taken before any other work (:func:`claim`), and the
  folder is checked again once it is held: of two runs started into one folder, the second is refused
  instead of overwriting the first's checkpoints, however long the first took to load its data or teacher.
- A run without ``--out`` gets a folder of its own, ``runs/<timestamp>`` (``-2``, ``-3``, ... when that is
  taken: the name is created atomically, so runs started in the same second never share one).
- ``--overwrite`` removes the previous run's files (:data:`OUTPUTS`) once the lock is held, before the new
  run writes anything, so nothing of it (TensorBoard events, evaluation reports) is left mixed in.
- A folder the run created and left empty (it stopped before writing anything) is removed again.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.json", "metrics.csv", "config.yaml")
# everything a run (and fastsnn.evaluate) writes into its folder: what --overwrite removes
OUTPUTS = RUN_FILES + ("curves.png", "per_timestep_acc.png", "tensorboard", "eval-*.json", ".tmp-*")
LOCK_NAME = ".lock"
DEFAULT_PARENT = "runs"


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
    ``wait=True`` waits for the first to finish (how concurrent runs share one cached teacher). With
    ``remove_if_unused`` the folder is removed on exit when it holds nothing but the lock (a run folder this
    process created, left before the run wrote anything)."""

    def __init__(self, out: str, *, name: str = LOCK_NAME, wait: bool = False, remove_if_unused: bool = False):
        self.folder = out
        self.path = os.path.join(out, name)
        self.wait = wait
        self.remove_if_unused = remove_if_unused
        self.fd = None

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
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
            if self.remove_if_unused and os.listdir(self.folder) == [os.path.basename(self.path)]:
                os.unlink(self.path)  # still held: a run that opened it meanwhile finds the folder gone
                os.rmdir(self.folder)
            os.close(self.fd)  # closing releases the lock; the file stays (unlinking would race a waiter)
            self.fd = None
        return False


def fresh_folder(parent: str = DEFAULT_PARENT) -> str:
    """A new folder ``<parent>/<timestamp>`` (``-2``, ``-3``, ... when taken), created atomically: two runs
    started in the same second get two folders."""
    os.makedirs(parent, exist_ok=True)
    base = os.path.join(parent, time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 10000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"{parent} holds 10000 runs named {os.path.basename(base)}*; give --out")


@contextlib.contextmanager
def claim(out: str | None, *, resuming: bool, overwrite: bool, log=print):
    """``with claim(out, ...) as folder:`` holds the run folder's lock, the folder checked again under it (a run
    that started into it since the first check is found now); ``out=None`` claims a fresh folder
    (:func:`fresh_folder`). With ``overwrite`` a previous run's files are removed. A folder created here and
    left holding nothing is removed on exit."""
    created = out is None or not os.path.exists(out)
    folder = fresh_folder() if out is None else out
    with RunLock(folder, remove_if_unused=created):
        problem = check(folder, resuming=resuming, overwrite=overwrite)
        if problem:
            raise RunFolderError(problem)
        if overwrite and not resuming:
            removed = remove_outputs(folder)
            if removed:
                log(f"--overwrite: removed the previous run's {', '.join(removed)} from {folder}")
        yield folder


def remove_outputs(out: str) -> list[str]:
    """Deletes what a previous run wrote into ``out`` (:data:`OUTPUTS`); other files are kept. Returns the
    names removed. Call it while holding the folder's lock."""
    removed = []
    for name in sorted(os.listdir(out)):
        if name != LOCK_NAME and any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUTS):
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(name)
    return removed


def remove_partial_writes(out: str) -> list[str]:
    """Deletes the temporary files a killed run left mid-write (``.tmp-*``: never a checkpoint, which is
    only ever renamed into place whole); call it while holding the folder's lock."""
    removed = []
    for name in os.listdir(out):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(out, name))
            removed.append(name)
    return removed
