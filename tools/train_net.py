#!/usr/bin/env python
"""Train and evaluate any ohem_d2 (or stock Detectron2) yacs config: Detectron2's train_net.py
plus the MODEL.OHEM keys and heads, datasets registered from the command line (--register-coco,
--register-voc, --register-negatives) or the config (DATASETS.REGISTER_*), a check of config and datasets that stops bad
input before any process is spawned, DDP on the CPU (gloo) as well as GPUs, the peak GPU memory in
metrics.json and the final evaluation in OUTPUT_DIR/eval_results.json.

    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume      # continue from the last checkpoint
"""
# ohem_d2 before Detectron2: it imports Detectron2 without the start-up warnings (ohem_d2/__init__.py).
from ohem_d2.engine import (
    USER_ERRORS,
    Trainer,
    build_config,
    exit_on,
    launch_workers,
    training_argument_parser,
    write_eval_results,
)

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm


def setup(args):
    """Config plus Detectron2's default setup (output dir, logging, seeds, config dump); the
    datasets were checked in the launching process."""
    cfg = build_config(args, check=False)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        write_eval_results(cfg.OUTPUT_DIR, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    write_eval_results(cfg.OUTPUT_DIR, getattr(trainer, "_last_eval_results", None) or results)
    return results


def cli(argv=None):
    args = training_argument_parser(__doc__).parse_args(argv)
    cfg = exit_on(USER_ERRORS, build_config, args)  # in one process, before any worker is spawned
    print("Command Line Args:", args)
    return launch_workers(main, args, cfg.MODEL.DEVICE)


if __name__ == "__main__":
    cli()
