#!/usr/bin/env bash
# Host time per call of this checkout against another commit, interleaved run by run so that a slow spell of a
# shared machine hits both alike:
#   git worktree add /tmp/old 7d1dbcb && cp bench/test_bench_host.py /tmp/old/bench/   # the same timing code
#   RUNS=8 bash bench/results/cpu-host/compare.sh /tmp/old <out folder>
# writes <out>/rows-<this commit>.jsonl and <out>/rows-<other commit>.jsonl and prints, per op, the runs' ratios
# (op / bare autograd Function) and least times.
set -euo pipefail
here="$(cd "$(dirname "$0")/../../.." && pwd)"
other="$(cd "$1" && pwd)"
out="$(mkdir -p "$2" && cd "$2" && pwd)"
mine="$out/rows-$(git -C "$here" rev-parse --short HEAD).jsonl"
theirs="$out/rows-$(git -C "$other" rev-parse --short HEAD).jsonl"
rm -f "$mine" "$theirs"
for _ in $(seq "${RUNS:-3}"); do
  (cd "$here" && FASTSNN_BENCH_ROWS="$mine" python -m pytest -q -p no:cacheprovider bench/test_bench_host.py \
     --benchmark-only >/dev/null)
  (cd "$other" && PYTHONPATH="$other" FASTSNN_BENCH_ROWS="$theirs" python -m pytest -q -p no:cacheprovider \
     bench/test_bench_host.py --benchmark-only >/dev/null)
done
python - "$mine" "$theirs" <<'PY'
import collections, json, statistics, sys
for path in sys.argv[1:]:
    runs = collections.defaultdict(list)
    for line in open(path):
        row = json.loads(line)
        if row.get("op") == "host":
            runs[row["name"]].append(row)
    for name, rows in runs.items():
        ratios = sorted(r["ratio"] for r in rows)
        print(f"{path.rsplit('/', 1)[-1]} {name}: ratio {ratios[0]:.2f}-{ratios[-1]:.2f} (median "
              f"{statistics.median(ratios):.3f}), least op {min(r['host_us'] for r in rows):.1f} us, least bare "
              f"{min(r['bare_function_us'] for r in rows):.1f} us")
PY
