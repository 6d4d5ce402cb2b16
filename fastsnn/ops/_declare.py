"""Each op declared once; its eager autograd Function and its torch.library custom ops are derived from it.

An op is a forward (a Python function whose annotated signature is the op's schema: the tensors first, then
the settings), the formula that saves what its backward needs, and a backward (another annotated function);
`Op` builds from these

- the custom ops ``fastsnn::<name>`` and ``fastsnn::<name>_backward`` with their fake kernels, and the autograd
  formula of the first (for torch.compile, which traces the formula and calls the backward op);
- an eager ``torch.autograd.Function`` (the least host time per call) running the same forward, the same
  saving formula and the same backward formula, with the backward called as a plain function;

so both paths share one body for each of the four parts, and arguments and gradients are handled by name:

    ARGS = Args(forward)                             # the forward's signature, the op's schema
    a = ARGS.bind(inputs)                            # a.x, a.weight, ...
    return ARGS.grads(x=grad_x, weight=grad_w)       # None for every other argument

An op with no backward (statistics that mutate running buffers, a recompute) is an `Op` too: called eagerly it is
the plain function, compiled it is the custom op.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import os
import typing
from typing import Callable

import torch

from ._autograd import refused


def ops_source_tag(folder: str = os.path.dirname(__file__)) -> str:
    """A tag naming the ops' source (the files of fastsnn/ops: forwards, fakes, formulas): "fastsnn-ops-<hash>"."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return f"fastsnn-ops-{digest.hexdigest()[:16]}"


def tag_compile_caches(tag: str | None = None) -> str:
    """Adds the ops' source tag to torch.compiler.config.cache_key_tag (after a tag the user set), so that the
    Inductor and AOTAutograd caches never serve a graph compiled with another version of these ops: their keys
    cover a graph's code, not the fake kernels of the custom ops it calls, and a graph compiled against older
    fakes keeps their output layouts (a stride assertion fails at run time). Returns the tag in force."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):  # an older torch: nothing to add it to
        return ""
    tag = tag or ops_source_tag()
    current = config.cache_key_tag or ""
    if tag not in current:
        config.cache_key_tag = f"{current}+{tag}" if current else tag
    return config.cache_key_tag


tag_compile_caches()


class Args:
    def __init__(self, fn, skip: tuple = ("ctx",)):
        self.names = tuple(n for n in inspect.signature(fn).parameters if n not in skip)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._none = (None,) * len(self.names)
        self._bound = collections.namedtuple("Inputs", self.names)._make  # attribute reads at C speed

    def bind(self, inputs):
        """The inputs (setup_context's tuple, or forward's arguments) as a named tuple: a.x, a.weight, ..."""
        return self._bound(inputs)

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

    def span(self, first: str, last: str) -> slice:
        """The arguments from `first` to `last` (inclusive) as a slice of the bound inputs, found once by name."""
        return slice(self._index[first], self._index[last] + 1)

    def index(self, name: str) -> int:
        return self._index[name]

    def values(self, bound, names) -> tuple:
        return tuple(getattr(bound, n) for n in names)


def _absent_as_empty(fn: Callable) -> Callable:
    """fn (a forward or its fake) with every None among its outputs replaced by an empty fp32 tensor on the first
    tensor argument's device: a custom op returns tensors only (an eager call keeps the None)."""
    def op_body(*args):
        outputs = fn(*args)
        if not isinstance(outputs, tuple) or None not in outputs:
            return outputs
        like = next(a for a in args if isinstance(a, torch.Tensor))
        return tuple(like.new_empty(0, dtype=torch.float32) if o is None else o for o in outputs)
    return op_body


class Op:
    """One op, declared once (see the module docstring).

    forward(*args): the op's outputs (a tensor or a tuple; None stands for an absent output: the custom op
        returns an empty fp32 tensor there). Its annotations are the custom op's schema.
    fake(*args): the outputs' shapes, strides and dtypes (meta/fake tensors).
    save(ctx, a, outputs): saves what the backward needs (ctx.save_for_backward, attributes on ctx), marks the
        outputs that have no gradient; a is the inputs by name, outputs as forward returned them (None or an
        empty tensor for an absent one).
    backward(*args), backward_fake(*args): the backward op, annotated as forward.
    formula(ctx, backward, *grad_outputs): one gradient per forward argument (Args.grads or Args.returning),
        calling backward(...) for the work: the plain function on the eager path, the custom op when compiled
        (which returns an empty tensor for an absent gradient: the formula keeps only those it asked for).
    internal: how many of the last outputs are for the backward only (saved, not returned by the eager Function).
    mutates_args: the arguments a forward-only op writes to (no backward then).
    label: the name errors give the op (the public function's), default `name`.
    materialize_grads: False (the default) passes None (eager) for an output that got no gradient, instead of a
        tensor of zeros (one more kernel).
    """

    def __init__(self, name: str, forward: Callable, *, fake: Callable, save: Callable | None = None,
                 backward: Callable | None = None, backward_fake: Callable | None = None,
                 formula: Callable | None = None, mutates_args: tuple = (), materialize_grads: bool = False,
                 internal: int = 0, label: str | None = None):
        self.name, self.forward = name, forward
        self.args = Args(forward)
        schema = torch.library.infer_schema(forward, mutates_args=mutates_args)
        self.op = torch.library.custom_op(f"fastsnn::{name}", _absent_as_empty(forward), mutates_args=mutates_args,
                                          schema=schema)
        self.op.register_fake(_absent_as_empty(fake))
        if backward is None:
            self.Function = None
            return
        self.backward = backward
        self.backward_op = torch.library.custom_op(
            f"fastsnn::{name}_backward", _absent_as_empty(backward), mutates_args=(),
            schema=torch.library.infer_schema(backward, mutates_args=()))
        self.backward_op.register_fake(_absent_as_empty(backward_fake))
        args, backward_op = self.args, self.backward_op

        def setup_context(ctx, inputs, output):
            save(ctx, args.bind(inputs), output)

        def compiled_backward(ctx, *grad_outputs):
            return formula(ctx, backward_op, *grad_outputs)

        self.op.register_autograd(compiled_backward, setup_context=setup_context)
        self._tensors = _tensor_count(forward)
        outputs = typing.get_type_hints(forward)["return"]
        public = (len(typing.get_args(outputs)) if typing.get_origin(outputs) is tuple else 1) - internal
        self.Function = _eager_function(label or name, forward, args, save, backward, formula, materialize_grads,
                                        self._tensors, public, public + internal)

    def __call__(self, *args):
        """The forward through autograd: the eager Function, or the custom op when torch.compile traces."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        if self.Function is None:
            return self.forward(*args)
        n = self._tensors
        return self.Function.apply(*args[:n], args[n:])  # a tuple: see _eager_function


def _tensor_count(fn: Callable) -> int:
    """How many of fn's leading parameters are tensors (annotated Tensor or Optional[Tensor]); the rest are
    settings, which must all follow them."""
    names = list(inspect.signature(fn).parameters)
    hints = typing.get_type_hints(fn)
    tensor_types = (torch.Tensor, typing.Optional[torch.Tensor])
    kinds = [hints.get(n) in tensor_types for n in names]
    n = kinds.index(False) if False in kinds else len(kinds)
    if any(kinds[n:]):
        raise TypeError(f"{fn.__qualname__}: its tensor parameters must come before its settings")
    return n


def _eager_function(name, forward, args: Args, save, backward, formula, materialize_grads: bool, n: int,
                    public: int, total: int):
    """The eager autograd Function of an op: the declared forward, saving formula and backward formula, the
    backward called as a plain function; its gradients refuse a second differentiation (see _autograd). It takes
    the n tensors as arguments and the settings as one tuple (autograd's per-argument cost is then paid for the
    tensors only), and returns the first `public` outputs up to the last that is not None, as a tuple (each
    output costs autograd time; the formula is given None for the rest)."""
    settings_grad = (None,)
    absent = (None,) * total

    def eager_forward(ctx, *inputs):
        inputs = inputs[:n] + inputs[n]
        outputs = forward(*inputs)
        save(ctx, args.bind(inputs), outputs)
        if not materialize_grads:
            ctx.set_materialize_grads(False)
        if public == 1 or outputs[public - 1] is not None:
            return outputs[:public]
        k = public - 1
        while k > 1 and outputs[k - 1] is None:
            k -= 1
        return outputs[:k]

    def eager_backward(ctx, *grad_outputs):
        grads = formula(ctx, backward, *(grad_outputs + absent[len(grad_outputs):]))[:n] + settings_grad
        return refused(name, grads) if torch.is_grad_enabled() else grads

    return type(f"{name}_function", (torch.autograd.Function,),
                {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward),
                 "__doc__": f"The eager autograd Function of fastsnn::{name} (fastsnn.ops._declare.Op)."})
