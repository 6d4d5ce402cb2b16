"""An op's arguments declared once, by name: the signature of its custom op (or of its autograd Function's
forward) is the declaration; setup_context reads the inputs by name and backward returns gradients by name,
so no code counts positions or pads gradient tuples with hand-counted Nones.

    ARGS = Args(_my_op_impl)                        # the custom op's Python signature, its schema
    a = ARGS.bind(inputs)                           # in setup_context: a.x, a.weight, ...
    return ARGS.grads(x=grad_x, weight=grad_w)      # in backward: None for every other argument
"""
from __future__ import annotations

import inspect


class Bound(dict):
    """An op's inputs by name (attribute access)."""
    __getattr__ = dict.__getitem__


class Args:
    def __init__(self, fn, skip: tuple = ("ctx",)):
        self.names = tuple(n for n in inspect.signature(fn).parameters if n not in skip)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._none = (None,) * len(self.names)

    def bind(self, inputs) -> Bound:
        """The inputs (setup_context's tuple, or forward's arguments) by name."""
        return Bound(zip(self.names, inputs))

    def grads(self, **by_name) -> tuple:
        """One gradient per argument, in order: those named, None for the rest. A name that is not an
        argument raises (a typo would otherwise drop a gradient)."""
        grads = list(self._none)
        for name, grad in by_name.items():
            grads[self._index[name]] = grad
        return tuple(grads)

    def returning(self, *names):
        """grads.returning("x", "weight")(gx, gw) == grads(x=gx, weight=gw), as a function built once: on an eager
        backward's path each call is one tuple display (grads' dictionary and loop cost a microsecond)."""
        slots = {self._index[n]: f"g{i}" for i, n in enumerate(names)}  # a name that is not an argument raises
        body = ", ".join(slots.get(k, "None") for k in range(len(self.names)))
        return eval(f"lambda {', '.join(slots.values())}: ({body},)")  # noqa: S307 - the text is built above

    def index(self, name: str) -> int:
        return self._index[name]

    def values(self, bound: Bound, names) -> tuple:
        return tuple(bound[n] for n in names)
