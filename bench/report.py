"""Turns a pytest-benchmark JSON into bench/results/<gpu>.json and <gpu>.md.

    pytest bench/ --benchmark-only --benchmark-json=bench-run.json
    python bench/report.py bench-run.json

The markdown has a table per op with the median time per provider, speed-ups of fastsnn over
SpikingJelly / eager / torch.compile, GB/s and its fraction of the copy bandwidth measured in the same
run, peak memory, the saved-bytes table, and whether each target of the issues was met (never asserted).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ["fastsnn", "spikingjelly", "eager", "compile"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "unknown"


def _rows(run: dict) -> dict:
    """group -> provider -> {median_us, extra}"""
    groups = defaultdict(dict)
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        provider = info.get("provider")
        if provider is None:
            continue
        groups[b["group"]][provider] = {"median_us": b["stats"]["median"] * 1e6, **info}
    return groups


def _speedup(cells, other):
    if "fastsnn" in cells and other in cells:
        return cells[other]["median_us"] / cells["fastsnn"]["median_us"]
    return None


def _fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def targets(groups) -> list[tuple[str, str]]:
    out = []
    lif = groups.get("lif fwdbwd T=4 64x65536 fp16", {})
    sj, copy = _speedup(lif, "spikingjelly"), lif.get("fastsnn", {}).get("copy_fraction")
    out.append(("LIF fwd+bwd T=4 64×65,536 fp16: ≥ 2× SpikingJelly triton and ≥ 80% of copy bandwidth",
                "not measured" if sj is None or copy is None else
                f"{'met' if sj >= 2 and copy >= 0.8 else 'NOT met'} ({sj:.2f}×, {100 * copy:.0f}% of copy)"))
    loss = groups.get("tser_loss fwdbwd T=4 B=256 C=1000 bf16", {})
    eager, comp = _speedup(loss, "eager"), _speedup(loss, "compile")
    out.append(("TSER loss T=4 B=256 C=1000 bf16: ≥ 5× eager and ≥ 2× torch.compile",
                "not measured" if eager is None or comp is None else
                f"{'met' if eager >= 5 and comp >= 2 else 'NOT met'} ({eager:.2f}× eager, {comp:.2f}× compile)"))
    step = next((g for name, g in groups.items() if name.startswith("train step sew_resnet34")), {})
    if "fastsnn" in step and "spikingjelly" in step:
        speed = step["fastsnn"]["images/s"] / step["spikingjelly"]["images/s"]
        mem = step["fastsnn"]["peak_mem_MB"] / step["spikingjelly"]["peak_mem_MB"]
        verdict = f"{'met' if speed >= 1.3 and mem <= 0.8 else 'NOT met'} ({speed:.2f}× images/s, {mem:.2f}× memory)"
    else:
        verdict = "not measured"
    out.append(("sew_resnet34 training step: ≥ 1.3× images/s of the SpikingJelly-neuron network at ≤ 0.8× its "
                "peak memory", verdict))
    return out


def markdown(run: dict, groups: dict, saved: dict) -> str:
    env = run.get("fastsnn_environment", {})
    lines = [f"# fastsnn benchmarks on {env.get('gpu', 'unknown')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, spikingjelly {env.get('spikingjelly')}, "
             f"python {env.get('python')}; {run.get('datetime', '')}", ""]
    if env.get("gpu") == "cpu":
        lines += ["**CPU run: these times say nothing about kernel speed** (without CUDA the fastsnn rows run "
                  "Triton's interpreter). Only the saved-bytes table is meaningful here.", ""]
    lines += ["## Targets", "", "| target | result |", "|---|---|"]
    lines += [f"| {t} | {r} |" for t, r in targets(groups)]
    lines += ["", "## Times (median)", "",
              "| case | " + " | ".join(f"{p} (µs)" for p in PROVIDERS)
              + " | vs SpikingJelly | vs eager | vs compile | fastsnn GB/s | of copy BW | fastsnn peak MB |",
              "|---" * (len(PROVIDERS) + 7) + "|"]
    for name in sorted(groups):
        cells = groups[name]
        fs = cells.get("fastsnn", {})
        lines.append(f"| {name} | " + " | ".join(_fmt(cells[p]["median_us"], 1) if p in cells else "—"
                                                for p in PROVIDERS)
                     + f" | {_fmt(_speedup(cells, 'spikingjelly'))} | {_fmt(_speedup(cells, 'eager'))} | "
                       f"{_fmt(_speedup(cells, 'compile'))} | {_fmt(fs.get('GB/s'), 1)} | "
                       f"{_fmt(fs.get('copy_fraction'), 3)} | {_fmt(fs.get('peak_mem_MB'), 1)} |")
    steps = {n: g for n, g in groups.items() if n.startswith("train step")}
    if steps:
        lines += ["", "## Training step", "", "| case | fastsnn images/s | SpikingJelly images/s | fastsnn peak MB | "
                  "SpikingJelly peak MB |", "|---|---|---|---|---|"]
        for name, g in sorted(steps.items()):
            f, s = g.get("fastsnn", {}), g.get("spikingjelly", {})
            lines.append(f"| {name} | {_fmt(f.get('images/s'), 1)} | {_fmt(s.get('images/s'), 1)} | "
                         f"{_fmt(f.get('peak_mem_MB'), 1)} | {_fmt(s.get('peak_mem_MB'), 1)} |")
    if saved:
        lines += ["", "## Bytes saved for backward in one training step (T = 4)", "",
                  "| network | device | batch | image | fastsnn MB | SpikingJelly neurons MB | ratio |",
                  "|---|---|---|---|---|---|---|"]
        for arch, r in saved.items():
            lines.append(f"| {arch} | {r['device']} | {r['batch']} | {r['image_size']} | {r['fastsnn_MB']} | "
                         f"{r['spikingjelly_MB']} | {r['ratio']} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        run = json.load(f)
    groups = _rows(run)
    env = run.get("fastsnn_environment", {})
    device = "cuda" if env.get("gpu", "cpu") != "cpu" else "cpu"
    saved_path = os.path.join(HERE, "results", f"saved_bytes-{device}.json")
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else {}
    name = _slug(env.get("gpu", "cpu"))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{name}.json"), "w") as f:
        json.dump({"environment": env, "groups": groups, "saved_bytes": saved,
                   "targets": dict(targets(groups))}, f, indent=2)
    with open(os.path.join(HERE, "results", f"{name}.md"), "w") as f:
        f.write(markdown(run, groups, saved))
    print(f"wrote bench/results/{name}.json and bench/results/{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
