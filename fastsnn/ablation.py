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
import contextlib
import itertools
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
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

def run_state(folder: str, epochs: int) -> str:
    """"done", "resume" (a checkpoint to continue from) or "new"."""
    summary = os.path.join(folder, "metrics.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            if json.load(f).get("epochs") == epochs:
                return "done"
    return "resume" if os.path.isfile(os.path.join(folder, "last.pt")) else "new"


def job_argv(dataset: str, row: Row, seed: int, folder: str, epochs: int, cache_dir: str) -> list[str] | None:
    state = run_state(folder, epochs)
    if state == "done":
        return None
    if state == "resume":
        return ["--resume", os.path.join(folder, "last.pt"), "--quiet", "--threads", "1", "--epochs", str(epochs)]
    return ["--dataset", dataset, *row.flags, "--seed", str(seed), "--epochs", str(epochs), "--out", folder,
            "--overwrite", "--quiet", "--threads", "1", "--no-tensorboard", "--cache-dir", cache_dir]


def _train_job(argv: list[str], log_path: str) -> tuple[list[str], int]:
    """One training run in a worker process, its output in ``log_path``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .training import main

    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(argv)
    return argv, code


def _teacher_job(dataset: str, seed: int, cache_dir: str, log_path: str) -> tuple[list[str], int]:
    from .training import config as C
    from .training.run import train_nested
    from .training.teacher import cached_teacher

    cfg = C.TrainConfig(dataset=dataset, seed=seed, cache_dir=cache_dir, threads=1)
    C.resolve(cfg)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        cached_teacher(cfg, print, train_nested)
    return [f"teacher {dataset} seed {seed}"], 0


def run_all(datasets, rows, seeds, epochs_for, out, jobs, cache_dir, log=print) -> list[str]:
    """Trains every missing run; returns the failures (argv and exit code)."""
    import multiprocessing

    failures = []
    for dataset in datasets:
        os.makedirs(os.path.join(out, dataset), exist_ok=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        teachers = [pool.submit(_teacher_job, d, s, cache_dir, os.path.join(out, d, "teachers.log"))
                    for d in datasets for s in seeds]
        for future in as_completed(teachers):
            future.result()
        futures = []
        for dataset, seed, row in itertools.product(datasets, seeds, rows):
            folder = os.path.join(out, dataset, row.key, f"seed{seed}")
            argv = job_argv(dataset, row, seed, folder, epochs_for[dataset], cache_dir)
            if argv is not None:
                os.makedirs(folder, exist_ok=True)
                futures.append(pool.submit(_train_job, argv, os.path.join(out, dataset, row.key, f"seed{seed}.log")))
        log(f"ablation: {len(futures)} runs to train with {jobs} processes")
        for i, future in enumerate(as_completed(futures), 1):
            argv, code = future.result()
            if code != 0:
                failures.append(f"exit {code}: python -m fastsnn.train {' '.join(argv)}")
            log(f"ablation: {i}/{len(futures)} runs finished" + (f" (failed: exit {code})" if code else ""))
    return failures


# ---------------------------------------------------------------------------------------- statistics

def run_metrics(folder: str) -> dict | None:
    """The four metrics of a finished run folder, or None when it has not finished."""
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            summary = json.load(f)
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if not history or summary.get("epochs") != len(history):
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


def analyse(folder: str, rows: list[Row], seeds: list[int]) -> dict:
    """Per row and metric the values by seed (seeds where every row finished), mean and sd; the paired
    comparisons; the comparisons of each λ row against TS."""
    runs = {r.key: {s: run_metrics(os.path.join(folder, r.key, f"seed{s}")) for s in seeds} for r in rows}
    complete = [s for s in seeds if all(runs[r.key][s] is not None for r in rows)]
    table = {}
    for r in rows:
        table[r.key] = {"label": r.label, "paper": PAPER_TABLE3.get(r.key)}
        for m in METRICS:
            values = [runs[r.key][s][m] for s in complete]
            table[r.key][m] = {"values": values, **dict(zip(("mean", "sd"), mean_sd(values) if values else (None,) * 2))}
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
        err = [[c[metric]["mean"] - c[metric]["low"] for c in comps], [c[metric]["high"] - c[metric]["mean"] for c in comps]]
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
    result = analyse(folder, rows, seeds)
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
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f).get("epochs")
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
    rows = [r for r in TABLE3 if args.rows is None or r.key in args.rows] + lam_rows(args.lams)
    seeds = list(range(args.seeds))
    epochs_for = {d: args.epochs or DEFAULTS[d]["epochs"] for d in args.dataset}
    command = "python -m fastsnn.ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    failures = []
    problem = check_settings(args.out, epochs_for, write=not args.report_only)
    if problem:
        print(f"fastsnn.ablation: error: {problem}", file=sys.stderr)
        return 2
    if not args.report_only:
        try:
            failures = run_all(args.dataset, rows, seeds, epochs_for, args.out, args.jobs, args.cache_dir)
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
