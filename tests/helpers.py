"""Shared test helpers: the one tolerance table, comparisons, subprocess runs."""
import os

import torch

# One tolerance table for every comparison against a reference: dtype -> (atol, rtol)
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, check_dtype=False)


def run_python(code: str, *, interpret: bool, timeout: float = 600, env_extra=None):
    """Runs `code` in a fresh interpreter with TRITON_INTERPRET set or unset; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
