"""Bad input to the neuron ops and modules: a clear error naming the argument, never a crash."""
import pytest
import torch

import fastsnn
from helpers import run_python

X = torch.randn(4, 3, 5)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(x=torch.randn(5)), ValueError, "x must have shape [T, ...]"),
    (dict(x=torch.randn(0, 3)), ValueError, "T >= 1"),
    (dict(x=torch.ones(4, 3, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    (dict(x=torch.ones(4, 3, dtype=torch.bool)), TypeError, "x must have a floating dtype"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(tau=1.0), ValueError, "tau must be a finite number > 1"),
    (dict(tau=0.5), ValueError, "tau must be"),
    (dict(tau=float("nan")), ValueError, "tau must be"),
    (dict(surrogate="relu"), ValueError, "surrogate must be one of ['atan', 'erf', 'piecewise_quadratic', 'sigmoid']"),
    (dict(alpha=0.0), ValueError, "alpha must be a finite number > 0"),
    (dict(alpha=-1.0), ValueError, "alpha must be"),
    (dict(v_init=torch.zeros(3, 4)), ValueError, "v_init must have x's per-timestep shape (3, 5)"),
    (dict(v_init=torch.zeros(3, 5, dtype=torch.int32)), TypeError, "v_init must have a floating dtype"),
    (dict(v_init=torch.zeros(3, 5, dtype=torch.float64)), TypeError, "v_init must have a floating dtype"),
    (dict(x=X.half(), v_init=torch.zeros(3, 5, dtype=torch.bfloat16)), TypeError, "v_init must have x's dtype"),
    (dict(v_threshold=0.0, v_reset=0.0), ValueError, "v_threshold must be > v_reset"),
    (dict(v_threshold=-1.0), ValueError, "v_threshold must be > v_reset"),
    (dict(v_reset=float("inf")), ValueError, "v_reset must be"),
    (dict(detach_reset="yes"), TypeError, "detach_reset must be True or False"),
    (dict(decay_input=1), TypeError, "decay_input must be True or False"),
    (dict(backend="cuda"), ValueError, "backend must be one of ('auto', 'triton', 'reference')"),
])
def test_lif_bad_input(kwargs, exc, words):
    kwargs = {"x": X, **kwargs}
    with pytest.raises(exc) as info:
        fastsnn.lif_multistep(kwargs.pop("x"), **kwargs)
    assert words in str(info.value)
    assert str(info.value).startswith("lif_multistep:")


def test_float64_is_rejected_with_the_allowed_dtypes():
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        fastsnn.lif_multistep(X.double())


def test_v_threshold_below_v_reset_is_fine_for_soft_reset():
    fastsnn.if_multistep(X, v_threshold=-0.5, v_reset=None)


def test_if_bad_input_names_if():
    with pytest.raises(ValueError, match="^if_multistep: surrogate"):
        fastsnn.if_multistep(X, surrogate="nope")


@pytest.mark.parametrize("cls,kwargs,words", [
    (fastsnn.LIF, dict(tau=0.9), "LIF: tau must be"),
    (fastsnn.LIF, dict(surrogate="relu"), "LIF: surrogate must be one of"),
    (fastsnn.IF, dict(alpha=0), "IF: alpha must be"),
    (fastsnn.IF, dict(backend="gpu"), "IF: backend must be one of"),
])
def test_modules_validate_at_construction(cls, kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        cls(**kwargs)


def test_tensors_on_different_devices():
    meta_v = torch.zeros(3, 5, device="meta")
    with pytest.raises(ValueError, match="all tensors must be on one device; x is on cpu but v_init is on meta"):
        fastsnn.lif_multistep(X, v_init=meta_v)


def test_step_mode_other_than_multistep_is_refused():
    lif = fastsnn.LIF()
    lif.step_mode = "s"
    with pytest.raises(RuntimeError, match="only step_mode='m'"):
        lif(X)


def test_without_interpreter_cpu_auto_is_reference_and_triton_is_refused():
    code = (
        "import torch, fastsnn\n"
        "from fastsnn.backend import resolve_backend\n"
        "assert resolve_backend('op', 'auto', torch.device('cpu')) == 'reference'\n"
        "x = torch.randn(4, 8)\n"
        "assert torch.equal(fastsnn.lif_multistep(x), fastsnn.reference.lif_multistep(x))\n"
        "try:\n"
        "    fastsnn.lif_multistep(x, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    proc = run_python(code, interpret=False)
    assert proc.returncode == 0, proc.stderr
    assert "lif_multistep: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1" in proc.stdout


def test_import_does_not_need_spikingjelly():
    code = (
        "import sys\n"
        "sys.modules['spikingjelly'] = None\n"
        "import fastsnn\n"
        "print(fastsnn.lif_multistep)\n"
    )
    proc = run_python(code, interpret=False)
    assert proc.returncode == 0, proc.stderr
