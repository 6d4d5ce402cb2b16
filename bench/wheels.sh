#!/usr/bin/env bash
# Fills the git-ignored .whl/ folder with what bench/gpu.sh installs offline on the GPU machine: SpikingJelly
# 2.0.0 and the two of its requirements that machine's Python lacks (loguru, SciencePlots), as wheels for its
# Python (3.12 by default; PYTHON_VERSION=3.11 for another). Needs network here, none there.
#
#   bash bench/wheels.sh            then carry .whl with the run (the device tool's carry: [".whl"])
set -eu
cd "$(dirname "$0")/.."
PYV=${PYTHON_VERSION:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl spikingjelly==2.0.0 loguru SciencePlots
ls -1 .whl
