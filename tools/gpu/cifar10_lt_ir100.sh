#!/usr/bin/env bash
# The full CIFAR-10-LT (IR 100) experiment on a lent GPU machine, as one prepared command.
#
# On this machine, from the project root, once:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl && cp ../shared/wheels/device-py312/*.whl .whl/
#   echo /.datasets/ >> .git/info/exclude; mkdir -p .datasets && cp ../shared/datasets/cifar10-jpg.tar.gz .datasets/
# then run through the device tool with carry [".whl", ".datasets"]:
#   CBD_GIT_COMMIT=<commit> bash tools/gpu/cifar10_lt_ir100.sh
# A CPU dry run of the same steps (tiny smoke settings, seconds to minutes):
#   DRY_RUN=1 OUT=/tmp/out bash tools/gpu/cifar10_lt_ir100.sh
#
# Steps: the pipeline (notebooks 01 -> 04, every method, 3 training seeds, ResNet-32, 200 epochs,
# batch 128, CIFAR-LT lr recipe: 0.1, 5-epoch warm-up, x0.01 after 80% and x0.0001 after 90%),
# then the ablation on seed 1 at a short schedule, then one archive of the run folder in $OUT
# (checkpoints left out except the CBD-ENS student of seed 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to a folder for the results archive}
RUN=cifar10_lt_ir100

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
export CBD_RESULTS_DIR=${CBD_RESULTS_DIR:-$PWD/results}
ABLATION_EPOCHS=${ABLATION_EPOCHS:-50}
if [ "${DRY_RUN:-0}" = 1 ]; then
  export CBD_SMOKE=1 CBD_RESULTS_DIR=$(mktemp -d)
  ABLATION_EPOCHS=1
fi

python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
start=$(date +%s)
python3 -m cbdlib run --params notebooks/params/$RUN.yaml --no-progress 2>&1 | tee "$OUT/run.log"
python3 -m cbdlib ablate "$CBD_RESULTS_DIR/$RUN" --epochs "$ABLATION_EPOCHS" --seed 1 2>&1 | tee "$OUT/ablation.log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/run.log"

# One archive: everything but checkpoints, plus the seed-1 CBD-ENS student.
tar -czf "$OUT/$RUN.tar.gz" -C "$CBD_RESULTS_DIR" --exclude="$RUN/checkpoints" --exclude="$RUN/ablation/checkpoints" "$RUN" \
    "$RUN/checkpoints/seed_1/cbd_ens.pt"
ls -la "$OUT"
