"""Starting the training processes of a run, on GPUs or on the CPU, and the one-line exit on bad input."""
import logging
import os
import sys
from unittest import mock

import detectron2.engine.defaults
from detectron2.engine import launch

logger = logging.getLogger(__name__)


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model``, which also works for CPU processes (gloo), where DDP
    must not be given ``device_ids``."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _stock_create_ddp_model(model, **kwargs)


_stock_create_ddp_model = detectron2.engine.defaults.create_ddp_model


def cpu_ddp():
    """A context in which Detectron2's ``DefaultTrainer`` wraps a CPU model for gloo DDP
    (its ``__init__`` calls ``create_ddp_model`` by that module's global name)."""
    return mock.patch.object(detectron2.engine.defaults, "create_ddp_model", create_ddp_model)


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


def exit_on(errors, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or exit with ``error: <message>`` (one line, no traceback; the
    traceback goes to the debug log) where it raises one of ``errors``."""
    try:
        return fn(*args, **kwargs)
    except errors as e:
        logger.debug("invalid input", exc_info=True)
        sys.exit(f"error: {e.args[0] if e.args else e}")
