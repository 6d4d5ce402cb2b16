"""bench/gpu.sh, the one prepared GPU run: its budget logic (with faked step durations), rows that survive a step
stopped by its limit, and the rehearsal, which runs the GPU run's steps, shares and code paths on the CPU (tiny
sizes, interpreted kernels), so that everything but the GPU itself has run before GPU time is spent."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import budget  # noqa: E402
import gpu  # noqa: E402
import report  # noqa: E402


class _FakeTime:
    """A clock that only the fake steps advance: each takes its duration, or is stopped at its limit."""

    def __init__(self, durations):
        self.now, self.durations, self.limits = 0.0, durations, {}

    def clock(self):
        return self.now

    def run(self, step, limit):
        self.limits[step.name] = limit
        took = self.durations.get(step.name, step.min_s)
        if took > limit:
            self.now += limit + budget.SLACK_S  # stopped at its limit, then killed and reaped
            return None
        self.now += took
        return 0


def _plan():
    return gpu.steps(rehearse=False)


@pytest.mark.parametrize("case", ["every step takes its maximum", "a headline step never ends",
                                  "correctness never ends", "every step never ends"])
def test_the_budget_gives_every_required_step_its_minimum(case):
    plan = _plan()
    assert budget.check(plan, 420) is None
    durations = {s.name: s.max_s for s in plan}
    if case == "a headline step never ends":
        durations["lif-headline"] = 1e9
    elif case == "correctness never ends":
        durations["correctness"] = 1e9
    elif case == "every step never ends":
        durations = {s.name: 1e9 for s in plan}
    fake = _FakeTime(durations)
    results = budget.run_steps(plan, 420, fake.run, clock=fake.clock, log=lambda line: None)
    by_name = {r.name: r for r in results}
    for step in plan:
        if step.required:
            assert by_name[step.name].status != "skipped" and fake.limits[step.name] >= step.min_s, step.name
    assert {s.name for s in plan if s.kind in ("headline", "memory")} <= set(fake.limits)
    assert fake.now <= 420  # the run ends within its budget, overruns included
    required = {s.name for s in plan if s.required}
    for name, took in durations.items():
        if took == 1e9 and name in required:  # an overrun costs only itself: stopped at its own limit
            assert by_name[name].status == "timed out"


def test_an_overrun_costs_only_the_step_that_overran():
    plan = _plan()
    calm = _FakeTime({s.name: s.min_s for s in plan})
    budget.run_steps(plan, 420, calm.run, clock=calm.clock, log=lambda line: None)
    stormy = _FakeTime({**{s.name: s.min_s for s in plan}, "bn-headline": 1e9})
    budget.run_steps(plan, 420, stormy.run, clock=stormy.clock, log=lambda line: None)
    after = [s.name for s in plan][[s.name for s in plan].index("bn-headline") + 1:]
    for name in after:
        if name != "extra-rows":  # the extras get what is left; every required step still its minimum
            assert stormy.limits[name] >= next(s for s in plan if s.name == name).min_s


def test_kernel_time_is_summed_per_call_between_the_flushes():
    import common

    flush = common.FLUSH_OP + "_kernel"
    events = [(9, 4.0, "lif_bwd"), (1, 50.0, "before"), (2, 0.5, flush), (3, 2.0, "lif_fwd"), (4, 3.0, "lif_bwd"),
              (5, 0.5, flush), (6, 1.0, "memset"), (7, 2.5, "lif_fwd"), (8, 0.5, flush), (10, 7.0, "after")]
    assert common.per_round_us(sorted(events, reverse=True)) == [5.0, 3.5]  # two calls; nothing outside them


def test_the_budget_refuses_what_cannot_fit():
    plan = _plan()
    assert "minima need" in budget.check(plan, 100)
    assert "order" in budget.check(list(reversed(plan)), 420)
    with pytest.raises(ValueError, match="kind must be one of"):
        budget.Step("x", "later", 0, 1)


_SLOW_GROUP = """
import time

import pytest
from common import run_benchmark


@pytest.mark.parametrize("i", range(6))
def test_row(benchmark, i):
    if i == 3:
        time.sleep(600)  # the group's budget ends here
    run_benchmark(benchmark, lambda: sum(range(1000)), bytes_moved=8000, copy_gbs=10.0, path="python",
                  provider="fastsnn", op="lif", pass_="fwd", T=i, shape="x", dtype="fp32")
"""


def test_a_step_stopped_at_its_limit_keeps_its_finished_rows(tmp_path):
    """A benchmark group stopped by its limit part-way: the rows it finished are lines of rows.jsonl (each
    appended as it is measured), which report.py reads (a torn last line skipped)."""
    (tmp_path / "test_slow_group.py").write_text(_SLOW_GROUP)
    rows = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSNN_COMPILED")}
    env.update(FASTSNN_BENCH_ROWS=str(rows), PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "bench")]))
    step = budget.Step("slow-group", "extra", 0, 60, (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                      "--benchmark-only", str(tmp_path / "test_slow_group.py")))
    run = gpu._runner(str(tmp_path), env)
    assert run(step, 40) is None  # stopped at its limit, inside row 3
    measured = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["T"] for r in measured] == [0, 1, 2], (tmp_path / "steps.log").read_text()[-3000:]
    with open(rows, "a") as f:
        f.write('{"op": "lif", "provider": "fastsnn", "kern')  # a row cut mid-write
    _, loaded = report.load([str(rows)])
    assert sorted(r["T"] for r in loaded) == [0, 1, 2]
    for r in loaded:
        assert all(r[c] is not None for c in report.CLOCKS), r


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_every_row_has_the_three_clocks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSNN_COMPILED", "OUT")}
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh"), "--rehearse", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=5400)
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [s["name"] for s in steps] == [s.name for s in gpu.steps(rehearse=True)]
    assert all(s["status"] == "ok" for s in steps), steps
    result = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert result["environment"]["dry_run"] is True
    rows = result["rows"]
    for row in rows:
        for clock in ("kernel_us", "eager_us", "host_us", "floor_us"):
            assert isinstance(row.get(clock), (int, float)), (clock, row)
    seen = {(r["op"], r["provider"]) for r in rows}
    assert {("lif", p) for p in ("fastsnn", "eager", "compile", "spikingjelly")} <= seen
    assert {("tser_loss", p) for p in ("fastsnn", "eager", "compile")} <= seen
    assert {("bn_lif", p) for p in ("fastsnn", "eager", "compile", "spikingjelly")} <= seen
    assert {("spike_pack", p) for p in ("fastsnn", "eager", "compile")} <= seen
    assert {("train_step", p) for p in ("fastsnn", "fastsnn-unfused", "spikingjelly", "fastsnn-compiled")} <= seen
    paths = {(r["op"], r["provider"]): r["path"] for r in rows}
    assert paths[("lif", "fastsnn")] == "triton-interpreter" and paths[("lif", "compile")] == "torch.compile"
    assert all(r["images/s"] > 0 for r in rows if r["op"] == "train_step")
    assert {r["op"] for r in result["cpu_rows"]} >= {"host", "saved_bytes"}
    text = (tmp_path / "cpu-dry-run.md").read_text()
    assert "| kernel_us | eager_us | host_us | floor_us |" in text and "Not a GPU run" in text
    assert "| spiking_resnet19 (32 px) | 4 |" in (tmp_path / "memory" / "memory.md").read_text()
    assert (tmp_path / "nvidia-smi.txt").read_text().count("== ") == 2
    assert "REHEARSAL" in proc.stdout
