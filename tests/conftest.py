import os

# The kernels are checked on the CPU by Triton's interpreter, which must be chosen before triton or
# fastsnn is imported. Tests that need the compiled path or the plain reference run a subprocess
# (test_cuda.py runs itself that way, with FASTSNN_COMPILED=1, where CUDA exists).
if os.environ.get("FASTSNN_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# spikes stored as bits are checked to be 0/1 (one host sync per call; see fastsnn.ops.spike_storage)
os.environ.setdefault("FASTSNN_CHECK_SPIKES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    try:
        from hypothesis import settings
    except ImportError:
        return
    # property tests draw the same cases on every run (derandomize); --quick draws fewer
    base = dict(deadline=None, derandomize=True, database=None, print_blob=True)
    settings.register_profile("fastsnn", max_examples=40, **base)
    settings.register_profile("fastsnn-quick", max_examples=6, **base)
    settings.load_profile("fastsnn-quick" if config.getoption("--quick") else "fastsnn")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the edit-test loop: every code path once (cases marked `pairwise` or `full` and tests "
                          "marked `slow` are deselected; the AOT check compiles sm_90 fp16 only)")
    parser.addoption("--full", action="store_true",
                     help="every combination of the parametrised case products (cases marked `full`), which the "
                          "default run covers pairwise; the CUDA re-run (test_cuda.py) always uses it")


# The devices the kernel tests run on in this process: the interpreter on CPU tensors by default; compiled
# Triton on CUDA tensors in a process started with FASTSNN_COMPILED=1 (test_cuda.py starts one where CUDA exists)
COMPILED = os.environ.get("FASTSNN_COMPILED") == "1"
DEVICES = ["cuda"] if COMPILED and torch.cuda.is_available() else [] if COMPILED else ["cpu"]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


def _deselected(item, quick: bool, full: bool) -> bool:
    if quick and any(item.get_closest_marker(m) for m in ("full", "pairwise", "slow")):
        return True
    if not full and item.get_closest_marker("full"):
        return True
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    # the interpreter cannot do bf16 arithmetic: bf16 cases of device tests run on CUDA only
    return params.get("device") == "cpu" and any(v is torch.bfloat16 for v in params.values())


def pytest_collection_modifyitems(config, items):
    quick, full = config.getoption("--quick"), config.getoption("--full")
    kept, dropped = [], []
    for item in items:
        (dropped if _deselected(item, quick, full) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _default_device(request):
    """A test parametrised over `device` creates its tensors there: torch's default device is set to it."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec else None
    if device is None:
        yield
        return
    with torch.device(device):
        yield
