"""A run's folder as the runners see it: its state file ``run.json`` (written by the launcher and,
on a cluster, by the job itself) and how far its training got (``metrics.json``)."""
import json
import os

from .report import read_metrics


def run_state(run_dir):
    """The run's recorded state: status, argv, arm, seed, wall time, and on SLURM its job."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_run_state(run_dir, **state):
    """Replace the run's state, atomically (a reader never sees half a file)."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "run.json"))


def last_iteration(run_dir):
    """Iterations finished, by the last record of metrics.json (0 before the first)."""
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.json")) if "iteration" in r]
    return records[-1]["iteration"] + 1 if records else 0


def seconds_per_iteration(run_dir):
    """The training's recent seconds per iteration (Detectron2's logged ``time``), or None."""
    times = [r["time"] for r in read_metrics(os.path.join(run_dir, "metrics.json")) if "time" in r]
    return times[-1] if times else None
