import os

# The kernels are checked on the CPU by Triton's interpreter, which must be chosen before triton or
# fastsnn is imported. Tests that need the compiled path or the plain reference run a subprocess
# (test_cuda.py runs itself that way, with FASTSNN_COMPILED=1, where CUDA exists).
if os.environ.get("FASTSNN_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
