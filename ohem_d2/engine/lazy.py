"""What the LazyConfig (``.py`` config) tool needs beyond Detectron2's: the config built and
checked in the launching process (arm, datasets, OHEM settings), and Detectron2's LazyConfig
training loop with the peak-memory hook and the final metrics file."""
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import ListConfig

from ..arms import UnknownArmError, apply_arm_to_lazy_model
from ..data import datasets
from ..data.class_checks import ClassOutputs
from ..data.datasets import check_datasets, register_coco, register_voc, take_sizes_from_image_files
from ..modeling.settings import check_box_predictor_for_ohem
from .defaults import USER_ERRORS, shown_on_console, training_argument_parser
from .hooks import PeakMemoryHook
from .launch import create_ddp_model
from .weights import check_weights

logger = logging.getLogger("detectron2")
LAZY_USER_ERRORS = USER_ERRORS + (UnknownArmError,)


def lazy_argument_parser(description=None):
    """The training tool's arguments plus ``--arm`` and ``--sizes-from-images``."""
    parser = training_argument_parser(description, "config overrides, path.key=value at the end of the command")
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


def class_outputs(model_cfg):
    """The RoI heads' number of classes, where the model has RoI heads that say it; Detectron2's
    COCO LazyConfigs set the yacs default, 80."""
    heads = model_cfg.get("roi_heads", {})
    if "num_classes" not in heads:
        return []
    return [ClassOutputs("model.roi_heads.num_classes", heads.num_classes, get_cfg().MODEL.ROI_HEADS.NUM_CLASSES,
                         "model.roi_heads.num_classes={}")]


def build_lazy_config(args, check=True):
    """The run's LazyConfig from ``args``, with its datasets registered and, with ``check``,
    everything validated. Raises one of ``LAZY_USER_ERRORS`` with a message that says what to fix."""
    if not args.config_file or not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file!r} not found (pass --config-file PATH.py)")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if args.arm:
        apply_arm_to_lazy_model(cfg.model, args.arm)
    if args.register_negatives:
        raise ValueError("--register-negatives: negative pools train from yacs (.yaml) configs, with "
                         "tools/train_net.py or tools/bootstrap.py; this LazyConfig tool's loader would drop their "
                         "images (they have no annotations)")
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
        # Its evaluation loads train.init_checkpoint (no --resume); training resumes like train_net.
        check_weights(cfg.train.init_checkpoint, key="train.init_checkpoint", override="train.init_checkpoint={}",
                      eval_only=args.eval_only,
                      resume_from=cfg.train.output_dir if args.resume and not args.eval_only else None)
        view = CfgNode({"DATASETS": {"TRAIN": train, "TEST": test, "SIZES_FROM_IMAGES": args.sizes_from_images},
                        "DATALOADER": {"FILTER_EMPTY_ANNOTATIONS":
                                       cfg.dataloader.train.dataset.get("filter_empty", True) if train else True}})
        with shown_on_console(datasets.logger):
            warnings = check_datasets(view, class_outputs(cfg.model))
        for warning in warnings:
            logger.warning(warning)
    return cfg


def do_test(cfg, model):
    """Evaluate on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``, if the config has them."""
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def do_train(cfg, resume):
    """Detectron2's LazyConfig training loop, with the peak GPU memory logged; returns the last
    evaluation's results."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # The checkpoint holds the iteration that had just finished: training goes on from the next.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results
