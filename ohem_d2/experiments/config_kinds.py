"""How the experiment runner drives each config system: yacs ``.yaml`` configs trained by
tools/train_net.py, LazyConfig ``.py`` configs trained by tools/lazyconfig_train_net.py.

An experiment is one base config turned into each arm; the two systems differ only in how a run's
command line says the device, the seed, the output folder and the arm, and where the built config
keeps its schedule and datasets.
"""
from dataclasses import dataclass, replace
from typing import Callable

from ..arms import BOOTSTRAP_ARMS, arm_overrides
from ..engine.bootstrap import argument_parser as bootstrap_argument_parser
from ..engine.defaults import build_config, training_argument_parser
from ..engine.lazy import build_lazy_config, dataset_names, lazy_argument_parser


@dataclass(frozen=True)
class ConfigKind:
    tool: str  # the training script in tools/
    argument_parser: Callable  # its argument parser
    build_config: Callable  # its build_config(args, check)
    device_opts: Callable  # device -> overrides that train on it
    device_of: Callable  # overrides -> the device they set, or None
    run_opts: Callable  # (seed, run_dir) -> overrides
    checkpoint_opts: Callable  # iterations -> overrides that checkpoint every that many iterations
    arm_args: Callable  # (arm, base config) -> (options before the overrides, overrides)
    schedule: Callable  # base config -> {max_iter, ims_per_batch, train, test}


def _last_value(opts, key):
    values = [v for k, v in zip(opts[::2], opts[1::2]) if k == key]
    return str(values[-1]) if values else None


YACS = ConfigKind(
    tool="train_net.py",
    argument_parser=training_argument_parser,
    build_config=build_config,
    device_opts=lambda device: ["MODEL.DEVICE", device],
    device_of=lambda opts: _last_value(opts, "MODEL.DEVICE"),
    run_opts=lambda seed, run_dir: ["SEED", str(seed), "OUTPUT_DIR", run_dir],
    checkpoint_opts=lambda period: ["SOLVER.CHECKPOINT_PERIOD", str(period)],
    arm_args=lambda arm, base: ([], [str(v) for v in arm_overrides(
        arm, base.MODEL.ROI_HEADS.NAME, base.MODEL.META_ARCHITECTURE, base.MODEL.PROPOSAL_GENERATOR.NAME)]),
    schedule=lambda base: {"max_iter": base.SOLVER.MAX_ITER, "ims_per_batch": base.SOLVER.IMS_PER_BATCH,
                           "train": list(base.DATASETS.TRAIN), "test": list(base.DATASETS.TEST)},
)


def _lazy_device(opts):
    values = [o.split("=", 1)[1] for o in opts if str(o).startswith("train.device=")]
    return values[-1] if values else None


def _lazy_schedule(base):
    train, test = dataset_names(base)
    return {"max_iter": base.train.max_iter, "ims_per_batch": base.dataloader.train.total_batch_size,
            "train": train, "test": test}


LAZY = ConfigKind(
    tool="lazyconfig_train_net.py",
    argument_parser=lazy_argument_parser,
    build_config=build_lazy_config,
    device_opts=lambda device: [f"train.device={device}"],
    device_of=_lazy_device,
    run_opts=lambda seed, run_dir: [f"train.seed={seed}", f"train.output_dir={run_dir}"],
    checkpoint_opts=lambda period: [f"train.checkpointer.period={period}"],
    arm_args=lambda arm, base: (["--arm", arm], []),
    schedule=_lazy_schedule,
)


# A yacs arm that bootstraps over a negative pool (ohem_d2.arms.BOOTSTRAP_ARMS): tools/bootstrap.py,
# whose options are train_net.py's plus the rounds'.
BOOTSTRAP = replace(YACS, tool="bootstrap.py", argument_parser=bootstrap_argument_parser)


def config_kind(config_file):
    """LAZY for a ``.py`` config, YACS otherwise."""
    return LAZY if str(config_file).endswith(".py") else YACS


def arm_kind(kind, arm):
    """How ``arm`` of an experiment of config ``kind`` runs: BOOTSTRAP for a bootstrapping arm of a
    yacs experiment, else ``kind``."""
    return BOOTSTRAP if kind is YACS and arm in BOOTSTRAP_ARMS else kind
