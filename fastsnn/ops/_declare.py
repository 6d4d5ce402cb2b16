"""Each op declared once; its eager autograd Function and its torch.library custom ops are derived from it.

An op is a forward (a Python function whose annotated signature gives the op's schema: the arguments that have a
gradient first, then the other tensors and the settings), the formula that saves what its backward needs, and a
backward (another annotated function); `Op` builds from these

- the custom ops ``fastsnn::<name>`` and ``fastsnn::<name>_backward`` with their fake kernels, and the autograd
  formula of the first (for torch.compile, which traces the formula and calls the backward op);
- an eager ``torch.autograd.Function`` (the least host time per call) running the same forward, the same
  saving formula and the same backward formula, with the backward called as a plain function;

so both paths share one body for each of the four parts, and arguments are handled by name:

    ARGS = op.args                                   # the forward's parameters
    a = ARGS.bind(inputs)                            # a.x, a.weight, ...   (what `save` is given)
    return grad_x, grad_weight                       # a formula: one gradient per differentiable argument

Two kinds of argument are not a schema's own types:

- a dataclass (a NeuronSpec): one object on the eager path (no per-call packing or lookup), its fields in the
  schema (rebuilt once per distinct set of values inside the custom op);
- ``Host``: a Python object the eager path hands from one part to another (a layout decided in the forward, kept
  on ctx for the backward); not in the schema, None when compiled, so a part given one must work without it.

An op with no backward (statistics that mutate running buffers, a recompute) is an `Op` too: called eagerly it is
the plain function, compiled it is the custom op.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import os
import types
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


class Host:
    """The annotation of a host-only argument (see the module docstring): left out of the custom op's schema, passed
    as None on the compiled path."""


_INTERNED: dict = {}


def _interned(cls, values: tuple):
    """cls(*values), one object per distinct set (what a custom op's body rebuilds a dataclass argument with)."""
    key = (cls, values)
    made = _INTERNED.get(key)
    if made is None:
        if len(_INTERNED) >= 1024:
            _INTERNED.clear()
        made = _INTERNED[key] = cls(*values)
    return made


def _schema_type(annotation):
    """A PEP 604 union (float | None) as typing.Union, the form every torch version's infer_schema reads."""
    if isinstance(annotation, types.UnionType):
        return typing.Union[typing.get_args(annotation)]
    return annotation


class Args:
    """A part's parameters (ctx left out) by name, and their flat form: the custom op's schema, where a dataclass
    argument is its fields and a Host argument is absent."""

    def __init__(self, fn, skip: tuple = ("ctx",)):
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        params = [p for p in signature.parameters.values() if p.name not in skip]
        self.names = tuple(p.name for p in params)
        self._index = {n: i for i, n in enumerate(self.names)}
        inputs = type("Inputs", (collections.namedtuple("Inputs", self.names),), {"__slots__": ()})
        self.bind = functools.partial(tuple.__new__, inputs)  # one C call: attribute reads at C speed too
        flat, self._parts = [], []  # per parameter: None (itself), a dataclass (its fields) or Host (nothing)
        for p in params:
            annotation = hints.get(p.name, p.annotation)
            if annotation is Host:
                self._parts.append(Host)
            elif dataclasses.is_dataclass(annotation):
                field_types = typing.get_type_hints(annotation)
                fields = tuple(f.name for f in dataclasses.fields(annotation))
                flat += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           annotation=_schema_type(field_types[f])) for f in fields]
                self._parts.append((annotation, fields))
            else:
                flat.append(p.replace(annotation=_schema_type(annotation)))
                self._parts.append(None)
        names = [p.name for p in flat]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__qualname__}: a dataclass argument's field repeats another argument's name")
        self.flat_signature = signature.replace(parameters=flat,
                                                return_annotation=_schema_type(hints.get("return",
                                                                                         signature.empty)))
        self.flat_count = len(flat)
        self._defaults = tuple(p.default for p in flat)  # (only the trailing ones with a default are ever read)
        self._plain = all(part is None for part in self._parts)

    def span(self, first: str, last: str) -> slice:
        """The arguments from `first` to `last` (inclusive) as a slice of the bound inputs, found once by name."""
        return slice(self._index[first], self._index[last] + 1)

    def index(self, name: str) -> int:
        return self._index[name]

    def flat(self, args) -> tuple:
        """The arguments as the custom op takes them: each dataclass expanded into its fields, Host ones left out."""
        if self._plain:
            return tuple(args)
        out = []
        for value, part in zip(args, self._parts):
            if part is None:
                out.append(value)
            elif part is not Host:
                out += [getattr(value, f) for f in part[1]]
        return tuple(out)

    def unflat(self, flat) -> tuple:
        """The inverse of flat: the custom op's arguments as the parts take them (a dataclass rebuilt, once per
        distinct set of values; None for a Host argument)."""
        if len(flat) < self.flat_count:  # a caller left out trailing arguments that have defaults
            flat = tuple(flat) + self._defaults[len(flat) - self.flat_count:]
        if self._plain:
            return tuple(flat)
        out, k = [], 0
        for part in self._parts:
            if part is None:
                out.append(flat[k])
                k += 1
            elif part is Host:
                out.append(None)
            else:
                cls, fields = part
                out.append(_interned(cls, tuple(flat[k:k + len(fields)])))
                k += len(fields)
        return tuple(out)

    def prototype(self) -> Callable:
        """A function with the flat signature, for torch.library.infer_schema."""
        def flat_fn(*args):
            raise AssertionError("a schema prototype is never called")
        flat_fn.__signature__ = self.flat_signature  # annotations are objects: nothing to evaluate
        return flat_fn


def _absent_as_empty(outputs, args):
    """outputs with every None replaced by an empty fp32 tensor on the first tensor argument's device: a custom op
    returns tensors only (an eager call keeps the None)."""
    if not isinstance(outputs, tuple) or None not in outputs:
        return outputs
    like = next(a for a in args if isinstance(a, torch.Tensor))
    return tuple(like.new_empty(0, dtype=torch.float32) if o is None else o for o in outputs)


def _custom_op(name: str, fn: Callable, fake: Callable, args: Args, mutates_args=()):
    """The custom op fastsnn::<name> of a part: its body and its fake take the flat arguments and call the part
    (fn, fake) with them as declared."""
    def body(*flat):
        declared = args.unflat(flat)
        return _absent_as_empty(fn(*declared), declared)

    def fake_body(*flat):
        declared = args.unflat(flat)
        return _absent_as_empty(fake(*declared), declared)

    schema = torch.library.infer_schema(args.prototype(), mutates_args=mutates_args)
    op = torch.library.custom_op(f"fastsnn::{name}", body, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake_body)
    return op


class Op:
    """One op, declared once (see the module docstring).

    forward(*args): the op's outputs (a tensor or a tuple; None stands for an absent output: the custom op
        returns an empty fp32 tensor there). Its annotations give the custom op's schema.
    fake(*args): the outputs' shapes, strides and dtypes (meta/fake tensors), taking the arguments as declared.
    save(ctx, a, outputs): saves what the backward needs (ctx.save_for_backward, attributes on ctx), marks the
        outputs that have no gradient; a is the inputs by name, outputs as forward returned them (None or an
        empty tensor for an absent one).
    backward(*args), backward_fake(*args): the backward op, annotated as forward.
    formula(ctx, backward, *grad_outputs): the gradients of the `differentiable` arguments, a tuple in their order,
        calling backward(...) for the work: the plain function on the eager path, the custom op when compiled
        (which returns an empty tensor for an absent gradient: the formula keeps only those it asked for).
    differentiable: the names of the arguments that can have a gradient; they lead forward's signature (the
        eager Function takes them as its tensor arguments, every other argument in one tuple, for which autograd
        does no per-argument work).
    internal: how many of the last outputs are for the backward only (saved, not returned by the eager Function).
    mutates_args: the arguments a forward-only op writes to (no backward then).
    label: the name errors give the op (the public function's), default `name`.
    materialize_grads: False (the default) passes None (eager) for an output that got no gradient, instead of a
        tensor of zeros (one more kernel), where the eager Function returns more than one output.
    """

    def __init__(self, name: str, forward: Callable, *, fake: Callable, save: Callable | None = None,
                 backward: Callable | None = None, backward_fake: Callable | None = None,
                 formula: Callable | None = None, differentiable: tuple = (), mutates_args: tuple = (),
                 materialize_grads: bool = False, internal: int = 0, label: str | None = None):
        self.name, self.forward = name, forward
        self.args = Args(forward)
        self.op = _custom_op(name, forward, fake, self.args, mutates_args)
        if backward is None:
            self.Function, self.differentiable = None, 0
            return
        n = self.differentiable = len(differentiable)
        if self.args.names[:n] != tuple(differentiable):
            raise TypeError(f"{forward.__qualname__}: the arguments with a gradient {tuple(differentiable)} must lead "
                            f"its signature, got {self.args.names}")
        self.backward = backward
        backward_args = Args(backward)
        self.backward_op = _custom_op(f"{name}_backward", backward, backward_fake, backward_args)
        args, backward_op, others = self.args, self.backward_op, (None,) * (self.args.flat_count - n)

        def call_backward(*declared):
            return backward_op(*backward_args.flat(declared))

        def setup_context(ctx, inputs, output):
            save(ctx, args.bind(args.unflat(inputs)), output)

        def compiled_backward(ctx, *grad_outputs):
            return tuple(formula(ctx, call_backward, *grad_outputs)) + others

        self.op.register_autograd(compiled_backward, setup_context=setup_context)
        outputs = typing.get_type_hints(forward)["return"]
        total = len(typing.get_args(outputs)) if typing.get_origin(outputs) is tuple else 1
        self.Function = _eager_function(label or name, forward, args, n, save, backward, formula, materialize_grads,
                                        total - internal, total)

    def __call__(self, *args):
        """The forward through autograd: the eager Function, or the custom op when torch.compile traces."""
        if torch.compiler.is_compiling():
            return self.op(*self.args.flat(args))
        if self.Function is None:
            return self.forward(*args)
        n = self.differentiable
        return self.Function.apply(*args[:n], args[n:])  # the other arguments in one tuple: see _eager_function


def _eager_function(label, forward, args: Args, n: int, save, backward, formula, materialize_grads: bool,
                    public: int, total: int):
    """The eager autograd Function of an op: the declared forward, saving formula and backward formula, the
    backward called as a plain function; its gradients refuse a second differentiation (see _autograd).

    It takes the n differentiable arguments and then every other argument as one tuple, returns the first `public`
    outputs (a tuple) up to the last that is not None (each output costs autograd time; the formula is given None
    for the rest). Written out as source for the op's argument names (a call through *args, a slice and a
    concatenation per call cost host time that a small op's kernel does not)."""
    lead, rest = args.names[:n], args.names[n:]
    every = ", ".join(args.names)
    grads_in = [f"g{i}" for i in range(public)]
    lines = [f"def forward({', '.join(('ctx', *lead, 'rest'))}):"]
    if rest:
        lines.append(f"    {', '.join(rest)}, = rest")
    lines += [f"    outputs = forward_({every})",
              f"    save(ctx, bind(({every},)), outputs)"]
    # materialize_grads matters only where more than one output is returned: a single one that gets no gradient
    # leaves the backward uncalled, or (the gradient undefined) given zeros, for which every formula is written
    if total == 1:
        lines.append("    return outputs")
    else:
        for k in range(public - 1, 0, -1):  # the outputs up to the last that is not None
            lines += [f"    if outputs[{k}] is not None:",
                      *([] if materialize_grads else ["        ctx.set_materialize_grads(False)"]),
                      f"        return outputs[:{k + 1}]"]
        lines.append("    return outputs[:1]")
    defaults = ", ".join([grads_in[0]] + [f"{g}=None" for g in grads_in[1:]])
    formula_grads = ", ".join(grads_in + ["None"] * (total - public))
    lines += [f"def backward(ctx, {defaults}):",
              f"    grads = formula(ctx, backward_, {formula_grads}) + (None,)",
              "    return refused(label, grads) if is_grad_enabled() else grads"]
    scope = dict(forward_=forward, save=save, bind=args.bind, formula=formula, backward_=backward, refused=refused,
                 is_grad_enabled=torch.is_grad_enabled, label=label)
    exec(compile("\n".join(lines), f"<fastsnn eager Function of {label}>", "exec"), scope)  # noqa: S102 - built above
    return type(f"{label}_function", (torch.autograd.Function,),
                {"forward": staticmethod(scope["forward"]), "backward": staticmethod(scope["backward"]),
                 "__doc__": f"The eager autograd Function of fastsnn::{label} (fastsnn.ops._declare.Op)."})
