"""Turns a pytest-benchmark JSON of bench/ into results: <out>/<gpu>.json and <out>/<gpu>.md, and a one-screen
summary on stdout.

    pytest bench/ --benchmark-only --benchmark-json=run.json
    python bench/report.py run.json [run2.json ...] --out bench/results

Rows are keyed on the fields each benchmark records in extra_info (op, pass, T, shape/B/C, dtype,
provider), never on display names. Beside every GPU time: the code path that ran, the bytes the op must
move, the predicted floor (those bytes over the device-to-device copy bandwidth measured in the same run)
and the fraction of copy bandwidth reached. Targets are reported, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

PROVIDERS = ["fastsnn", "spikingjelly", "eager", "compile"]
KEYS = {"lif": ("pass_", "T", "shape", "dtype"), "tser_loss": ("pass_", "T", "B", "C", "dtype"),
        "train_step": ("arch", "image", "batch", "dtype", "channels_last")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "unknown"


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    """(environment, rows): every benchmark's extra_info plus its median time, from one or more runs."""
    env, rows = {}, []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        env = env or run.get("fastsnn_environment", {})
        for b in run["benchmarks"]:
            info = dict(b.get("extra_info", {}))
            if "op" in info:
                info.setdefault("median_us", b["stats"]["median"] * 1e6)
                rows.append(info)
    return env, rows


def grouped(rows: list[dict]) -> dict[str, dict[tuple, dict[str, dict]]]:
    """op -> case key -> provider -> row."""
    out = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["op"] in KEYS:
            out[r["op"]][tuple(r.get(k) for k in KEYS[r["op"]])][r["provider"]] = r
    return out


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(cells, other, field="median_us"):
    if "fastsnn" in cells and other in cells and cells["fastsnn"].get(field):
        return cells[other][field] / cells["fastsnn"][field]
    return None


def targets(groups) -> list[tuple[str, str]]:
    out = []
    lif = groups["lif"].get(("fwdbwd", 4, "64x65536", "fp16"), {})
    sj, copy = _ratio(lif, "spikingjelly"), lif.get("fastsnn", {}).get("copy_fraction")
    out.append(("LIF fwd+bwd T=4 64×65,536 fp16: ≥ 2× SpikingJelly triton and ≥ 80% of copy bandwidth",
                "not measured" if sj is None or copy is None else
                f"{'met' if sj >= 2 and copy >= 0.8 else 'NOT met'} ({sj:.2f}×, {100 * copy:.0f}% of copy)"))
    loss = groups["tser_loss"].get(("fwdbwd", 4, 256, 1000, "bf16"), {})
    eager, comp = _ratio(loss, "eager"), _ratio(loss, "compile")
    out.append(("TSER loss T=4 B=256 C=1000 bf16: ≥ 5× eager and ≥ 2× torch.compile",
                "not measured" if eager is None or comp is None else
                f"{'met' if eager >= 5 and comp >= 2 else 'NOT met'} ({eager:.2f}× eager, {comp:.2f}× compile)"))
    step = next((cells for key, cells in groups["train_step"].items() if key[0] == "sew_resnet34" and key[4]), {})
    mems = [step.get(p, {}).get("peak_mem_MB") for p in ("fastsnn", "spikingjelly")]
    if "fastsnn" in step and "spikingjelly" in step and all(mems):
        speed = step["fastsnn"]["images/s"] / step["spikingjelly"]["images/s"]
        mem = mems[0] / mems[1]
        verdict = f"{'met' if speed >= 1.3 and mem <= 0.8 else 'NOT met'} ({speed:.2f}× images/s, {mem:.2f}× memory)"
    else:
        verdict = "not measured"
    out.append(("sew_resnet34 training step (channels_last): ≥ 1.3× images/s of the SpikingJelly-neuron network "
                "at ≤ 0.8× its peak memory", verdict))
    return out


def _op_table(name, cells_by_key, key_names) -> list[str]:
    lines = [f"## {name}", "", "| " + " | ".join(key_names) + " | provider | path | µs | floor µs | of copy BW | "
             "launches | peak MB | fastsnn speed-up |", "|---" * (len(key_names) + 8) + "|"]
    for key in sorted(cells_by_key, key=lambda k: tuple(str(v) for v in k)):
        cells = cells_by_key[key]
        for provider in [p for p in PROVIDERS if p in cells]:
            r = cells[provider]
            speedup = _ratio(cells, provider) if provider != "fastsnn" else None
            lines.append("| " + " | ".join(_fmt(v) for v in key) + f" | {provider} | {r.get('path', '—')} | "
                         f"{_fmt(r['median_us'])} | {_fmt(r.get('floor_us'), 2)} | {_fmt(r.get('copy_fraction'), 3)} | "
                         f"{_fmt(r.get('launches'))} | {_fmt(r.get('peak_mem_MB'))} | "
                         f"{'—' if speedup is None else f'{speedup:.2f}×'} |")
    return lines + [""]


def markdown(env: dict, rows: list[dict]) -> str:
    groups = grouped(rows)
    lines = [f"# fastsnn benchmarks on {env.get('gpu', 'unknown')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, spikingjelly {env.get('spikingjelly')}, "
             f"python {env.get('python')}; device-to-device copy {env.get('copy_GB/s', '—')} GB/s (read + write, "
             "measured in this run)", ""]
    if env.get("dry_run") or env.get("gpu") == "cpu":
        lines += ["**Not a GPU run: these times say nothing about kernel speed** (the fastsnn rows ran Triton's "
                  "interpreter at tiny sizes). Only the saved-bytes and host-time tables are meaningful here.", ""]
    lines += ["## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {t} | {r} |" for t, r in targets(groups)] + [""]
    lines += _op_table("LIF (µs per call; floor = bytes moved / copy bandwidth)", groups["lif"], KEYS["lif"])
    lines += _op_table("TSER loss, forward + backward (floor: read z and u once, write dL/dz once)",
                       groups["tser_loss"], KEYS["tser_loss"])
    if groups["train_step"]:
        lines += ["## Training step", "", "| arch | image | batch | dtype | channels_last | provider | path | "
                  "images/s | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
        for key, cells in sorted(groups["train_step"].items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            for provider, r in cells.items():
                lines.append("| " + " | ".join(_fmt(v) for v in key) + f" | {provider} | {r.get('path')} | "
                             f"{_fmt(r.get('images/s'))} | {_fmt(r.get('peak_mem_MB'))} |")
        lines.append("")
    host = [r for r in rows if r["op"] == "host"]
    if host:
        lines += ["## Host time per eager forward+backward (kernel launches no-op'd)", "",
                  "| op | µs per call | bare autograd.Function µs | ratio (target ≤ 1.5) |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['host_us']} | {r['bare_function_us']} | {r['ratio']} |" for r in host] + [""]
    saved = [r for r in rows if r["op"] == "saved_bytes"]
    if saved:
        lines += ["## Activation bytes saved for backward in one training step (fp32, parameters left out)", "",
                  "| network | T | batch | image | fastsnn (fused BN) MB | fastsnn unfused MB | SpikingJelly neurons MB "
                  "| ratio fused | ratio unfused |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arch']} | {r.get('T', 4)} | {r['batch']} | {r['image']} | {r['fastsnn_bytes'] / 2**20:.1f} | "
                  f"{_mb(r.get('fastsnn_unfused_bytes'))} | {r['spikingjelly_bytes'] / 2**20:.1f} | {r['ratio']} | "
                  f"{_fmt(r.get('ratio_unfused'))} |" for r in saved] + [""]
    return "\n".join(lines)


def _mb(nbytes) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def summary(env: dict, rows: list[dict]) -> str:
    groups = grouped(rows)
    lines = [f"fastsnn on {env.get('gpu')} (torch {env.get('torch')}, triton {env.get('triton')}), "
             f"copy {env.get('copy_GB/s', '—')} GB/s" + (" -- DRY RUN, times meaningless" if env.get("dry_run") else "")]
    for op in ("lif", "tser_loss"):
        for key, cells in sorted(groups[op].items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            if "fastsnn" not in cells:
                continue
            f = cells["fastsnn"]
            others = ", ".join(f"{p} {_ratio(cells, p):.2f}x" for p in PROVIDERS[1:] if p in cells)
            lines.append(f"{op} {' '.join(str(k) for k in key)}: {f['median_us']:.1f} us (floor "
                         f"{_fmt(f.get('floor_us'), 1)}, {_fmt(f.get('copy_fraction'), 2)} of copy) vs {others}")
    for t, r in targets(groups):
        lines.append(f"target: {t}: {r}")
    return "\n".join(lines)


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", required=True, help="folder for <gpu>.json and <gpu>.md")
    args = parser.parse_args(argv)
    env, rows = load(args.runs)
    name = _slug(env.get("gpu", "cpu")) + ("-dry-run" if env.get("dry_run") else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"environment": env, "rows": rows, "targets": dict(targets(grouped(rows)))}, f, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(markdown(env, rows))
    print(summary(env, rows))
    print(f"wrote {os.path.join(args.out, name)}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
