#!/usr/bin/env bash
# The GPU-scale evidence study of docs/RESULTS.md as one command: 8 arms x 3 seeds of R-18-FPN
# from scratch on the 384 px synthetic hard-negative dataset, 6 runs sharing one GPU at a time.
# Writes OUT (default results/gpu_study): results.json, results.md, *.png and one folder per run.
# Re-running resumes. Needs one CUDA GPU with >= 40 GB (e.g. H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu_study}"
python tools/run_experiment.py \
  --config-file configs/Synthetic-Detection/faster_rcnn_R_18_FPN_scratch_gpu.yaml \
  --data-root "${DETECTRON2_DATASETS:-datasets}/ohem_synthetic_gpu" \
  --synthetic num_train=4000 --synthetic num_val=500 --synthetic image_size=384 \
  --synthetic distractor_prob=0.6 --synthetic max_distractors=4 \
  --arms fast_rcnn_heuristics stock ohem ohem_no_nms ohem_cls ohem_per_batch ohem_stratified ohem_probability \
  --seeds 0 1 2 --parallel 6 --output "$out" MODEL.DEVICE cuda
