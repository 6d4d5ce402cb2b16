"""Benchmarks: `pytest bench/ --benchmark-only --benchmark-json=run.json`, then
`python bench/report.py run.json --out DIR` writes the results. Running the suite modifies nothing tracked.

GPU rows need CUDA, or FASTSNN_BENCH_DRY_RUN=1 (tiny sizes on the CPU, see bench/common.py); the CPU rows
(host time per call, bytes saved for backward) always run."""
import os
import sys

import torch

if not torch.cuda.is_available():
    # without a GPU the kernels run under Triton's interpreter (must be chosen before fastsnn is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402

# every shape/dtype row recompiles the torch.compile provider: past Dynamo's default limit (8) it would
# fall back to eager and the "compile" rows would silently be eager ones
for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 4096)

from common import GPU_ROWS, append_row, copy_bandwidth_gbs, environment  # noqa: E402


@pytest.fixture(scope="session")
def copy_gbs():
    """The copy bandwidth the rows' floors use: the device's, or in a rehearsal the host's memcpy."""
    return copy_bandwidth_gbs() if GPU_ROWS else None


def pytest_sessionstart(session):
    """The rows file (FASTSNN_BENCH_ROWS) starts each session with its environment: versions, the device."""
    env = environment()
    if GPU_ROWS:
        env["copy_GB/s"] = round(copy_bandwidth_gbs(), 1)
    append_row({"op": "environment", **env})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    env = environment()
    if GPU_ROWS:
        env["copy_GB/s"] = round(copy_bandwidth_gbs(), 1)
    output_json["fastsnn_environment"] = env
