"""The one place that decides which implementation runs an op, and the checks every op shares."""
from __future__ import annotations

import os

import torch

# Read once, at import: Triton decides interpreted vs compiled when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_RESOLVED: dict = {}  # (backend, device) -> the answer, once it has been given without an error


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Returns "triton" or "reference" for tensors on `device`.

    auto: compiled Triton on CUDA; on the CPU the Triton interpreter when TRITON_INTERPRET=1 was set
    before fastsnn was imported, else the PyTorch reference.
    """
    if not isinstance(backend, str):
        return _resolve(op, backend, device)  # raises the one-line error
    key = (backend, device)  # the device itself: reading device.type costs more than hashing it
    answer = _RESOLVED.get(key)
    if answer is None:
        answer = _RESOLVED[key] = _resolve(op, backend, device)
    return answer


def _resolve(op: str, backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    usable = (device.type == "cuda" or INTERPRET) and triton_available()
    if backend == "triton" and not usable:
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing fastsnn "
            f"to run the kernels on the CPU; got tensors on {device}"
        )
    return "triton" if usable else "reference"


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{op}: all tensors must be on one device; {named[0][0]} is on {device} but {name} is on {t.device}"
            )
    return device


def check_float_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_number(op: str, name: str, value, *, low: float | None = None, low_inclusive: bool = True,
                 high: float | None = None, rule: str = "") -> float:
    """A finite real number within [low, high] (or (low, ... when low_inclusive is False)."""
    # finite: value − value is 0 except for inf and nan (math.isfinite would stop torch.compile(dynamic=True),
    # which traces Python floats as symbols)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{op}: {name} must be {rule or 'a finite number'}, got {value!r}")
    return float(value)
