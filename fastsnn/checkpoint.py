"""Checkpoints: never half-written, never unpickled beyond ``weights_only=True``, and self-describing.

Writing goes to a temporary file beside the target, is fsync'ed, then renamed over it, so a kill at any
moment leaves the previous checkpoint or the new one, never a torn file.

Reading uses ``torch.load(weights_only=True)``: only tensors and plain containers (dict, list, tuple, str,
int, float, bool, None) can come out of a file, so a crafted file cannot run code. Everything a training
checkpoint holds is therefore kept in those types, the random-number-generator states included.

Every checkpoint written by ``fastsnn.train`` carries ``format``/``version`` and the ``role`` (``"teacher"``
for an ANN, ``"student"`` for an SNN) and ``arch`` of its model; :func:`load_model_file` checks them, so a
student file given as a teacher, or a file of another architecture, is refused with one line.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile

import numpy as np
import torch

FORMAT = "fastsnn-checkpoint"
VERSION = 3  # 3: "config" (a TrainConfig dict) replaces "args"; running sums of a mid-epoch save
ROLES = ("teacher", "student")


class CheckpointError(ValueError):
    """A file that cannot be used as asked: missing, unreadable, truncated, foreign, or of the wrong role or
    architecture. The message is one line naming the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what torch.save(path) would have given (mkstemp's files are 0600)


def write_atomic(path: str, write, *, binary: bool = True, suffix: str = "", sync: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path`` (fsync'ed with ``sync``), then renamed over it: the
    file holds the old content or the new, never a torn mix, with the mode open() would have given."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    write_atomic(path, lambda f: torch.save(obj, f), suffix=".pt", sync=True)


def rng_state() -> dict:
    """The Python, NumPy, torch (and CUDA) generator states, in types ``weights_only`` loading accepts."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str, map_location="cpu", *, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``, with every way a file can be unusable turned into one
    :class:`CheckpointError` line that starts with ``what`` (e.g. ``"--resume"``) and the path."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path}: not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{what} {path}: refused: the file holds objects other than tensors and plain "
                              f"containers, and is only read with weights_only=True ({first})") from None
    except Exception as e:  # noqa: BLE001 - every way a foreign file fails to parse (struct.error, ...) is one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{what} {path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{reason}") from None


def describe(*, role: str, arch: str) -> dict:
    """The header every fastsnn checkpoint starts with."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {"format": FORMAT, "version": VERSION, "role": role, "arch": arch}


def is_fastsnn(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def check_training_checkpoint(obj, path: str, *, what: str, role: str | None = None,
                              arch: str | None = None) -> dict:
    """``obj`` (from :func:`load`) is a whole fastsnn.train checkpoint of this role/architecture."""
    if not is_fastsnn(obj):
        raise CheckpointError(f"{what} {path}: not a fastsnn.train checkpoint (no format header; files "
                              f"written before checkpoint format {VERSION} cannot be resumed)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{what} {path}: checkpoint format version {obj.get('version')!r}; this fastsnn "
                              f"reads version {VERSION}")
    missing = [k for k in ("model", "config", "arch", "role", "num_classes", "in_channels") if k not in obj]
    if missing:
        raise CheckpointError(f"{what} {path}: incomplete checkpoint, missing {', '.join(missing)}")
    _check_header(obj, path, what=what, role=role, arch=arch)
    return obj


def _check_header(obj: dict, path: str, *, what: str, role: str | None, arch: str | None) -> None:
    if role is not None and obj.get("role") != role:
        raise CheckpointError(f"{what} {path}: holds a {obj.get('role')} ({obj.get('arch')}), "
                              f"but a {role} is needed here")
    if arch is not None and obj.get("arch") != arch:
        raise CheckpointError(f"{what} {path}: holds the architecture {obj.get('arch')!r}, "
                              f"but {arch!r} is asked for")


def load_model_file(path: str, *, what: str, role: str, arch: str) -> tuple[dict, dict]:
    """The weights in ``path`` for a model of ``role``/``arch``, and the checkpoint's header (empty for a
    plain state_dict). A fastsnn checkpoint must match role and architecture; a plain state_dict (e.g.
    torchvision weights) or a ``{"state_dict": ...}`` file is accepted as is, to be checked by
    ``load_state_dict``."""
    obj = load(path, what=what)
    if is_fastsnn(obj):
        _check_header(obj, path, what=what, role=role, arch=arch)
        state, header = obj.get("model"), obj
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, header = obj["state_dict"], {}
    else:
        state, header = obj, {}
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{what} {path}: holds no model weights (expected a fastsnn checkpoint or a "
                              f"state_dict of named tensors)")
    return state, header
