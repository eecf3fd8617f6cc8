#!/usr/bin/env python
r"""Train and evaluate a LazyConfig (.py) model with ohem_d2: Detectron2's lazyconfig_train_net.py
plus the OHEM heads (configs/common/models/mask_rcnn_fpn_ohem.py, configs/new_baselines/*_ohem.py,
or any config's model.roi_heads turned into an arm with --arm), datasets registered from the
command line, the OHEM settings and datasets checked before any process starts (one line, no
traceback), the peak GPU memory in metrics.json and the final evaluation in
OUTPUT_DIR/eval_results.json. Overrides are LazyConfig's path.key=value.

    python tools/lazyconfig_train_net.py --config-file configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py \
        --num-gpus 8 train.output_dir=output/lsj_ohem
    python tools/lazyconfig_train_net.py --config-file configs/common/... --arm fast_rcnn_heuristics ...
    python tools/lazyconfig_train_net.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth
"""
# ohem_d2 before Detectron2: it imports Detectron2 without the start-up warnings (ohem_d2/__init__.py).
from ohem_d2.engine import exit_on, launch_workers, write_eval_results
from ohem_d2.engine.lazy import LAZY_USER_ERRORS, build_lazy_config, do_test, do_train, lazy_argument_parser

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.engine import default_setup


def main(args):
    cfg = build_lazy_config(args, check=False)  # checked by cli() in the launching process
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        results = do_test(cfg, model)
    else:
        results = do_train(cfg, args.resume)
    write_eval_results(cfg.train.output_dir, results)
    return results


def cli(argv=None):
    args = lazy_argument_parser(__doc__).parse_args(argv)
    cfg = exit_on(LAZY_USER_ERRORS, build_lazy_config, args)  # in one process, before any worker is spawned
    return launch_workers(main, args, cfg.train.get("device", "cuda"))


if __name__ == "__main__":
    cli()
