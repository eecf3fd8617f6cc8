#!/usr/bin/env python
r"""Baseline versus OHEM: train every arm the same way, evaluate, print and plot the comparison.

Each arm is the base config with only its RoI-choosing keys changed (ohem_d2/arms.py), trained
with the same seeds, data order, schedule and RoI budget (a .py LazyConfig base takes overrides
path.key=value) in its own folder OUTPUT/ARM/seed_S. Re-running the same command resumes:
finished runs are skipped, an interrupted run continues from its last checkpoint. The report
(results.json, results.md, loss.png, ap.png, mining.png) is rebuilt from the run folders at the end.

With no --config-file it runs the embedded default: a procedurally generated shapes dataset
(written in COCO format under $DETECTRON2_DATASETS/ohem_synthetic) and a small Faster R-CNN
trained from scratch, sized for a 2-core CPU.

    python tools/run_experiment.py                       # the embedded default, CPU
    python tools/run_experiment.py --config-file configs/PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml \
        --arms stock fast_rcnn_heuristics ohem --seeds 0 1 2 --num-gpus 8 --output output/voc_ohem
    python tools/run_experiment.py --config-file configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py \
        --arms stock ohem --seeds 0 1 2 --num-gpus 8 train.max_iter=90000
    python tools/run_experiment.py --launcher slurm --partition gpu --num-gpus 8 ...   # each run a SLURM job
    python tools/run_experiment.py --launcher slurm ... --status      # the grid's state; submits nothing
"""
import os

from ohem_d2.engine import exit_on
from ohem_d2.experiments.runner import USER_ERRORS, argument_parser, run_experiment


def main(argv=None):
    args = argument_parser(__doc__).parse_args(argv)
    output, table, plots = exit_on(USER_ERRORS, run_experiment, args)
    print(table)
    if args.status:
        return output
    print(f"Results: {os.path.join(output, 'results.json')}, {os.path.join(output, 'results.md')}")
    print("Plots: " + ", ".join(plots))
    return output


if __name__ == "__main__":
    main()
