#!/usr/bin/env bash
# Rebuild everything a fresh clone ships about the default conversion, from a trained conversion:
#   bash scripts/ship_default.sh [CONVERSION]        (default: cache/conversions/smollm2-135m-any-budget)
# Train it first (about 70 min on 2 CPU cores):
#   python -m tomoe_core convert --budget-range 0.3 1.0 --budget 0.5 --output cache/conversions/smollm2-135m-any-budget
# Each step below is one command of the repository; run alone, so the speed figures are this machine's
# (the steps use one torch thread; the speed benchmark records the load average it saw).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CONV=${1:-cache/conversions/smollm2-135m-any-budget}
NAME=$(basename "$CONV")
RESULTS=cache/shipped/results
export OMP_NUM_THREADS=1

# 1. the hypernetwork and metadata (every budget of the range), under cache/shipped/NAME
$PY -m tomoe_core ship "$CONV"
# 2. quality at every budget beside the baselines (rows of other conversions not in cache/conversions are dropped)
$PY -m benchmarks.quality --reuse --threads 1 --output "$RESULTS/quality_benchmark.json"
# 3. the 60-window evaluation of the default budget, with TEAL-style beside it
#    (random routing and last-word accuracy per budget are in step 2's file)
$PY -m tomoe_core evaluate "$CONV" --window 512 --max-windows 60 --baselines wanda-sp,teal --no-routing-modes \
    --last-word-items 0 --output "$RESULTS/eval-$NAME-60x512.json"
#    and at p = 0.7, materialised from the hypernetwork into a scratch folder
AT07=$(mktemp -d)/"$NAME-p0.7"
$PY -m tomoe_core rebudget "$CONV" --budget 0.7 --output "$AT07"
$PY -m tomoe_core evaluate "$AT07" --window 512 --max-windows 60 --baselines wanda-sp,teal --no-routing-modes \
    --last-word-items 0 --output "$RESULTS/eval-$NAME-p0.7-60x512.json"
rm -rf "$(dirname "$AT07")"
# 4. precomputed continuations per budget for the Budget explorer
$PY -m benchmarks.continuations --conversion "$CONV" --output "$RESULTS/continuations.json"
# 5. a small tagged routing log for the Experts page, its expert ablations (total: about 15 min; direct), and the same text
#    at p = 0.3 and 0.7 (roles across budgets)
$PY -m tomoe_core trace "$CONV" --max-tokens 3000 --run-id "shipped-$NAME" --overwrite --quiet
$PY -m analysis.routing_report "shipped-$NAME"
$PY -m tomoe_core ablate "shipped-$NAME" --quiet
$PY -m tomoe_core ablate "shipped-$NAME" --effect direct --quiet   # the fast estimate, all 3,000 tokens
for P in 0.3 0.7; do
    $PY -m tomoe_core rebudget "$CONV" --budget "$P" --output "cache/conversions/$NAME-at-p$P"
    $PY -m tomoe_core trace "cache/conversions/$NAME-at-p$P" --max-tokens 3000 --run-id "shipped-$NAME-p$P" \
        --overwrite --quiet
    $PY -m analysis.routing_report "shipped-$NAME-p$P"
done
$PY -m analysis.causal_report "shipped-$NAME"
mkdir -p cache/shipped/routing
for RUN in "shipped-$NAME" "shipped-$NAME-p0.3" "shipped-$NAME-p0.7"; do
    rm -rf "cache/shipped/routing/run_id=$RUN"
    cp -r "cache/routing/run_id=$RUN" cache/shipped/routing/
done
# 6. speed and memory of dense and every budget (trained, materialised from the conditioned conversion), with
#    TEAL-style, Wanda-sp and FLAP at the same budgets in the same run (the Budget explorer's equal-speed chart)
$PY -m benchmarks.speed --conversions "$NAME" --budgets 0.3 0.5 0.7 0.9 --layouts indexed packed --threads 1 2 \
    --batch-sizes 1 8 --repeats 5 --output "$RESULTS/speed_benchmark.json"
#    and the speed-at-dense-memory check at p = 0.5 (1 thread, batch 1, 9 interleaved repeats; with the
#    prefill bound: what prefill could reach if the MLPs cost exactly the weights the experts read)
$PY -m benchmarks.speed --conversions "$NAME" --budgets 0.5 --layouts indexed packed --threads 1 --batch-sizes 1 \
    --repeats 9 --output "$RESULTS/speed_p0.5_9repeats.json"
# 7. ToMoE against TEAL-style gather-GEMVs at p = 0.5 (decode batch 1 and 8, prefill)
$PY -m benchmarks.teal_speed --repeats 5 --output "$RESULTS/teal_speed.json"
