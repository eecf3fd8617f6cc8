#!/usr/bin/env python
"""Train and evaluate a LazyConfig (``.py``) model with ohem_d2: Detectron2's
``tools/lazyconfig_train_net.py``, plus what tools/train_net.py adds to Detectron2's train_net.py.

That is: the OHEM heads (``configs/common/models/mask_rcnn_fpn_ohem.py``,
``configs/new_baselines/*_ohem.py``, or ``model.roi_heads`` of any config turned into an arm with
``--arm``), user datasets registered from the command line (``--register-coco``,
``--register-voc``), the OHEM settings and the datasets checked before any process starts (one
line, no traceback), the peak GPU memory in ``metrics.json`` and the final evaluation in
``OUTPUT_DIR/eval_results.json``. Overrides are LazyConfig's ``path.key=value``.

    python tools/lazyconfig_train_net.py --config-file configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py \
        --num-gpus 8 train.output_dir=output/lsj_ohem
    python tools/lazyconfig_train_net.py --config-file configs/common/... --arm fast_rcnn_heuristics ...
    python tools/lazyconfig_train_net.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth
"""
import json
import logging
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import ListConfig

from ohem_d2.arms import UnknownArmError, apply_arm_to_lazy_model
from ohem_d2.config import check_box_predictor_for_ohem
from ohem_d2.datasets import check_datasets, register_coco, register_voc, take_sizes_from_image_files

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_net import (  # noqa: E402
    USER_ERRORS,
    PeakMemoryHook,
    _create_ddp_model,
    argument_parser as train_net_argument_parser,
    launch_workers,
)

logger = logging.getLogger("detectron2")
LAZY_USER_ERRORS = USER_ERRORS + (UnknownArmError,)


def argument_parser():
    """tools/train_net.py's arguments (Detectron2's, --register-coco, --register-voc), plus
    --arm and --sizes-from-images."""
    parser = train_net_argument_parser()
    parser.description = __doc__
    parser.add_argument("--arm", help="turn the config's model into this ohem_d2 comparison arm "
                                      "(ohem_d2/arms.py: stock, fast_rcnn_heuristics, ohem, ...)")
    parser.add_argument("--sizes-from-images", action="store_true",
                        help="take image sizes from the image files where the annotations disagree "
                             "(as DATASETS.SIZES_FROM_IMAGES of a yacs config)")
    return parser


def _names(dataset_config):
    names = dataset_config.names
    return [names] if isinstance(names, str) else list(names)


def dataset_names(cfg):
    """(training, test) dataset names of a LazyConfig's ``dataloader``."""
    train = _names(cfg.dataloader.train.dataset) if "train" in cfg.dataloader else []
    test = _names(cfg.dataloader.test.dataset) if "test" in cfg.dataloader else []
    return train, test


def _check_ohem(model_cfg):
    """Build the OHEM settings of the model config (they validate themselves) and check its box
    predictors, so that a bad value stops the run here, with one line, not in every worker."""
    heads = model_cfg.get("roi_heads", {})
    if "ohem" not in heads:
        return
    instantiate(heads.ohem)
    predictors = heads.box_predictor if isinstance(heads.box_predictor, ListConfig) else [heads.box_predictor]
    for predictor in predictors:
        check_box_predictor_for_ohem(predictor.get("use_fed_loss", False))


def build_config(args, check=True):
    """The run's LazyConfig from ``args``, with its datasets registered and, with ``check``,
    everything validated. Raises one of ``LAZY_USER_ERRORS`` with a message that says what to fix."""
    if not args.config_file or not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file!r} not found (pass --config-file PATH.py)")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if args.arm:
        apply_arm_to_lazy_model(cfg.model, args.arm)
    for name, json_file, image_root in args.register_coco:
        register_coco(name, json_file, image_root)
    for name, dirname, split, classes in args.register_voc:
        register_voc(name, dirname, split, classes.split(","))
    train, test = dataset_names(cfg)
    for name in dict.fromkeys(train + test):
        if name in DatasetCatalog.list():  # an unknown name is the check's to report
            take_sizes_from_image_files(name, args.sizes_from_images)
    if check:
        _check_ohem(cfg.model)
        view = CfgNode({"DATASETS": {"TRAIN": train, "TEST": test, "SIZES_FROM_IMAGES": args.sizes_from_images},
                        "DATALOADER": {"FILTER_EMPTY_ANNOTATIONS":
                                       cfg.dataloader.train.dataset.get("filter_empty", True) if train else True}})
        for warning in check_datasets(view):
            logger.warning(warning)
    return cfg


def do_test(cfg, model):
    """Evaluate on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``, if the config has them."""
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def write_eval_results(cfg, results):
    """The final metrics beside the checkpoints, for scripts and the experiment runner."""
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.train.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)


def do_train(args, cfg):
    """Detectron2's LazyConfig training loop, with the peak GPU memory logged."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = _create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def test_and_keep():
        results.update(do_test(cfg, model))
        return results

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        PeakMemoryHook(),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint holds the iteration that had just finished: training goes on from the next.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    write_eval_results(cfg, results)


def main(args):
    cfg = build_config(args, check=False)  # checked by cli() in the launching process
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        results = do_test(cfg, model)
        write_eval_results(cfg, results)
        return results
    do_train(args, cfg)


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    try:
        cfg = build_config(args)  # fail here, in one process, before any worker is spawned
    except LAZY_USER_ERRORS as e:
        logger.debug("invalid input", exc_info=True)
        sys.exit(f"error: {e.args[0] if e.args else e}")
    return launch_workers(main, args, cfg.train.get("device", "cuda"))


if __name__ == "__main__":
    cli()
