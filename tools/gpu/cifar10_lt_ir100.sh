#!/usr/bin/env bash
# The full CIFAR-10-LT (IR 100) experiment on a lent GPU machine, in commands of at most 9 minutes:
# each runs as much as fits and the same command resumes it in the next.
#
# On this machine, from the project root, once:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl && cp ../shared/wheels/device-py312/*.whl .whl/
#   echo /.datasets/ >> .git/info/exclude; mkdir -p .datasets && cp ../shared/datasets/cifar10-jpg.tar.gz .datasets/
# then run through the device tool with carry [".whl", ".datasets"], as often as needed:
#   CBD_GIT_COMMIT=<commit> bash tools/gpu/cifar10_lt_ir100.sh
# A CPU dry run of the same steps (smoke settings, a few minutes; needs CBD_CIFAR10 or ../shared):
#   DRY_RUN=1 OUT=/tmp/out bash tools/gpu/cifar10_lt_ir100.sh
#
# Steps, each given what is left of BUDGET_S (default 500 s, for a 540 s command) and skipped when
# too little is left: (1) the training of every stage (python -m cbdlib.train: one process, so a
# stop at the limit leaves nothing running; a rerun resumes from the last checkpoints, grouped
# stage-1 models save every 10 epochs of 200); (2) the notebooks 01 -> 04 through papermill on the
# trained run folder (they evaluate, plot and write the summary); (3) the ablation on seed 1 at a
# short schedule (resumable too); (4) one archive of the run folder in $OUT, checkpoints left out
# except the CBD-ENS student of seed 1. Exit status 0 when all is done, 75 when a rerun must go on.
# The run folder stays in results/ (git-ignored), which a warm device machine keeps between
# commands; a fresh machine starts the experiment again (its checkpoints, some 100 MB, are more
# than a device call can carry back in).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to a folder for the results archive}
RUN=cifar10_lt_ir100
BUDGET_S=${BUDGET_S:-500}
started=$(date +%s)

if [ -d .whl ] && ! python3 -c "import papermill" 2>/dev/null; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CBD_CIFAR10=${CBD_CIFAR10:-$PWD/.datasets/cifar10-jpg.tar.gz}
if [ ! -e "$CBD_CIFAR10" ] && [ -e ../shared/datasets/cifar10-jpg.tar.gz ]; then
  CBD_CIFAR10=$(cd ../shared/datasets && pwd)/cifar10-jpg.tar.gz  # a checkout beside shared/ (the CPU dry run)
fi
ABLATION_EPOCHS=${ABLATION_EPOCHS:-50}
if [ "${DRY_RUN:-0}" = 1 ]; then
  export CBD_SMOKE=1 CBD_RESULTS_DIR=${CBD_RESULTS_DIR:-$OUT/results}
  ABLATION_EPOCHS=1
fi
export CBD_RESULTS_DIR=${CBD_RESULTS_DIR:-$PWD/results}
RUN_DIR=$CBD_RESULTS_DIR/$RUN
mkdir -p "$OUT"

left() { echo $(( BUDGET_S - ($(date +%s) - started) )); }
phase() {  # phase NAME COMMAND...: run in what is left of the budget; 0 done, 75 stopped or skipped
  local name=$1; shift
  local limit=$(left)
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, ${limit} s left; rerun to go on" | tee -a "$OUT/progress.log"; return 75; fi
  timeout --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $(( $(date +%s) - started )) s" | tee -a "$OUT/progress.log"
  tail -n 5 "$OUT/$name.log"
  case $status in 0) return 0 ;; 124|137) echo "$name: stopped at the time limit; rerun to resume" | tee -a "$OUT/progress.log"; return 75 ;; *) exit "$status" ;; esac
}
finish() {  # what the next command needs to know, then the exit status
  [ -f "$RUN_DIR/history.jsonl" ] && cp "$RUN_DIR/history.jsonl" "$OUT/history.jsonl"
  echo "wall time: $(( $(date +%s) - started )) s" | tee -a "$OUT/progress.log"
  exit "$1"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/progress.log"
phase train python3 -m cbdlib.train --params notebooks/params/$RUN.yaml --stage all --out "$RUN_DIR" || finish $?
phase notebooks python3 -m cbdlib run --params notebooks/params/$RUN.yaml --no-progress || finish $?
phase ablation python3 -m cbdlib ablate "$RUN_DIR" --epochs "$ABLATION_EPOCHS" --seed 1 || finish $?

# One archive: everything but checkpoints, plus the seed-1 CBD-ENS student. GNU tar applies
# --exclude to the names given on its command line too, so the student is appended in a second call.
tar -cf "$OUT/$RUN.tar" -C "$CBD_RESULTS_DIR" --exclude="$RUN/checkpoints" --exclude="$RUN/ablation/checkpoints" "$RUN"
tar -rf "$OUT/$RUN.tar" -C "$CBD_RESULTS_DIR" "$RUN/checkpoints/seed_1/cbd_ens.pt"
gzip -f "$OUT/$RUN.tar"
tar -tzf "$OUT/$RUN.tar.gz" | grep -q "^$RUN/checkpoints/seed_1/cbd_ens.pt$" || { echo "archive lacks the CBD-ENS model"; exit 1; }
ls -la "$OUT"
finish 0
