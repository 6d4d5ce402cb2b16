"""The time budget of one GPU run (bench/gpu.py): steps in a fixed order, each with a minimum and a maximum in
seconds.

A step's limit is the least of its maximum and what is left of the budget once every later required step's
minimum is set aside, so a step that overruns is stopped at its own limit and costs only itself: each required
step still gets its minimum (as long as the minima fit the budget, which `check` verifies up front). Extras
(kind "extra") come last and take only what is left: they can never starve a required step. A step whose limit
falls below its minimum is skipped and reported as such.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

KINDS = ("env", "headline", "correctness", "memory", "extra", "report")
SLACK_S = 3  # a step stopped at its limit takes this long to be killed and reaped; set aside with each minimum


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    min_s: float
    max_s: float
    command: tuple = ()
    env: dict = field(default_factory=dict)  # variables set for the command (None: removed)
    log: str = "steps.log"  # its output, in the run's folder
    cwd: str = ""  # relative to the repository

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 <= self.min_s <= self.max_s:
            raise ValueError(f"step {self.name}: need 0 <= min_s <= max_s, got {self.min_s}, {self.max_s}")

    @property
    def required(self) -> bool:
        return self.kind != "extra"


@dataclass
class Result:
    name: str
    kind: str
    limit_s: float
    seconds: float
    status: str  # "ok", "failed (rc=N)", "timed out", "skipped"


def check(steps: list[Step], budget: float) -> str | None:
    """Why the steps cannot run within `budget` (their order, or their minima), or None."""
    order = [KINDS.index(s.kind) for s in steps]
    if order != sorted(order):
        return "steps must come in the order " + " -> ".join(KINDS)
    needed = sum(s.min_s + SLACK_S for s in steps if s.required)
    if needed > budget:
        return f"the required steps' minima need {needed:.0f} s, more than the {budget:.0f} s budget"
    return None


def limit_for(steps: list[Step], i: int, left: float) -> float:
    """Step i's limit with `left` seconds of the budget left."""
    reserved = sum(s.min_s + SLACK_S for s in steps[i + 1:] if s.required)
    return min(steps[i].max_s, left - reserved - SLACK_S)


def run_steps(steps: list[Step], budget: float, run, *, clock=time.monotonic, log=print) -> list[Result]:
    """Runs each step as `run(step, limit) -> return code (None when stopped at the limit)`, in order, within
    `budget` seconds of `clock`. Returns a Result per step."""
    start = clock()
    results = []
    for i, step in enumerate(steps):
        left = budget - (clock() - start)
        limit = limit_for(steps, i, left)
        if limit < max(step.min_s, 1):
            results.append(Result(step.name, step.kind, max(limit, 0), 0.0, "skipped"))
            log(f"== {step.name}: SKIPPED (limit {limit:.0f} s, below its minimum {step.min_s:.0f} s)")
            continue
        log(f"== {step.name} (limit {limit:.0f} s, {clock() - start:.0f} s of {budget:.0f} s elapsed)")
        t0 = clock()
        rc = run(step, limit)
        seconds = clock() - t0
        status = "timed out" if rc is None else "ok" if rc == 0 else f"failed (rc={rc})"
        results.append(Result(step.name, step.kind, limit, seconds, status))
        log(f"== {step.name}: {status} in {seconds:.0f} s")
    return results
