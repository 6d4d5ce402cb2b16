"""python -m fastsnn.ablation: the paper's ablation (Table 3) and a λ sweep, over several seeds, on what runs
on a CPU (the bundled digits and mnist5k data sets), with paired statistics.

Every row of a seed shares that seed's teacher (trained once into the cache) and the seed's data order;
rows differ only in the loss. Runs go to ``<out>/<dataset>/<row>/seed<k>/`` as ordinary fastsnn.train run
folders, in parallel processes with one intra-op thread each; a finished run is never redone and an
interrupted one is resumed, so the command can be stopped and started again. The report
(``<out>/<dataset>/ablation.md``, ``.json``, ``.png``) gives per row the mean ± sd over seeds of:

- ``final``: test accuracy after the last epoch;
- ``last3``: the mean test accuracy of the last 3 epochs (less sensitive to one epoch's noise);
- ``per_t``: the mean over timesteps of each timestep's own test accuracy at the last epoch (paper Fig. 2);
- ``selected``: test accuracy at the epoch the validation split picks (best.pt);

and, for the comparisons that carry the paper's claims, the paired difference by seed with its 95% t
interval, wins/ties/losses and an exact sign-flip permutation p-value (two-sided).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

PAPER_TABLE3 = {"skd": 77.15, "ts_ce": 77.41, "ts_kl": 77.64, "ts": 77.99, "tser": 78.13}  # CIFAR-100, ResNet


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    flags: tuple[str, ...]


TABLE3 = (
    Row("ce", "CE only (no teacher)", ("--method", "ce")),
    Row("skd", "no separation (SKD)", ("--method", "skd")),
    Row("ts_ce", "TS on CE only", ("--method", "ts", "--ts-ce", "--no-ts-kl")),
    Row("ts_kl", "TS on KL only", ("--method", "ts", "--no-ts-ce", "--ts-kl")),
    Row("ts", "TS on both", ("--method", "ts")),
    Row("tser", "TS on both + entropy (TSER, λ=0.01)", ("--method", "tser", "--lam", "0.01")),
)
COMPARISONS = (("tser", "ts"), ("ts", "skd"), ("ts_ce", "skd"), ("ts_kl", "skd"), ("tser", "skd"), ("skd", "ce"),
               ("tser", "ce"))
METRICS = {"final": "final test accuracy", "last3": "mean of the last 3 epochs", "per_t": "per-timestep accuracy",
           "selected": "test accuracy at the validation-picked epoch"}


def lam_rows(lams) -> list[Row]:
    """The λ sweep beyond the Table 3 rows (λ = 0 is "TS on both", λ = 0.01 is TSER)."""
    return [Row(f"lam{lam:g}", f"TSER, λ={lam:g}", ("--method", "tser", "--lam", repr(float(lam))))
            for lam in lams if float(lam) not in (0.0, 0.01)]


# ------------------------------------------------------------------------------------------- running

IDENTITY = ("dataset", "seed", "method", "ts_ce", "ts_kl", "lam")  # what makes a run folder this row's seed


class AblationError(Exception):
    """An ablation folder that cannot be used as asked: one line naming the file."""


def expected_identity(dataset: str, row: Row, seed: int) -> dict:
    """The settings a run of `row` and `seed` has, as fastsnn.train resolves its flags."""
    from .training import config as C

    cfg, _ = C.parse(["--dataset", dataset, *row.flags, "--seed", str(seed)])
    C.resolve(cfg)
    return {key: getattr(cfg, key) for key in IDENTITY}


def _run_identity(folder: str) -> dict | None:
    """The identity settings of the run in `folder`, from its config.yaml (or, without one, its last.pt), or
    None when neither can be read."""
    path = os.path.join(folder, "config.yaml")
    if os.path.isfile(path):
        try:
            import yaml

            with open(path, encoding="utf-8") as f:
                saved = yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):
            saved = None
    else:
        from . import checkpoint as ckpt

        try:
            saved = ckpt.load(os.path.join(folder, "last.pt")).get("config")
        except (ckpt.CheckpointError, AttributeError):
            saved = None
    if not isinstance(saved, dict):
        return None
    return {key: saved.get(key) for key in IDENTITY}


def _history(folder: str, epochs: int) -> tuple[list | None, str]:
    """(the run's epoch rows, "") when metrics.json and metrics.jsonl record all `epochs` epochs, else
    (None, why not)."""
    try:
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        return None, "no metrics.json"
    except (OSError, ValueError) as e:
        return None, f"metrics.json is not readable JSON ({type(e).__name__})"
    if not isinstance(summary, dict) or summary.get("epochs") != epochs:
        return None, f"metrics.json does not record {epochs} epochs"
    try:
        with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
            history = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return None, "no metrics.jsonl"
    except (OSError, ValueError) as e:
        return None, f"metrics.jsonl is not readable JSON lines ({type(e).__name__})"
    if [r.get("epoch") if isinstance(r, dict) else None for r in history] != list(range(1, epochs + 1)) or not all(
            isinstance(r.get("test_acc"), (int, float)) for r in history):
        return None, f"metrics.jsonl holds {len(history)} of {epochs} epoch rows"
    return history, ""


def run_state(folder: str, epochs: int, identity: dict | None = None) -> str:
    """"done" (a finished run of this identity), "resume" (its checkpoint, to finish it or repair its metrics)
    or "new" (nothing of it to keep). A folder holding something else raises AblationError."""
    if not os.path.exists(folder):
        return "new"
    if not os.path.isdir(folder):
        raise AblationError(f"{folder} is a file, not a run folder; move it away")
    found = _run_identity(folder)
    has_checkpoint = os.path.isfile(os.path.join(folder, "last.pt"))
    if identity is not None and found is not None and found != identity:
        differs = ", ".join(f"{k} {found[k]!r} (expected {identity[k]!r})" for k in IDENTITY if found[k] != identity[k])
        raise AblationError(f"{folder} holds another run: {differs}; move it away or choose another --out")
    if found is None and (has_checkpoint or os.path.exists(os.path.join(folder, "metrics.json"))):
        raise AblationError(f"{folder} holds a run whose settings cannot be read (config.yaml and last.pt); move it "
                            f"away or choose another --out")
    history, _ = _history(folder, epochs)
    if history is not None:
        return "done"
    return "resume" if has_checkpoint else "new"


def job_argv(dataset: str, row: Row, seed: int, folder: str, epochs: int, cache_dir: str) -> list[str] | None:
    state = run_state(folder, epochs, expected_identity(dataset, row, seed))
    if state == "done":
        return None
    if state == "resume":
        return ["--resume", os.path.join(folder, "last.pt"), "--quiet", "--threads", "1", "--epochs", str(epochs)]
    return ["--dataset", dataset, *row.flags, "--seed", str(seed), "--epochs", str(epochs), "--out", folder,
            "--overwrite", "--quiet", "--threads", "1", "--no-tensorboard", "--cache-dir", cache_dir]


def _teacher_main(argv: list[str]) -> int:
    """``dataset seed cache_dir``: trains the seed's cached teacher (a child process of :func:`run_all`)."""
    from .training import config as C
    from .training.run import train_nested
    from .training.teacher import cached_teacher

    dataset, seed, cache_dir = argv
    cfg = C.TrainConfig(dataset=dataset, seed=int(seed), cache_dir=cache_dir, threads=1)
    C.resolve(cfg)
    try:
        cached_teacher(cfg, print, train_nested)
    except C.UsageError as e:
        print(f"fastsnn.ablation: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def plan(datasets, rows, seeds, epochs_for, out, cache_dir) -> list[tuple[list[str], str]]:
    """(train argv, log path) of every run still to do; every run folder is checked first (AblationError)."""
    jobs = []
    for dataset, seed, row in itertools.product(datasets, seeds, rows):
        folder = os.path.join(out, dataset, row.key, f"seed{seed}")
        argv = job_argv(dataset, row, seed, folder, epochs_for[dataset], cache_dir)
        if argv is not None:
            jobs.append((argv, os.path.join(out, dataset, row.key, f"seed{seed}.log")))
    return jobs


GRACE_SECONDS = 10  # after Ctrl-C, what the runs in flight get to end on their own (each keeps its checkpoint)


def run_processes(commands: list[tuple[list[str], str]], jobs: int, done=lambda command, code: None) -> None:
    """Runs each (command, log path) as a child process, `jobs` at a time, calling done(command, exit code) as
    each ends. Ctrl-C starts nothing more: the children get SIGINT (those of the terminal's process group have
    it already), GRACE_SECONDS to end, then are killed; KeyboardInterrupt is raised again."""
    import signal
    import subprocess
    import time

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    pending, running = list(commands), []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                command, log_path = pending.pop(0)
                with open(log_path, "a") as log_file:
                    running.append((subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                                    command))
            for child, command in list(running):
                if child.poll() is not None:
                    running.remove((child, command))
                    done(command, child.returncode)
            time.sleep(0.1)
    except KeyboardInterrupt:
        for child, _ in running:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + GRACE_SECONDS
        for child, _ in running:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise


def run_all(datasets, rows, seeds, epochs_for, out, jobs, cache_dir, log=print) -> list[str]:
    """Trains every missing run (each seed's teacher first), in child processes; returns the failures
    (command and exit code)."""
    failures = []
    for dataset in datasets:
        os.makedirs(os.path.join(out, dataset), exist_ok=True)
    todo = plan(datasets, rows, seeds, epochs_for, out, cache_dir)

    def failed(command, code):
        if code != 0:
            failures.append(f"exit {code}: python {' '.join(command[1:])}")

    def teacher_failed(command, code):
        if code != 0:
            dataset, seed = command[-3:-1]
            failures.append(f"exit {code}: the {dataset} teacher of seed {seed} (see {out}/{dataset}/teachers.log)")

    teacher = "import sys; from fastsnn.ablation import _teacher_main; sys.exit(_teacher_main(sys.argv[1:]))"
    run_processes([([sys.executable, "-c", teacher, d, str(s), cache_dir], os.path.join(out, d, "teachers.log"))
                   for d in datasets for s in seeds], jobs, teacher_failed)
    if failures:
        return failures
    for _, log_path in todo:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log(f"ablation: {len(todo)} runs to train with {jobs} processes")
    finished = 0

    def trained(command, code):
        nonlocal finished
        finished += 1
        failed(command, code)
        log(f"ablation: {finished}/{len(todo)} runs finished" + (f" (failed: exit {code})" if code else ""))
    run_processes([([sys.executable, "-m", "fastsnn.train", *argv], log_path) for argv, log_path in todo], jobs,
                  trained)
    return failures


# ---------------------------------------------------------------------------------------- statistics

def run_metrics(folder: str, epochs: int | None = None, identity: dict | None = None) -> dict | None:
    """The four metrics of a finished run folder (of `epochs` epochs and, when given, this identity), or None
    when it has not finished or is another run."""
    try:
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            summary = json.load(f)
        if epochs is None:
            epochs = summary.get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(epochs, int) or epochs < 1:
        return None
    history, _ = _history(folder, epochs)
    if history is None or (identity is not None and _run_identity(folder) != identity):
        return None
    last = history[-1]
    per_t = last.get("per_timestep_acc") or [last["test_acc"]]
    return {"final": last["test_acc"], "last3": sum(r["test_acc"] for r in history[-3:]) / len(history[-3:]),
            "per_t": sum(per_t) / len(per_t), "selected": summary.get("student_acc"),
            "per_timestep": per_t, "epochs": len(history)}


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t (scipy comes with scikit-learn)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided p of the mean paired difference under random sign flips (all 2^n for n <= 16)."""
    n = len(diffs)
    observed = abs(sum(diffs))
    if n > 16:
        import random

        rng = random.Random(0)
        flips = ([rng.choice((-1, 1)) for _ in range(n)] for _ in range(20000))
    else:
        flips = itertools.product((-1, 1), repeat=n)
    hits = total = 0
    for signs in flips:
        total += 1
        hits += abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
    return hits / total


def t_test_p(mean: float, sd: float, n: int) -> float:
    """Two-sided p of the paired t-test (mean difference 0); with no spread, 0 or 1."""
    if n < 2 or math.isnan(sd):
        return float("nan")
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    from scipy.stats import t

    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def paired(a: list[float], b: list[float]) -> dict:
    """a - b paired by seed: mean, 95% t interval, wins/ties/losses, the exact sign-flip p (which cannot go
    below 2/2^n: 0.0625 with 5 seeds) and the paired t-test p."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    half = t_quantile(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs),
            "wins": sum(d > 1e-9 for d in diffs), "ties": sum(abs(d) <= 1e-9 for d in diffs),
            "losses": sum(d < -1e-9 for d in diffs), "p": sign_flip_p(diffs), "p_t": t_test_p(mean, sd, len(diffs))}


def analyse(folder: str, rows: list[Row], seeds: list[int], epochs: int | None = None, dataset: str | None = None,
            log=None) -> dict:
    """Per row and metric the values by seed (seeds where every row finished), mean and sd; the paired
    comparisons; the comparisons of each λ row against TS. With `dataset`, each run must be its row's and seed's;
    `log` is told of every run left out, and why."""
    runs = {}
    for r in rows:
        runs[r.key] = {}
        for s in seeds:
            path = os.path.join(folder, r.key, f"seed{s}")
            identity = expected_identity(dataset, r, s) if dataset else None
            runs[r.key][s] = run_metrics(path, epochs, identity)
            if runs[r.key][s] is None and log is not None:
                log(f"ablation: {path} left out of the report: {_why_unfinished(path, epochs, identity)}")
    complete = [s for s in seeds if all(runs[r.key][s] is not None for r in rows)]
    table = {}
    for r in rows:
        table[r.key] = {"label": r.label, "paper": PAPER_TABLE3.get(r.key)}
        for m in METRICS:
            values = [runs[r.key][s][m] for s in complete]
            stats = mean_sd(values) if values else (None,) * 2
            table[r.key][m] = {"values": values, **dict(zip(("mean", "sd"), stats))}
    keys = {r.key for r in rows}
    pairs = [p for p in COMPARISONS if set(p) <= keys]
    pairs += [(r.key, "ts") for r in rows if r.key.startswith("lam") and "ts" in keys]
    comparisons = []
    for a, b in pairs:
        if len(complete) < 2:
            break
        comparisons.append({"a": a, "b": b, **{m: paired(table[a][m]["values"], table[b][m]["values"])
                                               for m in METRICS}})
    return {"seeds": complete, "rows": table, "comparisons": comparisons}


def _why_unfinished(folder: str, epochs: int | None, identity: dict | None) -> str:
    if not os.path.isdir(folder):
        return "no run folder"
    if epochs is not None:
        _, why = _history(folder, epochs)
        if why:
            return why
    found = _run_identity(folder)
    if identity is not None and found != identity:
        return "its settings are not this row's and seed's" if found else "its config.yaml cannot be read"
    return "not finished"


# ------------------------------------------------------------------------------------------ reporting

def _fmt(stat: dict) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.2f} ± {stat['sd']:.2f}"


def markdown(dataset: str, result: dict, epochs: int, command: str, machine: str) -> str:
    seeds = result["seeds"]
    lines = [f"## {dataset}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {epochs} epochs, T=4", "",
             f"Command: `{command}`; machine: {machine}.", "",
             "Test accuracy (%), mean ± sd over seeds. Paper: Table 3 (CIFAR-100, ResNet, 300 epochs), for reference.",
             "", "| row | " + " | ".join(METRICS.values()) + " | paper |", "|---" * (len(METRICS) + 2) + "|"]
    for key, row in result["rows"].items():
        paper = "–" if row["paper"] is None else f"{row['paper']:.2f}"
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(row[m]) for m in METRICS) + f" | {paper} |")
    lines += ["", "Paired by seed (a − b, percentage points): mean [95% t interval], wins/ties/losses, "
              "p of the exact sign-flip test / of the paired t-test (both two-sided; with n seeds the sign-flip "
              f"p cannot go below 2/2^n = {2 / 2 ** max(1, len(seeds)):.3g}).", "",
              "| a − b | " + " | ".join(METRICS.values()) + " | paper |", "|---" * (len(METRICS) + 2) + "|"]
    for c in result["comparisons"]:
        labels = result["rows"]
        pa, pb = labels[c["a"]]["paper"], labels[c["b"]]["paper"]
        paper = "–" if pa is None or pb is None else f"{pa - pb:+.2f}"
        cells = [f"{c[m]['mean']:+.2f} [{c[m]['low']:+.2f}, {c[m]['high']:+.2f}] {c[m]['wins']}/{c[m]['ties']}/"
                 f"{c[m]['losses']} p={c[m]['p']:.3f}/{c[m]['p_t']:.3f}" for m in METRICS]
        lines.append(f"| {c['a']} − {c['b']} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines) + "\n"


def plot(path: str, dataset: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    keys = list(rows)
    for i, metric in enumerate(("final", "per_t")):
        means = [rows[k][metric]["mean"] or 0 for k in keys]
        sds = [0 if rows[k][metric]["sd"] is None or math.isnan(rows[k][metric]["sd"]) else rows[k][metric]["sd"]
               for k in keys]
        ax1.errorbar([j + (i - 0.5) * 0.25 for j in range(len(keys))], means, yerr=sds, fmt="o", capsize=3,
                     label=METRICS[metric])
    ax1.set_xticks(range(len(keys)), keys, rotation=30), ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"{dataset}: mean ± sd over {len(result['seeds'])} seeds"), ax1.legend()
    comps = result["comparisons"]
    for i, metric in enumerate(("final", "per_t")):
        ys = [j + (i - 0.5) * 0.3 for j in range(len(comps))]
        means = [c[metric]["mean"] for c in comps]
        err = [[c[metric]["mean"] - c[metric]["low"] for c in comps],
               [c[metric]["high"] - c[metric]["mean"] for c in comps]]
        ax2.errorbar(means, ys, xerr=err, fmt="o", capsize=3, label=METRICS[metric])
    ax2.axvline(0, color="grey", lw=0.8)
    ax2.set_yticks(range(len(comps)), [f"{c['a']} − {c['b']}" for c in comps])
    ax2.set_xlabel("paired difference (points), 95% interval"), ax2.set_title("paired by seed"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str, dataset: str, rows: list[Row], seeds: list[int], epochs: int, command: str) -> str:
    import platform

    from .training.report import strict_json, write_text

    folder = os.path.join(out, dataset)
    result = analyse(folder, rows, seeds, epochs, dataset, log=lambda line: print(line, file=sys.stderr))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, one thread per run"
    text = markdown(dataset, result, epochs, command, machine)
    write_text(os.path.join(folder, "ablation.md"), text)
    write_text(os.path.join(folder, "ablation.json"), json.dumps(strict_json(result), indent=1, allow_nan=False))
    if len(result["seeds"]) >= 2:
        plot(os.path.join(folder, "ablation.png"), dataset, result)
    return text


# ------------------------------------------------------------------------------------------- the CLI

def check_settings(out: str, epochs_for: dict, *, write: bool) -> str | None:
    """An ablation folder holds runs of one length per data set: asking for another is refused (one line)
    instead of mixing runs; more seeds or λ values are added to it."""
    from .training.report import write_text

    for dataset, epochs in epochs_for.items():
        path = os.path.join(out, dataset, "settings.json")
        for folder in (out, os.path.join(out, dataset)):
            if os.path.exists(folder) and not os.path.isdir(folder):
                return f"{folder} is a file, not an ablation folder"
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    saved = json.load(f)["epochs"]
            except (OSError, ValueError, TypeError, KeyError) as e:
                return (f"{path} cannot be read ({type(e).__name__}); it records the runs' length: restore it, or "
                        f"choose another --out")
            if saved != epochs:
                return (f"{os.path.join(out, dataset)} holds {saved}-epoch runs; --epochs {epochs} needs another "
                        f"--out (or --epochs {saved})")
        elif write:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_text(path, json.dumps({"epochs": epochs}) + "\n")
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import data

    p = argparse.ArgumentParser(prog="python -m fastsnn.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", default=["digits"], choices=data.BUNDLED)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    p.add_argument("--epochs", type=int, help="per run (default: the data set's, 15)")
    p.add_argument("--lams", type=float, nargs="*", default=[0.0, 1e-3, 1e-2, 0.1, 0.2],
                   help="the λ sweep (default 0 0.001 0.01 0.1 0.2; 0 and 0.01 are Table 3 rows)")
    p.add_argument("--rows", nargs="+", choices=[r.key for r in TABLE3], help="Table 3 rows to run (default all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel runs (default: CPU count)")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="default runs/ablation")
    p.add_argument("--cache-dir", default=os.environ.get("FASTSNN_CACHE", os.path.expanduser("~/.cache/fastsnn")))
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .training.config import DEFAULTS

    for flag, value, ok in (("--seeds", args.seeds, args.seeds >= 1), ("--jobs", args.jobs, args.jobs >= 1),
                            ("--epochs", args.epochs, args.epochs is None or args.epochs >= 1)):
        if not ok:
            print(f"fastsnn.ablation: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if any(not (math.isfinite(lam) and lam >= 0) for lam in args.lams):
        print(f"fastsnn.ablation: error: --lams must be finite and >= 0, got {args.lams}", file=sys.stderr)
        return 2
    twice = sorted({lam for lam in args.lams if args.lams.count(lam) > 1})
    if twice:
        print(f"fastsnn.ablation: error: --lams lists {', '.join(f'{lam:g}' for lam in twice)} more than once (each "
              f"value is one run folder)", file=sys.stderr)
        return 2
    rows = [r for r in TABLE3 if args.rows is None or r.key in args.rows] + lam_rows(args.lams)
    seeds = list(range(args.seeds))
    epochs_for = {d: args.epochs or DEFAULTS[d]["epochs"] for d in args.dataset}
    command = "python -m fastsnn.ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    failures = []
    try:  # everything checked before anything is written
        problem = check_settings(args.out, epochs_for, write=False)
        if problem is None and not args.report_only:
            plan(args.dataset, rows, seeds, epochs_for, args.out, args.cache_dir)
            problem = check_settings(args.out, epochs_for, write=True)
    except AblationError as e:
        problem = str(e)
    if problem:
        print(f"fastsnn.ablation: error: {problem}", file=sys.stderr)
        return 2
    if not args.report_only:
        try:
            failures = run_all(args.dataset, rows, seeds, epochs_for, args.out, args.jobs, args.cache_dir,
                               log=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print("\nfastsnn.ablation: interrupted; run the same command again to continue (finished runs are "
                  "kept, interrupted ones resume)", file=sys.stderr)
            return 130
    for dataset in args.dataset:
        print(report(args.out, dataset, rows, seeds, epochs_for[dataset], command))
    for line in failures:
        print(f"fastsnn.ablation: failed run: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
