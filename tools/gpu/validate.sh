#!/usr/bin/env bash
# The first minutes of a lent GPU: one command that checks the CUDA path and leaves its record in $OUT.
#
# On this machine, from the project root, once:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl && cp ../shared/wheels/device-py312/*.whl .whl/
# then run through the device tool with carry [".whl"] and a limit of about 9 minutes:
#   CBD_GIT_COMMIT=$(git rev-parse --short HEAD) bash tools/gpu/validate.sh
# A CPU dry run of the same steps (smoke sizes, a few minutes):
#   DRY_RUN=1 OUT=/tmp/out bash tools/gpu/validate.sh
#
# Budget on one H100: 8 minutes in all. Each step has its own limit, so a step that hangs costs
# its limit and the next step still runs; steps.tsv records each step's exit status and seconds.
#   1. versions and the GPU (nvidia-smi, torch, CUDA, cuDNN, capability)    15 s
#   2. host syncs: 3 grouped steps, 2 vanilla + 2 aug ResNet-8 teachers     60 s  (sync_check.json; expected 0)
#   3. the CUDA-only tests (skipped without CUDA) and the torchrun tests    100 s
#   4. the smoke profile through every stage (python -m cbdlib.train)       70 s
#   5. python -m cbdlib.bench --device cuda (ResNet-32 + ResNet-8, full)   210 s  (<gpu>.json)
#   margin (starts, imports, the archive)                                   25 s
# Everything is written under $OUT: <step>.log, steps.tsv, sync_check.json, <gpu>.json, smoke/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"

if [ -d .whl ] && ! python3 -c "import papermill" 2>/dev/null; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
export CBD_RESULTS_DIR="$OUT/results" CBD_CACHE_DIR=$(mktemp -d)
DEVICE=cuda BENCH="--device cuda" SYNC_TIME=60 TESTS_TIME=100 SMOKE_TIME=70 BENCH_TIME=210 MARK=""
if [ "${DRY_RUN:-0}" = 1 ]; then
  # The same steps on a CPU: nothing to count or time, but every command and file is exercised
  # (the slow torchrun tests left out, and limits for a busy 2-core CPU).
  DEVICE=cpu BENCH="--device cpu --size tiny" SYNC_TIME=300 TESTS_TIME=300 SMOKE_TIME=300 BENCH_TIME=300 MARK="not slow"
  export CBD_SMOKE=1
fi
printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" | tee -a "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

step versions 15 bash -c 'nvidia-smi 2>/dev/null || echo "no nvidia-smi"; python3 - <<PY
import json, platform, torch, torchvision
gpu = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if gpu else None,
                  "gpu": torch.cuda.get_device_name(0) if gpu else None,
                  "capability": torch.cuda.get_device_capability(0) if gpu else None,
                  "bf16_supported": torch.cuda.is_bf16_supported() if gpu else None,
                  "commit": __import__("os").environ.get("CBD_GIT_COMMIT")}, indent=1))
PY'

BATCH=128; [ "$DEVICE" = cpu ] && BATCH=16
step sync_check $SYNC_TIME python3 tools/gpu/sync_check.py --device "$DEVICE" --batch-size $BATCH --json "$OUT/sync_check.json"

# The tests that skip without CUDA, the CUDA path's rules, and the torchrun tests (which must stay
# on the CPU, gloo, on a GPU machine too).
step cuda_tests $TESTS_TIME python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs -m "$MARK" \
  tests/test_samplers.py tests/test_augment.py tests/test_cuda_path.py tests/test_distributed.py \
  -k "cuda or CUDA or torchrun or local_rank"

step smoke $SMOKE_TIME python3 -m cbdlib.train --params notebooks/params/smoke.yaml --stage all --out "$OUT/smoke"

GPU_NAME=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
case "$GPU_NAME" in
  *H200*) RECORD=h200 ;; *H100*) RECORD=h100 ;; cpu) RECORD=cpu-dry-run ;;
  *) RECORD=$(echo "$GPU_NAME" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-') ;;
esac
step bench $BENCH_TIME python3 -m cbdlib.bench $BENCH --json "$OUT/$RECORD.json"

echo "records in $OUT:"; ls "$OUT"
# Fails when a step failed, so a caller sees it; steps.tsv says which.
! awk 'NR > 1 && $2 != 0 {found = 1} END {exit !found}' "$OUT/steps.tsv"
