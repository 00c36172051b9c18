#!/usr/bin/env bash
# Every GPU check in one call, for the day a GPU machine is lent (the device `run` tool: about 15 min of
# device time per task, so this stays under 8 minutes: each step has its own time limit and a failing
# step does not stop the next). Prints the figures; the speed file goes to $OUT (the device tool brings
# it back) or cache/results/.
#
#   bash scripts/gpu_check.sh            # CUDA tests, then benchmarks.gpu_speed
#   bash scripts/gpu_check.sh --plan     # print the steps and their time limits, run nothing
#
# Needs a CUDA build of torch (and triton for the indexed layout's kernels). Without
# cache/models/smollm2-135m (git ignores it; carry it to the machine) the speed step runs --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT_DIR=${OUT:-cache/results}
TESTS=(tests/test_moe_layouts.py tests/test_hf_native.py)
SPEED_ARGS=(--repeats 3 --output "$OUT_DIR/speed_benchmark-cuda.json")
[ -d cache/models/smollm2-135m ] || SPEED_ARGS=(--dry-run "${SPEED_ARGS[@]}")
STEPS=("180 $PY -m pytest -q -p no:cacheprovider -k 'cuda or triton or hf_native' ${TESTS[*]}"
       "290 $PY -m benchmarks.gpu_speed ${SPEED_ARGS[*]}")

if [ "${1:-}" = "--plan" ]; then
    printf 'step (time limit in s, command):\n'
    printf '  %s\n' "${STEPS[@]}"
    exit 0
fi

"$PY" -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:',
torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 3)" \
    || { echo "gpu_check: torch sees no CUDA device here: nothing to check" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
mkdir -p "$OUT_DIR"
status=0
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or triton or hf_native" "${TESTS[@]}" || status=1
timeout 290 "$PY" -m benchmarks.gpu_speed "${SPEED_ARGS[@]}" || status=1
echo "gpu_check: exit $status (0: every step passed)"
exit $status
