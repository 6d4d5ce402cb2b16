"""fastsnn.ops._declare: an op declared once, by name; its eager Function and its custom ops derived from it."""
from typing import Optional

import dataclasses

import pytest
import torch
from torch import Tensor

from fastsnn.ops._declare import Args, Host, Op


@dataclasses.dataclass(frozen=True)
class _Knobs:
    gain: float = 1.0
    offset: Optional[float] = None


def _op(ctx, x: Tensor, weight: Optional[Tensor], knobs: _Knobs, repeat: int = 0, plan: Host = None) -> Tensor:
    pass


def test_names_come_from_the_signature_without_ctx():
    args = Args(_op)
    assert args.names == ("x", "weight", "knobs", "repeat", "plan")
    bound = args.bind((1, 2, "k", 4, None))
    assert (bound.x, bound.weight, bound.repeat) == (1, 2, 4) and bound[args.span("weight", "repeat")] == (2, "k", 4)
    assert args.index("repeat") == 3


def test_a_dataclass_is_its_fields_in_the_schema_and_a_host_argument_is_absent():
    args = Args(_op)
    schema = torch.library.infer_schema(args.prototype(), mutates_args=())
    assert schema == "(Tensor x, Tensor? weight, float gain, float? offset, SymInt repeat=0) -> Tensor"
    knobs, x = _Knobs(2.0, None), torch.ones(1)
    flat = args.flat((x, None, knobs, 3, object()))
    assert flat == (x, None, 2.0, None, 3)
    back = args.unflat(flat)
    assert back[:2] == (x, None) and back[2] == knobs and back[3:] == (3, None)
    assert args.unflat(args.flat((x, None, _Knobs(2.0, None), 3, None)))[2] is back[2]  # rebuilt once per value set

# ---- a toy op: y = x·scale (+ shift), an optional second output, a tensor kept for the backward only ----

def _forward(x: Tensor, shift: Optional[Tensor], scale: float, with_square: bool) -> tuple[Tensor, Tensor, Tensor]:
    y = x * scale if shift is None else x * scale + shift
    return y, (y * y if with_square else None), x.abs()  # the last: internal (saved, never returned eagerly)


def _fake(x, shift, scale, with_square):
    return torch.empty_like(x), (torch.empty_like(x) if with_square else None), torch.empty_like(x)


def _save(ctx, a, outputs):
    ctx.scale, ctx.with_square = a.scale, a.with_square
    ctx.has_shift = a.shift is not None
    ctx.save_for_backward(outputs[0], outputs[2])
    ctx.mark_non_differentiable(outputs[2])


def _backward(grad_y: Optional[Tensor], grad_square: Optional[Tensor], y: Tensor, kept: Tensor, scale: float,
              shift_grad: bool) -> tuple[Tensor, Tensor]:
    g = torch.zeros_like(y) if grad_y is None else grad_y.clone()
    if grad_square is not None:
        g = g + 2 * y * grad_square
    return g * scale, (g if shift_grad else None)


def _backward_fake(grad_y, grad_square, y, kept, scale, shift_grad):
    return torch.empty_like(y), (torch.empty_like(y) if shift_grad else None)


def _formula(ctx, backward, grad_y, grad_square, _grad_kept):
    y, kept = ctx.saved_tensors
    grad_x, grad_shift = backward(grad_y, grad_square if ctx.with_square else None, y, kept, ctx.scale,
                                  ctx.has_shift)
    return grad_x, (grad_shift if ctx.has_shift else None)


_TOY = Op("test_declare_toy", _forward, fake=_fake, save=_save, backward=_backward, backward_fake=_backward_fake,
          formula=_formula, differentiable=("x", "shift"), internal=1)


@pytest.mark.parametrize("with_shift", [False, True])
@pytest.mark.parametrize("with_square", [False, True])
def test_eager_function_and_custom_op_agree(with_shift, with_square):
    x = torch.randn(3, 4, requires_grad=True)
    shift = torch.randn(3, 4, requires_grad=True) if with_shift else None
    eager = _TOY(x, shift, 1.5, with_square)
    # eager: the public outputs up to the last that is not None; the internal one never
    assert len(eager) == (2 if with_square else 1)
    compiled = torch.compile(lambda *a: _TOY(*a), fullgraph=True, backend="aot_eager")(x, shift, 1.5, with_square)
    assert len(compiled) == 3 and compiled[2].shape == x.shape and (with_square or compiled[1].numel() == 0)
    inputs = [x] + ([shift] if with_shift else [])
    losses = [out[0].sum() + (out[1].sum() if with_square else 0) for out in (eager, compiled)]
    grads = [torch.autograd.grad(loss, inputs) for loss in losses]
    ref_y = x * 1.5 + (shift if with_shift else 0)
    ref = torch.autograd.grad(ref_y.sum() + ((ref_y * ref_y).sum() if with_square else 0), inputs)
    for got in grads:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


def test_the_custom_ops_pass_opcheck():
    x, shift = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    for args in ((x, None, 2.0, False), (x, shift, 0.5, True)):
        torch.library.opcheck(_TOY.op, args)


def test_an_unused_output_gets_no_zeros_and_the_gradient_refuses_double_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y, square = _TOY(x, None, 2.0, True)
    (g,) = torch.autograd.grad(square.sum(), x, create_graph=True)  # y unused: the formula gets None for it
    torch.testing.assert_close(g, 8 * x.detach())
    with pytest.raises(RuntimeError, match="test_declare_toy: its gradient cannot be differentiated again"):
        (g * g).sum().backward()


def test_the_differentiable_arguments_must_lead():
    def bad(scale: float, x: Tensor) -> Tensor:
        return x * scale

    with pytest.raises(TypeError, match=r"the arguments with a gradient \('x',\) must lead its signature"):
        Op("test_declare_bad", bad, fake=bad, save=_save, backward=_backward, backward_fake=_backward_fake,
           formula=_formula, differentiable=("x",))


def test_compile_caches_are_keyed_on_the_ops_source(tmp_path):
    """Inductor's cache keys do not cover the custom ops' fake kernels: fastsnn adds its ops' source to
    torch.compiler.config.cache_key_tag (a stale graph compiled against older fakes failed a stride check)."""
    from fastsnn.ops import _declare

    assert _declare.ops_source_tag() in torch.compiler.config.cache_key_tag
    (tmp_path / "a.py").write_text("x = 1\n")
    first = _declare.ops_source_tag(str(tmp_path))
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _declare.ops_source_tag(str(tmp_path)) != first
    saved = torch.compiler.config.cache_key_tag
    try:
        torch.compiler.config.cache_key_tag = "mine"
        assert _declare.tag_compile_caches("fastsnn-ops-x") == "mine+fastsnn-ops-x"
        assert _declare.tag_compile_caches("fastsnn-ops-x") == "mine+fastsnn-ops-x"  # added once
    finally:
        torch.compiler.config.cache_key_tag = saved


def test_importing_fastsnn_imports_no_kernels_and_a_lazy_module_reads_the_real_one(monkeypatch):
    """The ops read their kernels through LazyKernels: nothing of Triton is imported with fastsnn, the first read
    imports the module, and later reads see the module's own namespace (a monkeypatch of it too)."""
    import subprocess
    import sys

    code = ("import sys, fastsnn; "
            "print('triton' in sys.modules, any(m.startswith('fastsnn.kernels') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]
    from fastsnn.kernels import spike_pack
    from fastsnn.ops._layout import LazyKernels

    lazy = LazyKernels("spike_pack")
    assert lazy.pack_bits is spike_pack.pack_bits
    monkeypatch.setattr(spike_pack, "pack_bits", "patched")
    assert lazy.pack_bits == "patched"
    with pytest.raises(AttributeError, match="no_such_launcher"):
        lazy.no_such_launcher
