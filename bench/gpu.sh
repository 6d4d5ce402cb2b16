#!/usr/bin/env bash
# One prepared GPU run: every GPU claim of fastsnn measured in one command, within a time budget it enforces.
#
#   bash bench/gpu.sh [--out DIR] [--budget SECONDS]   on a bare, offline GPU machine, from the repo root
#   bash bench/gpu.sh --rehearse [--out DIR]          the same steps, shares and code paths on a CPU-only machine
#                                                     (tiny sizes, Triton's interpreter); --dry-run is its old name
#
# Installs nothing from the network: fastsnn is used from the working tree (PYTHONPATH), SpikingJelly 2.0.0 and
# its two requirements the machine lacks (loguru, SciencePlots) from the git-ignored .whl/ folder that
# `bash bench/wheels.sh` fills (carry it: the device tool's `carry: [".whl"]`). The steps, their budget and the
# files written are described in bench/gpu.py; --out defaults to $OUT, else bench/results/run.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${OUT:-$REPO/bench/results/run}
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse|--dry-run) ARGS+=(--rehearse) ;;
        --out) OUTDIR=$2; shift ;;
        --budget) ARGS+=(--budget "$2"); shift ;;
        *) echo "gpu.sh: unknown argument $1 (allowed: --rehearse, --dry-run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
# SpikingJelly's CUDA LIF: its Triton kernels, so that a fallback to its PyTorch loop raises instead of being timed
export SJ_LIF_CUDA_IMPLEMENTATION=triton PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl > /dev/null 2>&1; then
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        || { echo "gpu.sh: installing the carried wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu.sh: no .whl/ folder: fill it with 'bash bench/wheels.sh' and carry it (device run: carry [\".whl\"]); going on without the SpikingJelly rows unless this Python has SpikingJelly"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
exec $PY bench/gpu.py --out "$OUTDIR" "${ARGS[@]}"
