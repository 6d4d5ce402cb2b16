#!/usr/bin/env bash
# One prepared GPU run: every GPU claim of fastsnn measured in one command, within a time budget it enforces.
#
#   bash bench/gpu.sh [--out DIR] [--budget SECONDS]     on a bare, offline GPU machine, from the repo root
#   bash bench/gpu.sh --dry-run [--out DIR]             the same script on a CPU-only machine (and in CI):
#                                                       tiny sizes under Triton's interpreter, same files
#
# Installs nothing from the network: fastsnn is used from the working tree (PYTHONPATH), SpikingJelly and
# its two missing requirements (loguru, SciencePlots) from wheels gathered beforehand into the git-ignored
# .whl/ folder (see bench/README.md). Steps, slowest last, each cut off when the budget runs out:
#   1. versions, the GPU, the device-to-device copy bandwidth (measured once, passed to every step)
#   2. correctness on the device: the kernel test bodies (tests/test_lif.py, test_bn_lif.py, test_tser_loss.py,
#      test_properties.py) compiled vs the reference in fp32/fp16/bf16, one training step of every student,
#      and `python -m fastsnn.train` for one epoch of digits (tests/test_cuda.py)
#   3. the headline rows: LIF fwd+bwd T=4 64×65,536 (fp16/bf16/fp32) vs SpikingJelly Triton, eager and
#      torch.compile; the TSER loss at T=4, B=256, C=1000; host time per call
#   4. sew_resnet34 / spiking_resnet19 training steps vs SpikingJelly neurons, with and without channels_last,
#      and the bytes saved for backward
#   5. what the budget leaves: the other LIF passes and shapes, the rest of the loss grid
#   6. bench/report.py: <gpu>.json and <gpu>.md with the predicted floor beside each time, a summary last
# Each benchmark group is its own pytest run, so one cut off by the budget loses only itself. Everything
# it writes goes to --out (default $OUT, else bench/results/run): env.txt, correctness.log, bench.log,
# <gpu>.json, <gpu>.md, summary.txt (at most 8 files: what the GPU machine can send back).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
OUTDIR=${OUT:-$REPO/bench/results/run}
BUDGET=
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "gpu.sh: unknown argument $1 (allowed: --dry-run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
# shares of the budget: correctness 35%, then the benchmark groups (below); the CPU rehearsal is slower
[ -z "$BUDGET" ] && { [ $DRY -eq 1 ] && BUDGET=2000 || BUDGET=420; }
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SHARE_SECONDS LOG COMMAND...: runs COMMAND with at most SHARE seconds (and never past the budget)
FAILED=""
step() {
    local name=$1 share=$2 log=$3; shift 3
    local limit; limit=$(left)
    [ "$share" -lt "$limit" ] && limit=$share
    if [ "$limit" -lt 10 ]; then
        echo "== $name: SKIPPED, the budget is spent" | tee -a "$log"
        FAILED="$FAILED $name(skipped)"
        return
    fi
    echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)" | tee -a "$log"
    local t0; t0=$(date +%s)
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$log"
    [ $rc -ne 0 ] && FAILED="$FAILED $name(rc=$rc)"
    tail -n 4 "$log"
}

# 0. dependencies from the carried wheels (no network), fastsnn from the tree
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastsnn-site \
        .whl/*.whl || { echo "gpu.sh: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/fastsnn-site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu.sh: no .whl/ folder: using the Python environment as it is (SpikingJelly rows skip if it is missing)"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. environment and copy bandwidth
ENV=$OUTDIR/env.txt
{
    date -u
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY - <<'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)
try:
    import spikingjelly, importlib.metadata as md
    print("spikingjelly", md.version("spikingjelly"))
except Exception as e:
    print("spikingjelly: not importable:", e)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "sm", torch.cuda.get_device_capability(0))
    sys.path.insert(0, "bench")
    from common import copy_bandwidth_gbs
    print(f"copy_GB/s {copy_bandwidth_gbs():.1f}")
EOF
} > "$ENV" 2>&1
cat "$ENV"
COPY=$(sed -n 's/^copy_GB\/s //p' "$ENV")
[ -n "$COPY" ] && export FASTSNN_COPY_GBS=$COPY

if [ $DRY -eq 1 ]; then
    export FASTSNN_BENCH_DRY_RUN=1
    CORRECTNESS=(env -u FASTSNN_COMPILED $PY -m pytest -q -p no:cacheprovider --quick -x -k "cpu or test_cuda"
                 test_lif.py test_bn_lif.py test_spike_storage.py test_tser_loss.py test_properties.py test_cuda.py)
else
    XDIST=()
    $PY -c "import xdist" 2> /dev/null && XDIST=(-n 8)
    CORRECTNESS=(env FASTSNN_COMPILED=1 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" --full --maxfail=50 -k cuda
                 test_lif.py test_bn_lif.py test_spike_storage.py test_tser_loss.py test_properties.py test_cuda.py)
fi

# 2. correctness on the device
LOG=$OUTDIR/correctness.log
pushd tests > /dev/null
step correctness $(( BUDGET * 35 / 100 )) "$LOG" "${CORRECTNESS[@]}"
popd > /dev/null

# 3.-5. benchmark rows, each group its own pytest run (a group cut off by the budget loses only itself); the
# raw pytest-benchmark files stay in a scratch folder, report.py gathers them into --out
BLOG=$OUTDIR/bench.log
RAW=$(mktemp -d)
bench() {  # bench NAME SHARE_PERCENT -k-EXPRESSION
    step "$1" $(( BUDGET * $2 / 100 )) "$BLOG" $PY -m pytest bench -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$RAW/$1.json" -k "$3"
}
if [ $DRY -eq 1 ]; then
    bench lif-headline 8 "test_lif and fwdbwd and -4- and 64x65536"
    bench loss-headline 8 "test_tser_loss and -4-64-"
    bench host-time 3 "test_host"
    bench training-steps 25 "test_train_step or test_saved"
    bench extra-rows 10 "test_lif and fwd- and -2- and 64x128x28x28 and fp16 and fastsnn"
else
    bench lif-headline 8 "test_lif and fwdbwd and -4- and 64x65536 and not compile"
    bench loss-headline 5 "test_tser_loss and -4-256-1000- and not compile"
    bench host-time 2 "test_host"
    bench training-steps 25 "test_train_step or test_saved"
    bench compile-rows 15 "(test_lif and fwdbwd and -4- and 64x65536 and compile) or (test_tser_loss and -4-256-1000- and compile)"
    bench extra-rows 100 "(test_lif and -4- and 64x128x28x28 and fp16) or (test_lif and -4- and 64x65536 and not fwdbwd) or (test_tser_loss and not -4-256-1000-)"
fi

# the memory report: bytes saved per step and peak memory against SpikingJelly neurons (bench/memory.py), its
# files and log in one folder (the machine sends back few top-level names)
mkdir -p "$OUTDIR/memory"
if [ $DRY -eq 1 ]; then
    step memory $(( BUDGET * 5 / 100 )) "$OUTDIR/memory/memory.log" $PY bench/memory.py --T 4 \
        --arch spiking_resnet19 --out "$OUTDIR/memory"
else
    step memory $(( BUDGET * 5 / 100 )) "$OUTDIR/memory/memory.log" $PY bench/memory.py --device cuda --T 2 4 \
        --out "$OUTDIR/memory"
fi

# 6. results and the summary, last on stdout
RUNS=()
for f in "$RAW"/*.json; do [ -s "$f" ] && RUNS+=("$f"); done
if [ ${#RUNS[@]} -gt 0 ]; then
    $PY bench/report.py "${RUNS[@]}" --out "$OUTDIR" > "$OUTDIR/summary.txt" 2>&1 || FAILED="$FAILED report"
fi
echo
echo "===== fastsnn GPU run summary ($(( $(date +%s) - START ))s of a ${BUDGET}s budget) ====="
grep -E "passed|failed" "$LOG" | tail -n 1
cat "$OUTDIR/summary.txt" 2> /dev/null
if [ -n "$FAILED" ]; then
    echo "gpu.sh: steps that did not finish cleanly:$FAILED"
    exit 1
fi
