"""Concurrent multi-process runs of tools/run_experiment.py: each run's own GPUs and rendezvous port."""
import json
import socket

import pytest

from test_run_experiment import TINY_RUN, run_tool

from ohem_d2.engine import exit_on
from ohem_d2.experiments import runner as run_experiment


def test_two_concurrent_two_process_runs_on_cpu_both_finish(tmp_path):
    """Two gloo runs of 2 processes each at once; with one shared port the second run cannot start."""
    out = tmp_path / "exp"
    done = run_tool("run_experiment.py", "--output", out, "--data-root", tmp_path / "data", "--arms", "stock", "ohem",
                    "--parallel", 2, "--num-gpus", 2, *TINY_RUN, "SOLVER.MAX_ITER", 2, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for arm in ("stock", "ohem"):
        run_dir = out / arm / "seed_0"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
        assert "world size: 2" in (run_dir / "train_net.out").read_text().lower()
        # The port is chosen at each start, so it stays out of the argv that a resume compares.
        assert "--dist-url" not in json.loads((run_dir / "run.json").read_text())["argv"]


@pytest.mark.parametrize(
    "parallel, gpus_per_run, gpus, slots",
    [
        (2, 4, ["0", "1", "2", "3", "4", "5", "6", "7"], ["0,1,2,3", "4,5,6,7"]),
        (2, 2, ["3", "5", "6", "7"], ["3,5", "6,7"]),  # carved out of the caller's CUDA_VISIBLE_DEVICES
        (1, 2, ["0", "1", "2"], ["0,1"]),
        (8, 1, [str(i) for i in range(8)], [str(i) for i in range(8)]),  # one GPU per single-GPU run
        (3, 1, ["0", "1"], ["0", "1", "0"]),  # single-GPU runs share GPUs round-robin
        (6, 1, ["0"], ["0"] * 6),  # several small runs sharing one GPU
    ],
)
def test_gpu_slots(parallel, gpus_per_run, gpus, slots):
    assert run_experiment.gpu_slots(parallel, gpus_per_run, gpus) == slots


def test_gpu_slots_refuse_more_gpus_than_visible():
    with pytest.raises(run_experiment.ExperimentError) as error:
        run_experiment.gpu_slots(3, 2, ["0", "1", "2", "3"])
    message = str(error.value)
    assert "\n" not in message
    assert "--parallel 3" in message and "--num-gpus 2" in message and "6 GPUs" in message and "4 are visible" in message
    assert "--parallel 2" in message  # how to go on


def test_gpu_slots_refuse_when_no_gpu_is_visible():
    with pytest.raises(run_experiment.ExperimentError, match="MODEL.DEVICE cpu"):
        run_experiment.gpu_slots(1, 1, [])


def test_visible_gpus_respects_the_callers_list(monkeypatch):
    assert run_experiment.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert run_experiment.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setattr(run_experiment.torch.cuda, "device_count", lambda: 3)
    assert run_experiment.visible_gpus({}) == ["0", "1", "2"]


def test_refusal_comes_before_any_run_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(run_experiment.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(run_experiment.Run, "start", lambda *a: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_info:
        args = run_experiment.argument_parser().parse_args([
            "--output", str(tmp_path / "exp"), "--data-root", str(tmp_path / "data"),
            "--parallel", "2", "--num-gpus", "2", *map(str, TINY_RUN), "MODEL.DEVICE", "cuda"])
        exit_on(run_experiment.USER_ERRORS, run_experiment.run_experiment, args)
    assert str(exit_info.value).startswith("error: --parallel 2") and "4 GPUs" in str(exit_info.value)


def test_free_port_skips_ports_handed_to_other_runs(monkeypatch):
    """The OS may offer the same free port twice before the first run listens on it."""
    offers = iter([5001, 5001, 5002])

    class FakeSocket(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offers))

    monkeypatch.setattr(run_experiment.socket, "socket", FakeSocket)
    assert run_experiment.free_port(taken={5001}) == 5002


def test_free_port_is_free():
    port = run_experiment.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it
