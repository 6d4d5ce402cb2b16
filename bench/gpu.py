"""One GPU run, within a time budget: every GPU claim of fastsnn measured in one command (bench/gpu.sh calls this).

    python bench/gpu.py --out DIR [--budget 420]     on the GPU machine
    python bench/gpu.py --rehearse --out DIR        the same steps, shares and code paths on a CPU: tiny sizes,
                                                    fastsnn's kernels under Triton's interpreter, every step
                                                    scaled by REHEARSAL_SCALE (a CPU is that much slower)

Steps, in this order (bench/budget.py: each has a minimum and a maximum; a step that overruns is stopped at its
limit and costs only itself; the extras take what is left):
  env          versions, nvidia-smi (clocks, power, pstate), the copy bandwidth (measured once, for every step)
  headline     LIF fwd+bwd T=4 64×65,536 fp16/bf16/fp32; the loss at T=4 B=256 C=1000; bn_lif at a
               spiking_resnet19 layer; spikes packed to bits and back; host time per call; the two training
               steps (fastsnn, unfused, SpikingJelly neurons, compiled with CUDA graphs)
  correctness  the kernel test bodies on the device, the covering tier (-rf: failures named), capped
  memory       bench/memory.py: bytes saved per step against SpikingJelly neurons, peak memory
  extra        the rest of the grids
  report       bench/report.py: <gpu>.json and <gpu>.md from the rows, a summary; nvidia-smi again
Every benchmark row is a line of rows.jsonl as soon as it is measured, so a step stopped by the budget keeps the
rows it finished. Warm-up, autotuning and compilation happen before each row's timed region (warmup_s).
Files in --out: env.txt, nvidia-smi.txt, steps.log, correctness.log, bench.log, rows.jsonl, <gpu>.json,
<gpu>.md, summary.txt and memory/ (what the GPU machine can send back).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from budget import Step, check, run_steps  # noqa: E402

DEFAULT_BUDGET = 420
REHEARSAL_SCALE = 8  # a rehearsal's steps get this many times their GPU minimum and maximum
PY = sys.executable

LIF_HEADLINE = "test_lif and fwdbwd and -4- and 64x65536"
LOSS_HEADLINE = "test_tser_loss and -4-256-1000-"
TRAIN_HEADLINE = "test_train_step and channels_last"


def _bench(name: str, kind: str, min_s: float, max_s: float, expression: str) -> Step:
    command = (PY, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--benchmark-only",
               "--benchmark-columns=rounds", "-rfs", "-k", expression)
    return Step(name, kind, min_s, max_s, command, log="bench.log")


def steps(rehearse: bool) -> list[Step]:
    """The run's steps, in order, with their minimum and maximum seconds on a GPU. A rehearsal runs the same
    steps; only its extras are a sample (the whole grid under the interpreter would take hours)."""
    kernel_files = ("test_lif.py", "test_bn_lif.py", "test_plif.py", "test_spike_storage.py", "test_tser_loss.py",
                    "test_cuda.py")
    if rehearse:
        correctness = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", "--quick", "--maxfail=20",
                       "-k", "cpu or test_cuda", *kernel_files)
        memory = (PY, "bench/memory.py", "--T", "4", "--arch", "spiking_resnet19", "--out", "{out}/memory")
        extras = "(test_lif and fwd- and -2- and 64x128x28x28 and fp16 and fastsnn) or test_saved"
    else:
        correctness = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", "--quick", "--maxfail=20",
                       "-k", "cuda", *kernel_files, "test_properties.py")
        memory = (PY, "bench/memory.py", "--device", "cuda", "--T", "2", "4", "--out", "{out}/memory")
        extras = (f"(test_lif and not ({LIF_HEADLINE})) or (test_tser_loss and not ({LOSS_HEADLINE})) or "
                  f"(test_spike_pack and not fp16) or (test_train_step and not channels_last) or test_saved or "
                  f"test_teacher_share")
    return [
        Step("env", "env", 5, 30, (PY, "bench/gpu.py", "--env", "--out", "{out}"), log="env.log"),
        _bench("lif-headline", "headline", 25, 60, f"{LIF_HEADLINE} and not compile"),
        _bench("loss-headline", "headline", 10, 30, f"{LOSS_HEADLINE} and not compile"),
        _bench("bn-headline", "headline", 10, 30, "test_bn_lif and not compile"),
        _bench("pack-headline", "headline", 5, 20, "test_spike_pack and fp16"),
        _bench("host-time", "headline", 10, 30, "test_host"),
        _bench("compile-headline", "headline", 25, 90,
               f"({LIF_HEADLINE} or {LOSS_HEADLINE} or test_bn_lif) and compile"),
        _bench("training-steps", "headline", 40, 100, f"{TRAIN_HEADLINE} and not compiled"),
        _bench("compiled-step", "headline", 30, 120, f"{TRAIN_HEADLINE} and compiled"),
        Step("correctness", "correctness", 30, 90, correctness,
             {"FASTSNN_COMPILED": None if rehearse else "1"}, log="correctness.log", cwd="tests"),
        Step("memory", "memory", 15, 45, memory, log="memory/memory.log"),
        _bench("extra-rows", "extra", 0, 10_000, extras),
        Step("report", "report", 5, 30, (PY, "bench/report.py", "{out}/rows.jsonl", "--out", "{out}"),
             log="summary.txt"),
    ]


def _scaled(step: Step, factor: float) -> Step:
    return Step(step.name, step.kind, step.min_s * factor, step.max_s * factor, step.command, step.env, step.log,
                step.cwd)


def environment(out: str) -> int:
    """The env step: versions, the GPU, the copy bandwidth; writes env.txt (the bandwidth as `copy_GB/s N`)."""
    import torch
    import triton

    lines = [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
             f"python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__}"]
    try:
        import importlib.metadata as md

        import spikingjelly  # noqa: F401

        lines.append(f"spikingjelly {md.version('spikingjelly')}")
    except Exception as e:  # noqa: BLE001 - reported, the SpikingJelly rows then skip
        lines.append(f"spikingjelly: not importable ({type(e).__name__}: {e})")
    from common import copy_bandwidth_gbs

    if torch.cuda.is_available():
        lines.append(f"gpu {torch.cuda.get_device_name(0)} sm {torch.cuda.get_device_capability(0)}")
    lines.append(f"copy_GB/s {copy_bandwidth_gbs():.1f}" + ("" if torch.cuda.is_available() else
                                                            " (host memcpy: a rehearsal)"))
    with open(os.path.join(out, "env.txt"), "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def nvidia_smi(out: str, when: str) -> None:
    """Clocks, power and performance state, appended to nvidia-smi.txt (`when`: before / after)."""
    fields = "name,pstate,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,memory.used"
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True,
                              text=True, timeout=30)
        text = proc.stdout or proc.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        text = f"nvidia-smi: not available ({type(e).__name__})\n"
    with open(os.path.join(out, "nvidia-smi.txt"), "a") as f:
        f.write(f"== {when} ({time.strftime('%H:%M:%S')})\n{text}")


def _runner(out: str, env: dict):
    """run(step, limit): the step's command in its own process group, killed at `limit` seconds; its output
    appended to its log file in `out`. Returns the exit code, or None when stopped at the limit."""
    def run(step: Step, limit: float):
        child_env = dict(env)
        for k, v in step.env.items():
            if v is None:
                child_env.pop(k, None)
            else:
                child_env[k] = v
        command = [part.replace("{out}", out) for part in step.command]
        log_path = os.path.join(out, step.log)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"== {step.name}: {' '.join(command)}\n")
            f.flush()
            child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=child_env,
                                     cwd=os.path.join(REPO, step.cwd), start_new_session=True)
            try:
                return child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                f.write(f"== {step.name}: stopped at its limit of {limit:.0f} s\n")
                return None
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, help=f"seconds (default {DEFAULT_BUDGET}; a rehearsal: "
                                                     f"{REHEARSAL_SCALE}× that)")
    parser.add_argument("--rehearse", action="store_true", help="the GPU run's steps on the CPU, tiny sizes")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # runs the env step itself
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.env:
        return environment(out)
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --rehearse to rehearse the run on the CPU", file=sys.stderr)
        return 2
    scale = REHEARSAL_SCALE if args.rehearse else 1
    budget = args.budget or DEFAULT_BUDGET * scale
    plan = [_scaled(s, scale) for s in steps(args.rehearse)]
    problem = check(plan, budget)
    if problem:
        print(f"bench/gpu.py: {problem}", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", FASTSNN_BENCH_ROWS=os.path.join(out, "rows.jsonl"),
               SJ_LIF_CUDA_IMPLEMENTATION="triton")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if args.rehearse:
        env["FASTSNN_BENCH_DRY_RUN"] = "1"
        env.pop("FASTSNN_COMPILED", None)
    steps_log = open(os.path.join(out, "steps.log"), "a")

    def log(line):
        print(line, flush=True)
        steps_log.write(line + "\n")
        steps_log.flush()
    nvidia_smi(out, "before")
    run = _runner(out, env)

    def run_step(step, limit):
        rc = run(step, limit)
        if step.name == "env":  # the copy bandwidth, measured once, for every later step
            with open(os.path.join(out, "env.txt")) as f:
                for line in f:
                    if line.startswith("copy_GB/s "):
                        env["FASTSNN_COPY_GBS"] = line.split()[1]
        return rc
    start = time.monotonic()
    results = run_steps(plan, budget, run_step, log=log)
    nvidia_smi(out, "after")
    log(f"===== fastsnn GPU run{' REHEARSAL (times meaningless)' if args.rehearse else ''}: "
        f"{time.monotonic() - start:.0f} s of a {budget:.0f} s budget =====")
    for r in results:
        log(f"{r.name:16s} {r.kind:12s} limit {r.limit_s:6.0f} s  took {r.seconds:6.0f} s  {r.status}")
    with open(os.path.join(out, "steps.json"), "w") as f:
        json.dump([r.__dict__ for r in results], f, indent=1)
    summary = os.path.join(out, "summary.txt")
    if os.path.exists(summary):
        with open(summary) as f:
            print(f.read())
    bad = [r for r in results if r.status != "ok"]
    if bad:
        log("steps that did not finish cleanly: " + ", ".join(f"{r.name} ({r.status})" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
