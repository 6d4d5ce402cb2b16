"""Benchmarks: `pytest bench/ --benchmark-only`. GPU rows skip without CUDA; CPU rows and the saved-bytes
report always run. Results: `python bench/report.py` turns the latest run into bench/results/<gpu>.{json,md}."""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # without a GPU the kernels run under Triton's interpreter (must be chosen before fastsnn is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# SpikingJelly 2.0 picks its CUDA LIF implementation from this variable: compare with its Triton kernels
os.environ.setdefault("SJ_LIF_CUDA_IMPLEMENTATION", "triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402

# every shape/dtype row recompiles the torch.compile provider: past Dynamo's default limit (8) it would
# fall back to eager and the "compile" rows would silently be eager ones
for _name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 4096)

from common import copy_bandwidth_gbs, environment  # noqa: E402


@pytest.fixture(scope="session")
def copy_gbs():
    return copy_bandwidth_gbs() if HAS_CUDA else None


@pytest.fixture(scope="session", autouse=True)
def _environment_info(request):
    request.config._fastsnn_env = environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastsnn_environment"] = environment()
