"""Shared test helpers: the one tolerance table, comparisons, subprocess runs."""
import itertools
import os

import pytest
import torch

from fastsnn.testing import count_launches  # noqa: F401  (re-exported for the tests)

# One tolerance table for every comparison against a reference: dtype -> (atol, rtol)
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0):
    """Within the dtype's (atol·scale, rtol); atol is never below the dtype's smallest subnormal, the
    spacing of the values that rounding to the dtype can produce near 0."""
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCES[dtype]
    finfo = torch.finfo(dtype)
    atol = max(atol * scale, finfo.smallest_normal * finfo.eps)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False)


def run_python(code: str, *, interpret: bool, timeout: float = 600, env_extra=None, cwd=None):
    """Runs `code` in a fresh interpreter with TRITON_INTERPRET set or unset; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def program_env(tmp_path):
    """The environment of a training-program subprocess: the CPU reference path (fast), the cache in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTSNN_CACHE"] = str(tmp_path / "cache")
    return env


def program(tmp_path, *args, cwd=None, timeout=600, module="fastsnn.train", env=None):
    """`python -m module args` in tmp_path (or cwd) with program_env; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or program_env(tmp_path), cwd=cwd or tmp_path, timeout=timeout)


def _label(name, value):
    if isinstance(value, bool):
        return name if value else ""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "").replace("float", "fp")
    if isinstance(value, str):
        return value
    return f"{name}{value}"


def case_id(**flags) -> str:
    """A readable parametrize id: case_id(T=4, neuron="lif", detach=True, soft=False) -> "T4-lif-detach"."""
    return "-".join(p for p in (_label(name, value) for name, value in flags.items()) if p) or "default"


def _pairwise(choices, start):
    """Greedy all-pairs covering: index tuples that, with `start`, hold every pair of values of any two axes."""
    axes = range(len(choices))
    needed = {(i, a, j, b) for i in axes for j in axes if i < j
              for a in range(len(choices[i])) for b in range(len(choices[j]))}

    def pairs(index):
        return {(i, index[i], j, index[j]) for i in axes for j in axes if i < j}
    for index in start:
        needed -= pairs(index)
    picked = []
    candidates = list(itertools.product(*(range(len(c)) for c in choices)))
    while needed:
        best = max(candidates, key=lambda index: len(pairs(index) & needed))
        picked.append(best)
        needed -= pairs(best)
    return set(picked)


def product_cases(**axes):
    """pytest.params over the product of the axes (name -> list of values, or dict of id label -> value),
    with readable ids, in three tiers: a covering subset (every value of every axis at least once) runs
    always; the cases that complete an all-pairs covering (every pair of values of any two axes) are marked
    `pairwise` (run by default, deselected by --quick); the rest of the product is marked `full` (run with
    --full, and on CUDA, where it is fast)."""
    names = list(axes)
    choices = [list(v.items()) if isinstance(v, dict) else [(None, x) for x in v] for v in axes.values()]
    width = max(len(c) for c in choices)
    covering = {tuple(i % len(c) for c in choices) for i in range(width)}
    pairwise = _pairwise(choices, covering) - covering
    cases = []
    for index in itertools.product(*(range(len(c)) for c in choices)):
        picked = [c[i] for c, i in zip(choices, index)]
        label = "-".join(p for p in ((lab if lab is not None else _label(n, v)) for n, (lab, v) in zip(names, picked))
                         if p) or "default"
        marks = () if index in covering else (pytest.mark.pairwise,) if index in pairwise else (pytest.mark.full,)
        cases.append(pytest.param(*(v for _, v in picked), id=label, marks=marks))
    return cases


def saved_activation_bytes(model, fn, copies_of_parameters=True):
    """(fn(), bytes autograd saves while fn runs): each storage once, the model's parameters left out (and, with
    copies_of_parameters, tensors shaped like one: Inductor on the CPU saves the stem convolution's weight in its
    own layout)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} if copies_of_parameters else set()
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and tuple(t.shape) not in shapes:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def gloo_results(target, world: int, *args) -> list:
    """Runs target(rank, results, *args) in `world` spawned processes joined in a gloo group (MASTER_ADDR/PORT
    set, the group destroyed afterwards); returns what each rank put in results[rank], in rank order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_rank, args=(world, port, results, target, args), nprocs=world, join=True)
        return [results[r] for r in range(world)]


def _gloo_rank(rank, world, port, results, target, args):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, results, *args)
    finally:
        dist.destroy_process_group()
