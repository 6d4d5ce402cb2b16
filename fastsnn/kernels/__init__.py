"""Triton kernels and their launch helpers. No nn.Modules, no autograd here."""
from __future__ import annotations

from typing import NamedTuple


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1): block sizes."""
    return 1 << max(0, int(n) - 1).bit_length()


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Launch(NamedTuple):
    """A launch's arguments after its pointers, joined once per plan: the runtime scalars, then the constexprs in the
    kernel's order (positionally: a keyword each costs host time on every launch), and the options (num_warps),
    the only keywords left."""
    args: tuple
    options: dict


def launch(kernel, args: tuple, kw: dict) -> Launch:
    """The Launch of `kernel` with the runtime arguments `args` (after the pointers) and the constexprs and options
    `kw` (see positional)."""
    constexprs, options = positional(kernel, kw)
    return Launch((*args, *constexprs), options)


def positional(kernel, kw: dict) -> tuple[tuple, dict]:
    """A launch's keywords (constexprs and options) split, once per plan, into the constexprs in the kernel's
    parameter order (passed positionally after the runtime arguments: a keyword each costs host time on every
    launch) and the launch options, the only keywords left. The constexprs must be the kernel's last parameters."""
    names = kernel.arg_names
    values = {k: v for k, v in kw.items() if k not in LAUNCH_OPTIONS}
    trailing = names[min(names.index(k) for k in values):] if values else []
    if sorted(trailing) != sorted(values):
        raise ValueError(f"{kernel.fn.__name__}: the launch gives {sorted(values)}, which must be the kernel's "
                         f"last parameters {trailing}")
    return tuple(values[n] for n in trailing), {k: v for k, v in kw.items() if k in LAUNCH_OPTIONS}
