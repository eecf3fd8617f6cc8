#!/usr/bin/env bash
# The CPU study of docs/RESULTS.md section 3: where does mining matter, as the unlabelled
# look-alikes (the hard negatives) of the synthetic data get rarer?
#
#   scripts/rarity_study.sh [OUTPUT]          # default output/rarity_study; re-run to resume
#
# 1. A pilot, one seed, at the commonest look-alikes (60% of images): the five arms of the new
#    hardness ideas and peers (ohem_uncertainty, ohem_margin, ohem_importance_sampling,
#    iou_balanced, focal). The one with the highest AP joins the study as "the best of the rest"
#    (a one-seed pick, so a weak one: the study's paired intervals then say what it is worth).
# 2. For look-alikes in 5%, 20% and 60% of images (one look-alike at most, so the share of images
#    is the generator's distractor_prob): arms stock, fast_rcnn_heuristics, ohem, mmdet_ohem and
#    the pilot's pick, SEEDS seeds each, paired against stock.
# Every invocation is tools/run_experiment.py, so each folder resumes and holds its own report;
# scripts/rarity_summary.py then writes OUTPUT/summary.{md,png} across the three.
# Sized for a 2-core CPU: about 80 runs of 150 iterations, two at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-output/rarity_study}
SEEDS=${SEEDS:-"0 1 2 3 4"}
PYTHON=${PYTHON:-python3}
# From-scratch R-18-FPN-GN of configs/Synthetic-Detection, on a shorter schedule.
SCHEDULE=(SOLVER.MAX_ITER 150 SOLVER.STEPS "(110, 140)" SOLVER.WARMUP_ITERS 30 SOLVER.CHECKPOINT_PERIOD 50)
DATA=(--synthetic num_train=300 --synthetic num_val=100 --synthetic max_distractors=1)

experiment() {  # RARITY OUTPUT_DIR "SEEDS" ARM...
  local rarity=$1 out=$2 seeds=$3
  shift 3
  # shellcheck disable=SC2086
  "$PYTHON" tools/run_experiment.py --output "$out" --data-root "$OUTPUT/data_$rarity" \
    "${DATA[@]}" --synthetic "distractor_prob=$rarity" --seeds $seeds --arms "$@" --parallel 2 \
    "${SCHEDULE[@]}"  # (--parallel ends the --arms list)
}

start=$(date +%s)
PILOT_ARMS=(ohem_uncertainty ohem_margin ohem_importance_sampling iou_balanced focal)
experiment 0.6 "$OUTPUT/pilot" 0 "${PILOT_ARMS[@]}"
best=$("$PYTHON" -c 'import json, sys
arms = json.load(open(sys.argv[1]))["arms"]
print(max(arms, key=lambda a: arms[a]["mean"]["AP"]))' "$OUTPUT/pilot/results.json")
echo "pilot pick: $best"
for rarity in 0.05 0.2 0.6; do
  experiment "$rarity" "$OUTPUT/lookalikes_$rarity" "$SEEDS" stock fast_rcnn_heuristics ohem mmdet_ohem "$best"
done
echo "wall time: $(( ($(date +%s) - start) / 60 )) min"
"$PYTHON" scripts/rarity_summary.py "$OUTPUT"/lookalikes_{0.05,0.2,0.6} --out "$OUTPUT"
