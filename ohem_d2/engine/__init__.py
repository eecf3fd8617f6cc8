"""What the tools share, so that each tool is setup / main / launch: config building and checking
(yacs in ``defaults``, LazyConfig in ``lazy``), argument parsers, the trainer, the launch of the
workers (``launch``) and the hooks."""
from .defaults import (
    USER_ERRORS,
    Trainer,
    build_config,
    config_argument_parser,
    training_argument_parser,
    write_eval_results,
)
from .hooks import PeakMemoryHook
from .launch import create_ddp_model, exit_on, launch_workers, worker_environment

__all__ = [
    "USER_ERRORS",
    "PeakMemoryHook",
    "Trainer",
    "build_config",
    "config_argument_parser",
    "create_ddp_model",
    "exit_on",
    "launch_workers",
    "training_argument_parser",
    "worker_environment",
    "write_eval_results",
]
