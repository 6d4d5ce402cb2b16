"""Testing utilities shared by tests/ and bench/ (like torch.testing): counting what an op launches."""
from __future__ import annotations

import contextlib


# aten ops that launch no kernel: allocation without initialisation and metadata-only ops
_FREE_ATEN = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.detach.default", "aten.alias.default",
              "aten.lift_fresh.default", "aten.empty_like.default", "aten.new_empty.default",
              "aten.new_empty_strided.default"}


@contextlib.contextmanager
def count_launches():
    """Counts Triton kernel launches and aten ops that compute (views and bare allocations excluded) while
    the block runs: yields {"triton": [kernel names], "aten": [op names]}."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime.jit import KernelInterface

    counts = {"triton": [], "aten": []}
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def counted(*args, **kwargs):
            counts["triton"].append(getattr(kernel, "__name__", repr(kernel)))
            with _disable_current_modes():  # the interpreter's own host copies are not the op's
                return launch(*args, **kwargs)
        return counted

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func) not in _FREE_ATEN:
                counts["aten"].append(str(func))
            return func(*args, **(kwargs or {}))

    KernelInterface.__getitem__ = getitem
    try:
        with Mode():
            yield counts
    finally:
        KernelInterface.__getitem__ = original
