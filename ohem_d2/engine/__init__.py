"""What the tools share, so that each tool is setup / main / launch: config building and checking
(yacs in ``defaults``, LazyConfig in ``lazy``, the weights a run loads in ``weights``), argument
parsers, the trainer, the launch of the workers (``launch``) and the hooks."""
from .defaults import (
    USER_ERRORS,
    Trainer,
    build_config,
    config_argument_parser,
    shown_on_console,
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
    "shown_on_console",
    "training_argument_parser",
    "worker_environment",
    "write_eval_results",
]
