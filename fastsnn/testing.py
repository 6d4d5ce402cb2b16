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


def fma32(a, b, c):
    """RN32(a·b + c) rounded once, elementwise over fp32 numpy arrays (broadcast): the GPU's fused multiply-add.

    a·b is exact in fp64 (24 + 24 significant bits) and TwoSum gives the exact error e of s = RN64(a·b + c);
    RN32(s) is then RN32(a·b + c) except when s is an fp32 midpoint and e ≠ 0 (double rounding), where the
    neighbour on e's side is the answer."""
    import numpy as np

    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.float32) for v in (a, b, c)))
    with np.errstate(invalid="ignore", over="ignore"):  # inf and nan operands give inf and nan, as on a GPU
        p = a.astype(np.float64) * b.astype(np.float64)
        c64 = c.astype(np.float64)
        s = p + c64
        s_minus_c = s - c64
        e = (p - s_minus_c) + (c64 - (s - s_minus_c))
        r = s.astype(np.float32)
        neighbour = np.nextafter(r, np.where(e > 0, np.float32(np.inf), np.float32(-np.inf)))
        midpoint = (r.astype(np.float64) + neighbour.astype(np.float64)) / 2  # exact: one bit more than fp32
        wrong = np.isfinite(s) & (e != 0) & (s == midpoint)
    return np.where(wrong, neighbour, r)


@contextlib.contextmanager
def gpu_arithmetic():
    """While the block runs, Triton's interpreter computes as a GPU does where fastsnn's kernels differ: tl.fma
    on fp32 rounds once (the interpreter's rounds the product, then the sum), and the launchers' DIVIDE
    constexpr is the GPU's (DIVIDE_FMA; they pick div_rn for CPU tensors because of the interpreter's fma).
    So the code path that runs on CUDA runs, with CUDA's rounding, on the CPU."""
    from triton.runtime import interpreter
    from triton.runtime.jit import KernelInterface

    from .kernels.neuron import DIVIDE_FMA

    original_fma, original_getitem = interpreter.InterpreterBuilder.create_fma, KernelInterface.__getitem__

    def create_fma(builder, x, y, z):
        if z.dtype.scalar.primitive_bitwidth != 32 or not z.dtype.scalar.is_floating():
            return original_fma(builder, x, y, z)
        return interpreter.TensorHandle(fma32(x.data, y.data, z.data), z.dtype.scalar)

    def getitem(kernel, grid):
        launch = original_getitem(kernel, grid)

        def gpu_launch(*args, **kwargs):
            if "DIVIDE" in kwargs:  # (MULTIPLY stays the interpreter's: it rounds a product once, as mul.rn does)
                kwargs["DIVIDE"] = DIVIDE_FMA.value
            return launch(*args, **kwargs)
        return gpu_launch

    interpreter.InterpreterBuilder.create_fma, KernelInterface.__getitem__ = create_fma, getitem
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_fma, KernelInterface.__getitem__ = original_fma, original_getitem
