#!/usr/bin/env bash
# Submit a sweep as one Slurm job array: one task per grid point of configs/sweeps/<name>.yaml.
#
#   sbatch slurm/sweep.sh configs/sweeps/cifar10_lr.yaml            # a tiny job that submits the array
#   bash slurm/sweep.sh configs/sweeps/cifar10_lr.yaml                # same, from a login node
#   bash slurm/sweep.sh configs/sweeps/cifar10_lr.yaml --dry-run      # print the grid and the commands
#
# Options: --dry-run (-n); --out DIR (root of the run directories, instead of the file's `out`);
# --set KEY=VALUE (a fixed override for every point, repeatable, e.g. --set data.shards=/data/c10);
# after `--`, extra sbatch options (they win over the file's `slurm:` mapping), e.g. -- --qos=high.
#
# The sweep file is checked completely (unknown keys, empty grid, missing base config, every grid
# point against the config schema, grid size against MaxArraySize) before anything is submitted.
# Then OUT/sweep.json holds each task's run directory and launch/train.py arguments, OUT/logs/
# gets one log per task (<array job>_<task>.log), and each task runs slurm/train.sbatch (requeue on
# preemption, --resume auto). Resubmitting the same sweep continues unfinished runs; finished
# ones exit at once. Afterwards: python launch/sweep_summary.py OUT
#
#SBATCH --job-name=sweep-submit
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=slurm-sweep-submit-%j.out

set -euo pipefail

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" 2>/dev/null | sed 's/^# \{0,1\}//'; }
die() { echo "sweep.sh: error: $*" >&2; exit 2; }

find_repo() {
  local here d
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)
  for d in "${GAN_REPO:-}" "$here" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [ -n "$d" ] && [ -f "$d/gan/sweep.py" ] && [ -f "$d/slurm/train.sbatch" ]; then echo "$d"; return 0; fi
  done
  return 1
}
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

SWEEP="" DRY=0
PLAN=()
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; PLAN+=(--out "$(abspath "$2")"); shift ;;
    --out=*) PLAN+=(--out "$(abspath "${1#--out=}")") ;;
    --set) [ $# -ge 2 ] || die "--set needs KEY=VALUE"; PLAN+=(--set "$2"); shift ;;
    --set=*) PLAN+=(--set "${1#--set=}") ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$SWEEP" ] || die "one sweep file at a time (got '$SWEEP' and '$1')"; SWEEP=$1 ;;
  esac
  shift
done
[ -n "$SWEEP" ] || { usage >&2; die "name a sweep file, e.g. configs/sweeps/debug_cpu.yaml"; }
SWEEP=$(abspath "$SWEEP")

REPO=$(find_repo) || die "can't find the repository (gan/sweep.py): run from its root or set GAN_REPO"
cd "$REPO"
PY=${GAN_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi

if [ "$DRY" = 1 ]; then
  exec "$PY" -m gan.sweep plan "$SWEEP" "${PLAN[@]}" --dry-run --script slurm/train.sbatch --python python
fi
command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a Slurm login node (or use --dry-run)"

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$PY" -m gan.sweep plan "$SWEEP" "${PLAN[@]}" --script "$REPO/slurm/train.sbatch" --sbatch-out "$tmp" \
  || exit $?
mapfile -d '' SB <"$tmp"
n=${#SB[@]}
OPTS=("${SB[@]:0:n-3}")      # the array, job name, logs, the file's slurm: options
TAIL=("${SB[@]:n-3}")        # slurm/train.sbatch --sweep OUT/sweep.json
MANIFEST=${TAIL[2]}
OUT=$(dirname "$MANIFEST")

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # Submitted with sbatch: don't hand this job's SLURM_* settings down to the array's tasks.
  for v in $(compgen -e | grep '^SLURM_' | grep -v '^SLURM_CONF$' || true); do unset "$v"; done
fi
export GAN_REPO="$REPO" GAN_PYTHON="$PY"
JOB=$(sbatch --parsable "${OPTS[@]}" "${EXTRA[@]}" "${TAIL[@]}") || die "sbatch failed (see above); nothing was submitted"
JOB=${JOB%%;*}
echo "$JOB $(date -u +%FT%TZ) $SWEEP" >>"$OUT/submissions.txt"
NT=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["tasks"]))' "$MANIFEST")
echo "submitted array job $JOB: $NT task(s)"
echo "  logs:    $OUT/logs/${JOB}_<task>.log"
echo "  runs:    $OUT/<run name>/ (status.json, metrics.jsonl, checkpoints/)"
echo "  watch:   squeue -j $JOB"
echo "  summary: $PY launch/sweep_summary.py $OUT"
