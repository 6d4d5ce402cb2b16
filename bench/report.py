"""Turns benchmark rows of bench/ into results: <out>/<gpu>.json and <out>/<gpu>.md, and a one-screen summary on
stdout.

    FASTSNN_BENCH_ROWS=rows.jsonl pytest bench/ --benchmark-only      # a JSON line per row, as each is measured
    python bench/report.py rows.jsonl [more.jsonl | run.json ...] --out bench/results

Inputs are rows files (JSON lines, bench/common.py appends one as soon as a row is measured, so a run stopped
part-way keeps what it finished) or pytest-benchmark JSON files (their rows are in extra_info). Rows are keyed
on their fields (op, pass, T, shape/B/C, dtype, provider), never on display names. Every GPU row carries three
clocks: kernel_us (device time of its kernels), eager_us (back-to-back eager calls, CUDA events) and host_us
(CPU time per call), with floor_us (the bytes the op must move over the copy bandwidth measured in the same
run) and the fraction of copy bandwidth kernel_us reaches. Targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

PROVIDERS = ["fastsnn", "fastsnn-compiled", "fastsnn-unfused", "spikingjelly", "eager", "compile"]
KEYS = {"lif": ("pass_", "T", "shape", "dtype"), "tser_loss": ("pass_", "T", "B", "C", "dtype"),
        "bn_lif": ("pass_", "T", "shape", "dtype"), "spike_pack": ("pass_", "shape", "dtype"),
        "train_step": ("arch", "image", "batch", "dtype", "channels_last")}
CLOCKS = ("kernel_us", "eager_us", "host_us", "floor_us")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "unknown"


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    """(environment, rows) from rows files (JSON lines; a torn last line, from a run stopped mid-write, is
    skipped) and pytest-benchmark JSON files. A row measured twice (the same fields) counts once, the last."""
    env, rows = {}, {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        try:
            run = json.loads(text)
        except ValueError:
            run = None
        if isinstance(run, dict) and "benchmarks" in run:
            env = env or run.get("fastsnn_environment", {})
            found = [dict(b.get("extra_info", {})) for b in run["benchmarks"]]
        else:
            found = []
            for line in text.splitlines():
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        for row in found:
            if row.get("op") == "environment":
                env = env or {k: v for k, v in row.items() if k != "op"}
            elif "op" in row:
                rows[json.dumps({k: v for k, v in sorted(row.items()) if k in _identity(row)})] = row
    return env, list(rows.values())


def _identity(row: dict) -> set:
    return set(KEYS.get(row["op"], ())) | {"op", "provider", "name", "arch", "T"}


def grouped(rows: list[dict]) -> dict[str, dict[tuple, dict[str, dict]]]:
    """op -> case key -> provider -> row (the GPU rows)."""
    out = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["op"] in KEYS:
            out[r["op"]][tuple(r.get(k) for k in KEYS[r["op"]])][r["provider"]] = r
    return out


def _fmt(x, digits=1):
    if isinstance(x, float) and 0 < abs(x) < 10 ** -digits:
        return f"{x:.2g}"  # a CPU rehearsal's images/s, below what `digits` shows
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(cells, other, field="kernel_us"):
    """How many times fastsnn's `field` is below `other`'s."""
    mine, theirs = cells.get("fastsnn", {}).get(field), cells.get(other, {}).get(field)
    return theirs / mine if mine and theirs else None


def targets(groups, measured: bool = True) -> list[tuple[str, str]]:
    """(target, verdict) pairs; `measured` False (a rehearsal on the CPU): every verdict is "not measured"."""
    out = []
    lif = groups["lif"].get(("fwdbwd", 4, "64x65536", "fp16"), {})
    sj, copy = _ratio(lif, "spikingjelly"), lif.get("fastsnn", {}).get("copy_fraction")
    out.append(("LIF fwd+bwd T=4 64×65,536 fp16, kernel_us: ≥ 85% of copy bandwidth and ≥ 2× SpikingJelly's Triton",
                "not measured" if sj is None or copy is None else
                f"{'met' if sj >= 2 and copy >= 0.85 else 'NOT met'} ({100 * copy:.0f}% of copy, {sj:.2f}× SJ)"))
    for dtype in ("bf16", "fp32"):
        loss = groups["tser_loss"].get(("fwdbwd", 4, 256, 1000, dtype), {})
        eager, comp = _ratio(loss, "eager", "eager_us"), _ratio(loss, "compile", "eager_us")
        out.append((f"TSER loss T=4 B=256 C=1000 {dtype}, eager_us: ≥ 5× eager and ≥ 2× torch.compile",
                    "not measured" if eager is None or comp is None else
                    f"{'met' if eager >= 5 and comp >= 2 else 'NOT met'} ({eager:.2f}× eager, {comp:.2f}× compile)"))
    step = next((cells for key, cells in groups["train_step"].items() if key[0] == "sew_resnet34" and key[4]), {})
    mems = [step.get(p, {}).get("peak_mem_MB") for p in ("fastsnn", "spikingjelly")]
    if all(step.get(p, {}).get("images/s") for p in ("fastsnn", "spikingjelly")) and all(mems):
        speed = step["fastsnn"]["images/s"] / step["spikingjelly"]["images/s"]
        mem = mems[0] / mems[1]
        verdict = f"{'met' if speed >= 1.3 and mem <= 0.8 else 'NOT met'} ({speed:.2f}× images/s, {mem:.2f}× memory)"
    else:
        verdict = "not measured"
    out.append(("sew_resnet34 training step (channels_last): ≥ 1.3× images/s of the SpikingJelly-neuron network "
                "at ≤ 0.8× its peak memory", verdict))
    return out if measured else [(t, "not measured: not a GPU run") for t, _ in out]


def _measured(env: dict) -> bool:
    return not env.get("dry_run") and env.get("gpu") not in (None, "cpu")


def _op_table(name, cells_by_key, key_names) -> list[str]:
    lines = [f"## {name}", "", "| " + " | ".join(key_names) + " | provider | path | kernel_us | eager_us | host_us | "
             "floor_us | of copy BW | bytes | kernel bytes | launches | peak MB | fastsnn kernel speed-up |",
             "|---" * (len(key_names) + 13) + "|"]
    for key in sorted(cells_by_key, key=lambda k: tuple(str(v) for v in k)):
        cells = cells_by_key[key]
        for provider in [p for p in PROVIDERS if p in cells]:
            r = cells[provider]
            speedup = _ratio(cells, provider) if provider != "fastsnn" else None
            lines.append("| " + " | ".join(_fmt(v) for v in key) + f" | {provider} | {r.get('path', '—')} | "
                         + " | ".join(_fmt(r.get(c), 2) for c in CLOCKS)
                         + f" | {_fmt(r.get('copy_fraction'), 3)} | {_fmt(r.get('bytes'))} | "
                         f"{_fmt(r.get('kernel_bytes'))} | {_fmt(r.get('launches'))} | {_fmt(r.get('peak_mem_MB'))} | "
                         f"{'—' if speedup is None else f'{speedup:.2f}×'} |")
    return lines + [""]


TITLES = {"lif": "LIF (bytes: x and spikes forward; dL/ds, x, dL/dx backward)",
          "tser_loss": "TSER loss, forward + backward (bytes: read z and u once, write dL/dz once)",
          "bn_lif": "BatchNorm + LIF, forward + backward (bytes: x and spikes forward; dL/ds, x, dL/dx backward; "
                    "fused BatchNorm needs a statistics pass each way, see kernel bytes)",
          "spike_pack": "Spikes as bits (bytes: the spikes at full width once, their bits once)"}


def markdown(env: dict, rows: list[dict]) -> str:
    groups = grouped(rows)
    lines = [f"# fastsnn benchmarks on {env.get('gpu', 'unknown')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, spikingjelly {env.get('spikingjelly')}, "
             f"python {env.get('python')}; copy bandwidth {env.get('copy_GB/s', '—')} GB/s (read + write, measured in "
             "this run)", "",
             "Clocks: **kernel_us** = device time of the call's kernels (torch.profiler CUDA activity, median of the "
             "rounds, L2 flushed before each call; floors and bandwidth fractions use it); **eager_us** = back-to-back "
             "eager calls timed with CUDA events, one sync at the end (what a training step sees); **host_us** = the "
             "process's CPU time per call. kernel bytes: the tensors the provider's Triton launches take.", ""]
    if env.get("dry_run") or env.get("gpu") == "cpu":
        lines += ["**Not a GPU run: these times say nothing about kernel speed** (the fastsnn rows ran Triton's "
                  "interpreter at tiny sizes, and kernel_us is a wall-clock time). Only the saved-bytes and "
                  "host-time tables are meaningful here.", ""]
    lines += ["## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {t} | {r} |" for t, r in targets(groups, _measured(env))] + [""]
    for op in ("lif", "tser_loss", "bn_lif", "spike_pack"):
        if groups[op]:
            lines += _op_table(TITLES[op], groups[op], KEYS[op])
    if groups["train_step"]:
        lines += ["## Training step (the same loss, fastsnn.tser_loss, for every provider; floor: the activations "
                  "saved for backward written once and read once)", "",
                  "| arch | image | batch | dtype | channels_last | provider | path | images/s | kernel_us | "
                  "eager_us | "
                  "host_us | floor_us | saved MB | peak MB |", "|---" * 14 + "|"]
        for key, cells in sorted(groups["train_step"].items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            for provider in [p for p in PROVIDERS if p in cells]:
                r = cells[provider]
                lines.append("| " + " | ".join(_fmt(v) for v in key) + f" | {provider} | {r.get('path')} | "
                             f"{_fmt(r.get('images/s'))} | " + " | ".join(_fmt(r.get(c), 0) for c in CLOCKS)
                             + f" | {_mb(r.get('saved_bytes'))} | {_fmt(r.get('peak_mem_MB'))} |")
        lines.append("")
    teacher = [r for r in rows if r["op"] == "teacher_share"]
    if teacher:
        lines += ["## The teacher's share of a distillation step (teacher forward: eval, no_grad, the student's "
                  "autocast and memory format)", "",
                  "| student | teacher | image | batch | dtype | path | teacher µs | step µs | share | clock |",
                  "|---" * 10 + "|"]
        lines += [f"| {r['arch']} | {r['teacher']} | {r['image']} | {r['batch']} | {r['dtype']} | {r['path']} | "
                  f"{_fmt(r['teacher_kernel_us'], 0)} | {_fmt(r['step_kernel_us'], 0)} | {r['teacher_share']} | "
                  f"{r['kernel_method']} |" for r in teacher] + [""]
    host = [r for r in rows if r["op"] == "host"]
    if host:
        lines += ["## Host time per eager forward+backward (kernel launches no-op'd)", "",
                  "| op | µs per call | bare autograd.Function µs | ratio (target ≤ 1.5) |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['host_us']} | {r['bare_function_us']} | {r['ratio']} |" for r in host] + [""]
    saved = [r for r in rows if r["op"] == "saved_bytes"]
    if saved:
        lines += ["## Activation bytes saved for backward in one training step (fp32, parameters left out)", "",
                  "| network | T | batch | image | fastsnn (fused BN) MB | fastsnn recompute MB | fastsnn unfused MB | "
                  "SpikingJelly neurons MB "
                  "| ratio fused | ratio recompute | ratio unfused |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arch']} | {r.get('T', 4)} | {r['batch']} | {r['image']} | {r['fastsnn_bytes'] / 2**20:.1f} | "
                  f"{_mb(r.get('fastsnn_recompute_bytes'))} | "
                  f"{_mb(r.get('fastsnn_unfused_bytes'))} | {r['spikingjelly_bytes'] / 2**20:.1f} | {r['ratio']} | "
                  f"{_fmt(r.get('ratio_recompute'))} | {_fmt(r.get('ratio_unfused'))} |" for r in saved] + [""]
    return "\n".join(lines)


def _mb(nbytes) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def summary(env: dict, rows: list[dict]) -> str:
    groups = grouped(rows)
    lines = [f"fastsnn on {env.get('gpu')} (torch {env.get('torch')}, triton {env.get('triton')}), "
             f"copy {env.get('copy_GB/s', '—')} GB/s"
             + (" -- DRY RUN, times meaningless" if env.get("dry_run") else "")]
    for op in ("lif", "tser_loss", "bn_lif", "spike_pack"):
        for key, cells in sorted(groups[op].items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            if "fastsnn" not in cells:
                continue
            f = cells["fastsnn"]
            others = ", ".join(f"{p} {_ratio(cells, p):.2f}x" for p in PROVIDERS[1:] if _ratio(cells, p))
            lines.append(f"{op} {' '.join(str(k) for k in key)}: kernel {_fmt(f.get('kernel_us'))} us (floor "
                         f"{_fmt(f.get('floor_us'))}, {_fmt(f.get('copy_fraction'), 2)} of copy), eager "
                         f"{_fmt(f.get('eager_us'))}, host {_fmt(f.get('host_us'))}; kernel speed-up vs "
                         f"{others or '—'}")
    for t, r in targets(groups, _measured(env)):
        lines.append(f"target: {t}: {r}")
    return "\n".join(lines)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="rows files (JSON lines) or pytest-benchmark JSON files")
    parser.add_argument("--out", required=True, help="folder for <gpu>.json and <gpu>.md")
    args = parser.parse_args(argv)
    env, rows = load(args.runs)
    name = _slug(env.get("gpu", "cpu")) + ("-dry-run" if env.get("dry_run") else "")
    os.makedirs(args.out, exist_ok=True)
    gpu_rows = [r for r in rows if r.get("gpu_row")]
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"environment": env, "rows": gpu_rows, "cpu_rows": [r for r in rows if not r.get("gpu_row")],
                   "targets": dict(targets(grouped(gpu_rows), _measured(env)))}, f, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(markdown(env, rows))
    print(summary(env, rows))
    print(f"wrote {os.path.join(args.out, name)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
