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
# SpikingJelly 2.0 picks its CUDA LIF implementation from this variable: force its Triton kernels, so that a
# call that would fall back to its PyTorch loop raises instead of timing the wrong thing
os.environ["SJ_LIF_CUDA_IMPLEMENTATION"] = "triton"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402

# every shape/dtype row recompiles the torch.compile provider: past Dynamo's default limit (8) it would
# fall back to eager and the "compile" rows would silently be eager ones
for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 4096)

from common import HAS_CUDA, copy_bandwidth_gbs, environment  # noqa: E402


@pytest.fixture(scope="session")
def copy_gbs():
    return copy_bandwidth_gbs() if HAS_CUDA else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    env = environment()
    if HAS_CUDA:
        env["copy_GB/s"] = round(copy_bandwidth_gbs(), 1)
    output_json["fastsnn_environment"] = env
