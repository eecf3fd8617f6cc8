#!/usr/bin/env python
"""Train and evaluate any ohem_d2 (or stock Detectron2) config: Detectron2's train_net.py plus OHEM.

What it adds to Detectron2's own script: the ``MODEL.OHEM`` keys and heads, user datasets
registered from the command line or the config (``--register-coco``, ``--register-voc``,
``DATASETS.REGISTER_*``), a check of config and datasets that stops bad input before any
process is spawned, DDP on CPU (gloo) as well as GPU, the peak GPU memory in ``metrics.json``
and the final evaluation in ``OUTPUT_DIR/eval_results.json``.

    python tools/train_net.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml \
        --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume      # continue from the last checkpoint
"""
import json
import logging
import os
import sys
from unittest import mock

import torch

import detectron2.engine.defaults
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, verify_results
from detectron2.utils.events import get_event_storage

from ohem_d2 import OHEMConfigError, add_ohem_config, validate_ohem_config
from ohem_d2.datasets import (
    DatasetError,
    add_dataset_config,
    check_datasets,
    evaluator_type,
    register_datasets_from_config,
)

logger = logging.getLogger(__name__)

try:  # Detectron2 built with its C++ ops has the fast COCO evaluator; the pure-Python build does not.
    from detectron2 import _C  # noqa: F401

    HAS_C_OPS = True
except ImportError:
    HAS_C_OPS = False


class PeakMemoryHook(hooks.HookBase):
    """Puts the peak GPU memory so far (MiB) into the EventStorage, hence into metrics.json.

    Only for a model on a GPU: a CPU run on a machine with a GPU has no GPU peak to report (torch
    would say 0, the report shows n/a) and leaves CUDA alone.
    """

    def after_step(self):
        device = next(self.trainer.model.parameters()).device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            get_event_storage().put_scalar("peak_gpu_mem_mb", peak, smoothing_hint=False)


def _create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model``, which also works for CPU processes (gloo), where DDP
    must not be given ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _stock_create_ddp_model(model, **kwargs)


_stock_create_ddp_model = detectron2.engine.defaults.create_ddp_model


class Trainer(DefaultTrainer):
    """DefaultTrainer with evaluators chosen from dataset metadata, CPU DDP and peak memory."""

    def __init__(self, cfg):
        with mock.patch.object(detectron2.engine.defaults, "create_ddp_model", _create_ddp_model):
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """PascalVOCDetectionEvaluator or COCOEvaluator by the dataset's evaluator_type; other
        types (ohem_d2.datasets.EVALUABLE_TYPES) were refused before training."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if evaluator_type(dataset_name) == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=HAS_C_OPS)

    def build_hooks(self):
        return [PeakMemoryHook()] + super().build_hooks()


USER_ERRORS = (OHEMConfigError, DatasetError, FileNotFoundError, KeyError, ValueError)


def build_config(args, check=True):
    """The run's config from ``args``, with its datasets registered and, with ``check``, the
    datasets checked (their warnings logged once, here): the launching process checks, the
    training processes it spawns do not.

    Raises one of ``USER_ERRORS`` with a message that says what to fix.
    """
    if not args.config_file or not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file!r} not found (pass --config-file PATH.yaml)")
    cfg = get_cfg()
    add_ohem_config(cfg)
    add_dataset_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except KeyError as e:  # yacs: "Non-existent config key: ..."
        raise KeyError(f"{e.args[0]} (in {args.config_file} or the command line)") from None
    except AssertionError as e:  # yacs: an odd number of override words, or a key that does not exist
        if "odd length" not in str(e):
            raise KeyError(f"{e} (in the command-line overrides)") from None
        flags = [o for o in args.opts if str(o).startswith("--")]
        hint = f"; options such as {flags[0]} go before the overrides" if flags else ""
        raise ValueError(f"the trailing config overrides must be KEY VALUE pairs, got {len(args.opts)} "
                         f"words ending in {args.opts[-1]!r}{hint}") from None
    cfg.DATASETS.REGISTER_COCO += [list(entry) for entry in args.register_coco]
    cfg.DATASETS.REGISTER_VOC += [list(entry) for entry in args.register_voc]
    validate_ohem_config(cfg)
    register_datasets_from_config(cfg)
    if check:
        for warning in check_datasets(cfg):
            logger.warning(f"warning: {warning}")
    cfg.freeze()
    return cfg


def setup(args):
    """Config plus Detectron2's default setup (output dir, logging, seeds, config dump); the
    datasets were checked by ``cli`` in the launching process."""
    cfg = build_config(args, check=False)
    default_setup(cfg, args)
    return cfg


def write_eval_results(cfg, results):
    """Keep the final metrics beside the checkpoints, for scripts and the experiment runner."""
    if comm.is_main_process() and results:
        with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        write_eval_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    write_eval_results(cfg, getattr(trainer, "_last_eval_results", None) or results)
    return results


def argument_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset (repeatable); use NAME in DATASETS.TRAIN/TEST")
    parser.add_argument("--register-voc", nargs=4, action="append", default=[],
                        metavar=("NAME", "DIR", "SPLIT", "CLASSES"),
                        help="register a Pascal-VOC-layout folder with comma-separated class names (repeatable)")
    return parser


def worker_environment(device, args):
    """Environment variables for the spawned training processes of a run on ``device``.

    Detectron2's ``launch`` gives its workers NCCL and one GPU each whenever it sees a GPU, also
    for a run on the CPU; hiding the GPUs from such workers makes it use gloo.
    """
    spawns_workers = args.num_gpus * args.num_machines > 1
    return {"CUDA_VISIBLE_DEVICES": ""} if spawns_workers and device == "cpu" else {}


def launch_workers(main_fn, args, device):
    """Detectron2's ``launch`` of ``main_fn(args)`` on ``args.num_gpus`` processes per machine,
    with the workers' environment of a run on ``device`` (:func:`worker_environment`)."""
    with mock.patch.dict(os.environ, worker_environment(device, args)):
        return launch(main_fn, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,))


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    try:
        cfg = build_config(args)  # fail here, in one process, before any worker is spawned
    except USER_ERRORS as e:
        logger.debug("invalid input", exc_info=True)
        sys.exit(f"error: {e.args[0] if e.args else e}")
    print("Command Line Args:", args)
    return launch_workers(main, args, cfg.MODEL.DEVICE)


if __name__ == "__main__":
    cli()
