"""What ohem_d2's yacs tools share, as ``detectron2.engine.defaults`` holds what Detectron2's do:
the argument parsers, the config built and checked in one place, the trainer, the final metrics file.

A run's config is built and its datasets checked once, in the launching process, before any
worker is spawned: bad input stops there with one line (:data:`USER_ERRORS`).
"""
import argparse
import contextlib
import json
import logging
import os
import sys

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, default_argument_parser
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

from ..config import add_ohem_config, validate_ohem_config
from ..data import datasets
from ..data.datasets import (
    DatasetError,
    add_dataset_config,
    check_datasets,
    evaluator_type,
    register_datasets_from_config,
)
from ..data.hard_images import (
    INDEX_KEY,
    SAMPLER_NAME,
    HardImageTrainingSampler,
    add_hard_image_config,
    check_hard_image_config,
    shared_losses,
)
from ..data.negatives import filter_except_pools, is_pool, lend_keypoint_metadata
from ..data.resumable_sampler import ResumableTrainingSampler
from ..modeling.settings import OHEMConfigError
from .hooks import ExactResume, HardImageFeedback, PeakMemoryHook, TrainingLoader
from .launch import cpu_ddp
from .weights import check_weights, from_scratch_warnings

logger = logging.getLogger(__name__)

# The errors that mean bad input (a path, a key, a value), reported as one line by the tools.
USER_ERRORS = (OHEMConfigError, DatasetError, FileNotFoundError, KeyError, ValueError)

try:  # Detectron2 built with its C++ ops has the fast COCO evaluator; the pure-Python build does not.
    from detectron2 import _C  # noqa: F401

    HAS_C_OPS = True
except ImportError:
    HAS_C_OPS = False


def add_dataset_arguments(parser):
    """``--register-coco``, ``--register-voc`` and ``--register-negatives``: user datasets named on
    the command line."""
    parser.add_argument("--register-coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset (repeatable); use NAME in DATASETS.TRAIN/TEST")
    parser.add_argument("--register-voc", nargs=4, action="append", default=[],
                        metavar=("NAME", "DIR", "SPLIT", "CLASSES"),
                        help="register a Pascal-VOC-layout folder with comma-separated class names (repeatable)")
    parser.add_argument("--register-negatives", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                        help="register a negative pool: a folder of background images without objects, or a text "
                             "file listing them (repeatable); in DATASETS.TRAIN its images train as images without "
                             "GT, whatever DATALOADER.FILTER_EMPTY_ANNOTATIONS says (docs/HARD_IMAGES.md)")
    return parser


YACS_OVERRIDES_HELP = "config overrides, KEY VALUE pairs at the end of the command"


def training_argument_parser(description=None, overrides_help=YACS_OVERRIDES_HELP):
    """Detectron2's ``default_argument_parser`` (config file, resume, eval-only, GPUs, machines,
    rendezvous, overrides) plus the dataset registrations: the arguments of a training tool.
    Detectron2's help of the overrides describes both config systems; ``overrides_help`` says
    what this tool's are."""
    parser = add_dataset_arguments(default_argument_parser())
    parser.description = description
    parser.epilog = None
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    (overrides,) = [action for action in parser._actions if action.dest == "opts"]
    overrides.help = overrides_help
    return parser


def config_argument_parser(description=None):
    """The arguments that say which config and datasets, for a tool that reads a run's config
    without training it (no --resume, --eval-only, --num-gpus, ...)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    add_dataset_arguments(parser)
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, help=YACS_OVERRIDES_HELP)
    return parser


def build_config(args, check=True):
    """The run's yacs config from ``args``, with its datasets registered and, with ``check``, the
    weights it loads and its datasets checked (the warnings, of training from scratch too, logged
    once, here; the datasets' line shown on the console): the launching process checks, the
    training processes it spawns do not.

    Raises one of ``USER_ERRORS`` with a message that says what to fix.
    """
    if not args.config_file or not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file!r} not found (pass --config-file PATH.yaml)")
    cfg = get_cfg()
    add_ohem_config(cfg)
    add_dataset_config(cfg)
    add_hard_image_config(cfg)
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
    cfg.DATASETS.REGISTER_NEGATIVES += [list(entry) for entry in args.register_negatives]
    validate_ohem_config(cfg)
    if cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME:
        check_hard_image_config(cfg)
    register_datasets_from_config(cfg)
    if check:
        check_weights(cfg.MODEL.WEIGHTS, key="MODEL.WEIGHTS", override="MODEL.WEIGHTS {}",
                      eval_only=getattr(args, "eval_only", False),
                      resume_from=cfg.OUTPUT_DIR if getattr(args, "resume", False) else None)
        with shown_on_console(datasets.logger):
            warnings = check_datasets(cfg)
        for warning in warnings + from_scratch_warnings(cfg):
            logger.warning(f"warning: {warning}")
    cfg.freeze()
    return cfg


@contextlib.contextmanager
def shown_on_console(log, level=logging.INFO):
    """Print the records of logger ``log`` from ``level`` on to stdout (the message alone) while
    in this context, where logging is not set up: a tool checks its config before Detectron2's
    ``default_setup`` sets up logging, and Python would show only warnings and errors."""
    if log.hasHandlers():
        yield
        return
    handler, level_before = logging.StreamHandler(sys.stdout), log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level_before)


class Trainer(DefaultTrainer):
    """DefaultTrainer with evaluators chosen from dataset metadata, CPU DDP, peak memory, exact
    resume (ExactResume) and the hard-image sampler."""

    def __init__(self, cfg):
        with cpu_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """PascalVOCDetectionEvaluator or COCOEvaluator by the dataset's evaluator_type; other
        types (ohem_d2.data.datasets.EVALUABLE_TYPES) were refused before training."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if evaluator_type(dataset_name) == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=HAS_C_OPS)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader with a sampler the hooks can reach (:class:`TrainingLoader`):
        Detectron2's ``TrainingSampler`` made resumable (:class:`ExactResume`), or the
        ``HardImageTrainingSampler`` (its records numbered for the loss feedback); Detectron2's
        other samplers as Detectron2 builds them. Negative pools keep their images (no GT) whatever
        FILTER_EMPTY_ANNOTATIONS and MIN_KEYPOINTS_PER_IMAGE say; they filter the other datasets."""
        if cfg.DATALOADER.SAMPLER_TRAIN not in ("TrainingSampler", SAMPLER_NAME):
            return super().build_train_loader(cfg)
        filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        min_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        with_pools = any(is_pool(name) for name in cfg.DATASETS.TRAIN)
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=filter_empty and not with_pools,
            min_keypoints=0 if with_pools else min_keypoints,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
        if with_pools:
            dicts = filter_except_pools(dicts, filter_empty, min_keypoints)
            if cfg.MODEL.KEYPOINT_ON:
                lend_keypoint_metadata(cfg.DATASETS.TRAIN)
        if cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME:
            dicts = [dict(d, **{INDEX_KEY: i}) for i, d in enumerate(dicts)]
            settings = cfg.DATALOADER.HARD_IMAGES
            sampler = HardImageTrainingSampler(shared_losses(len(dicts)), settings.TEMPERATURE, settings.FLOOR)
        else:
            sampler = ResumableTrainingSampler(len(dicts))  # seeded as Detectron2 seeds its TrainingSampler
        return TrainingLoader(build_detection_train_loader(cfg, dataset=dicts, sampler=sampler), sampler)

    def build_hooks(self):
        extra = [PeakMemoryHook()]
        loader = self._trainer.data_loader
        if isinstance(loader, TrainingLoader) and isinstance(loader.sampler, ResumableTrainingSampler):
            extra.append(ExactResume(loader, self.cfg.SOLVER.IMS_PER_BATCH))
        if isinstance(loader, TrainingLoader) and isinstance(loader.sampler, HardImageTrainingSampler):
            extra.append(HardImageFeedback(loader, self.cfg.DATALOADER.HARD_IMAGES.MOMENTUM))
        return extra + super().build_hooks()


def write_eval_results(output_dir, results):
    """The final metrics as ``output_dir/eval_results.json``, beside the checkpoints, for scripts
    and the experiment runner (main process only)."""
    if comm.is_main_process() and results:
        with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=2)
