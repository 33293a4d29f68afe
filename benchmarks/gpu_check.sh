#!/usr/bin/env bash
# The GPU evidence in one command, on the GPU machine (prepared here by benchmarks/prepare_gpu.sh):
#
#   bash benchmarks/gpu_check.sh OUT [BUNDLE]      # BUNDLE default: local/gpu
#
# Installs the carried wheels into /tmp/site, builds the CIFAR-10 shards from the carried tarball
# (once per machine, into /tmp/cifar10-train), then runs benchmarks/gpu_check.py with what is
# left of GPU_CHECK_MINUTES (default 8.5) after that, so the whole command stays under 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [BUNDLE]}
BUNDLE=${2:-local/gpu}
T0=$(date +%s)
PY=${PYTHON:-python3}
[ -d "$BUNDLE/wheels" ] || { echo "gpu_check.sh: no $BUNDLE/wheels: run make gpu-bundle (bash benchmarks/prepare_gpu.sh) where pip works, and copy $BUNDLE here" >&2; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$BUNDLE"/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
SHARDS=/tmp/cifar10-train
if [ ! -f "$SHARDS/manifest.json" ]; then
  "$PY" -m data_shards ensure-cifar10 --out "$SHARDS" --root /nonexistent --shared "$BUNDLE/cifar10-jpeg.tar.gz"
fi
LEFT=$("$PY" -c "import sys; print(max(0.5, float(sys.argv[1]) - (int(sys.argv[2]) - int(sys.argv[3])) / 60))" \
  "${GPU_CHECK_MINUTES:-8.5}" "$(date +%s)" "$T0")
echo "gpu_check.sh: set-up took $(( $(date +%s) - T0 )) s; budget for the checks: $LEFT min"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" --shards "$SHARDS" --budget-minutes "$LEFT"
