"""Kernel variants (all of them with --full) compile ahead of time for sm_80/sm_89/sm_90, specialised as the JIT
specialises a real launch, with zero spill bytes; the SASS is read for the global access widths (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import aot_compile  # noqa: E402

KERNELS = ["_lif_fwd_kernel", "_lif_bwd_kernel", "_tser_loss_fwd_kernel", "_tser_loss_reduce_kernel",
           "_bn_stats_kernel", "_bn_finalize_fwd_kernel", "_bn_lif_fwd_kernel", "_bn_lif_bwd_kernel",
           "_bn_finalize_bwd_kernel", "_bn_grad_input_kernel", "_pack_bits_kernel", "_unpack_bits_kernel",
           "_tser_loss_bwd_kernel"]


@pytest.fixture(scope="module")
def compiled(request):
    """The JSON rows of aot_compile.py (its default scope; quick under --quick, full under --full), with its progress
    lines passed through to the terminal while it runs."""
    config = request.config
    scope = "quick" if config.getoption("--quick") else "full" if config.getoption("--full") else "default"
    args = ["--scope", scope]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the script imports fastsnn from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "aot_compile.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    rows, costs = [], []
    for line in proc.stdout:
        if line.startswith("{"):
            row = json.loads(line)
            (costs if "instructions_per_element_step" in row else rows).append(row)
            if len(rows) % 200 == 0 and not costs:
                print(f"\naot_compile: {len(rows)} variants compiled", file=sys.__stderr__, flush=True)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=3600) == 0, stderr[-4000:]
    return rows, scope, costs


def _expected(kernel, scope):
    return sum(1 for index, arch, aligned in aot_compile.jobs(scope, (kernel,)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_variant_compiles_without_spills(compiled, kernel):
    rows, scope, _ = compiled
    rows = [r for r in rows if r["kernel"] == kernel]
    assert len(rows) == _expected(kernel, scope) > 0
    assert {r["arch"] for r in rows} == ({"sm_90"} if scope == "quick" else {"sm_80", "sm_89", "sm_90"})
    spilling = [r for r in rows if r["spill_bytes"]]
    assert not spilling, spilling[:3]
    assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.parametrize("C", [1000, 1024])
def test_loss_rows_are_read_128_bits_at_a_time(compiled, C):
    """Aligned rows of 1000 or 1024 classes: every z/u row access is a 128-bit vector (the scalars
    around it, the label and per-row statistics, are 32/64-bit)."""
    rows, _, _ = compiled
    rows = [r for r in rows if r["kernel"] in ("_tser_loss_fwd_kernel", "_tser_loss_bwd_kernel") and r["aligned"]
            and r["variant"]["C"] == C]
    assert rows
    for r in rows:
        assert r["loads"].get("128", 0) > 0, r
        assert "16" not in r["loads"] and "8" not in r["loads"], r
        if r["kernel"] == "_tser_loss_bwd_kernel":
            assert set(r["stores"]) == {"128"}, r


@pytest.mark.parametrize("kernel", ["_lif_fwd_kernel", "_lif_bwd_kernel"])
def test_lif_global_accesses_are_128_bit_when_aligned(compiled, kernel):
    """Aligned fp32/fp16/bf16 tensors: every global load and store of x, spikes, gradients, membranes and
    checkpoints is a 128-bit vector, on every arch."""
    rows, _, _ = compiled
    rows = [r for r in rows if r["kernel"] == kernel and r["aligned"]]
    assert {r["variant"]["dtype"] for r in rows} >= {"fp16"}
    for r in rows:
        loads, stores = dict(r["loads"]), dict(r["stores"])
        if r["variant"]["kind"].startswith("plif"):  # the rate k (a load) and, backward, the partial dL/dk (a store)
            assert loads.pop("32") == 1 and (kernel == "_lif_fwd_kernel" or stores.pop("32") == 1), r
        assert set(loads) == {"128"} and set(stores) == {"128"}, r


@pytest.mark.parametrize("kernel,budget", [("_lif_fwd_kernel", 12), ("_lif_bwd_kernel", 30)])
def test_lif_sass_instructions_per_element_step_on_sm90(compiled, kernel, budget):
    """The marginal SASS cost of one more timestep per element, read from the sm_90 cubins: <= 12 forward,
    <= 30 backward (atan, detach_reset), for every dtype, neuron kind and reset."""
    _, _, costs = compiled
    costs = [c for c in costs if c["kernel"] == kernel and c["arch"] == "sm_90" and c["aligned"]]
    assert costs
    over = [c for c in costs if not 0 < c["instructions_per_element_step"] <= budget]
    assert not over, over
