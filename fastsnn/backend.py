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


_RESOLVED: dict = {}  # (backend, device, dtype) -> the answer, once it has been given without an error


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Returns "triton" or "reference" for tensors on `device` (of `dtype`, when it decides).

    auto: compiled Triton on CUDA; on the CPU the Triton interpreter when TRITON_INTERPRET=1 was set
    before fastsnn was imported, else the PyTorch reference. The interpreter has no bfloat16 arithmetic
    (its results would be wrong): bf16 tensors on the CPU take the reference, and backend="triton" refuses them.
    """
    if not isinstance(backend, str):
        return _resolve(op, backend, device, dtype)  # raises the one-line error
    key = (backend, device, dtype)  # the device itself: reading device.type costs more than hashing it
    answer = _RESOLVED.get(key)
    if answer is None:
        answer = _RESOLVED[key] = _resolve(op, backend, device, dtype)
    return answer


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None) -> str:
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
    if usable and device.type != "cuda" and dtype == torch.bfloat16:  # the interpreter
        if backend == "triton":
            raise TypeError(f"{op}: bfloat16 tensors cannot run the kernels under Triton's interpreter "
                            f"(TRITON_INTERPRET=1, CPU tensors: it has no bfloat16 arithmetic); use float32 or "
                            f"float16, backend='reference', or CUDA tensors")
        return "reference"
    return "triton" if usable else "reference"


def interpreter_dtype(*tensors) -> torch.dtype | None:
    """The dtype resolve_backend needs for tensors on the CPU: bfloat16 when any of them is (None skipped), and
    only under the interpreter (the one place it decides)."""
    if INTERPRET:
        for t in tensors:
            if t is not None and t.dtype is torch.bfloat16:
                return torch.bfloat16
    return None


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
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {got}")


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



# Is Dynamo tracing? The ops' lru caches (validated specs, layout answers) are bypassed then: Dynamo would trace
# through a cache wrapper and warn that this may be silently incorrect. The cheapest of torch's answers: it sits
# on every op's host path.
tracing = torch.compiler.is_dynamo_compiling
