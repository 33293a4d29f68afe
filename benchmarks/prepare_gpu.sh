#!/usr/bin/env bash
# Prepare local/gpu/ (git-ignored) for benchmarks/gpu_check.sh on a GPU machine that has no
# package index and no ../shared: the wheels its image lacks and the CIFAR-10 JPEG tarball.
#
#   bash benchmarks/prepare_gpu.sh [DIR]        # default DIR: local/gpu   (or: make gpu-bundle)
#
# Then, with DIR copied next to the checkout on the GPU machine (kept under 60 MiB so it copies
# quickly):
#   bash benchmarks/gpu_check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-local/gpu}
SHARED=${SHARED_CIFAR:-../shared/data/cifar10-jpeg.tar.gz}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
pin() {  # the exact version constraints.txt pins (names compared with - and _ alike)
  local v
  v=$(grep -i "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" constraints.txt | head -n1 | cut -d= -f3)
  [ -n "$v" ] || { echo "prepare_gpu.sh: $1 is not pinned in constraints.txt" >&2; exit 2; }
  echo "$1==$v"
}
mkdir -p "$DIR/wheels"
rm -f "$DIR"/wheels/*.whl
# The GPU image's Python is 3.12 (its torch, numpy, scipy, pyyaml, pillow are already there):
# only these pure-Python packages travel.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DIR/wheels" \
  "$(pin webdataset)" "$(pin braceexpand)" "$(pin torch-fidelity)"
if [ ! -f "$SHARED" ]; then
  echo "prepare_gpu.sh: no CIFAR-10 tarball at $SHARED (set SHARED_CIFAR=PATH to cifar10-jpeg.tar.gz)" >&2
  exit 2
fi
cp "$SHARED" "$DIR/cifar10-jpeg.tar.gz"
SIZE=$(du -sm "$DIR" | cut -f1)
echo "prepared $DIR (${SIZE} MiB):"
ls -l "$DIR" "$DIR/wheels"
[ "$SIZE" -lt 60 ] || { echo "prepare_gpu.sh: $DIR is ${SIZE} MiB; expected under 60 MiB (wheels + a 19 MB tarball)" >&2; exit 2; }
