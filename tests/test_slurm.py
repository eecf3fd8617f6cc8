"""The comparison grid on SLURM (tools/run_experiment.py --launcher slurm), against a real cluster.

The cluster is the one-node SLURM of scripts/slurm_local.sh (started by .ci/run); tests that need
it skip where none answers, unless OHEM_D2_REQUIRE_SLURM=1 (as on CI), where that is a failure.
The checks of bad input and the rendezvous need no cluster.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from test_run_experiment import TINY_RUN

from ohem_d2.engine import exit_on
from ohem_d2.experiments import runner, slurm


def slurm_answers():
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return done.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated") for s in done.stdout.split())


def require_slurm():
    if slurm_answers():
        return
    message = "no SLURM cluster answers (start the local one: scripts/slurm_local.sh start)"
    if os.environ.get("OHEM_D2_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def runner_command(out, data, *extra):
    return [sys.executable, str(REPO / "tools" / "run_experiment.py"), "--output", str(out), "--data-root", str(data),
            *map(str, extra), *TINY_RUN]


def run_runner(out, data, *extra, timeout=1200):
    return subprocess.run(runner_command(out, data, *extra), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def comparable(results):
    """results.json without what differs between two launches of the same runs: times and paths."""
    drop = ("wall_time", "s_per_iter", "time", "output", "base_config", "run_dir", "files", "eta")

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not any(d in k for d in drop)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(results)


# ------------------------------------------------------------------------------------------------
# No cluster needed


def test_rendezvous_of_a_multi_node_run_comes_from_slurms_variables(monkeypatch):
    import submitit

    environ = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "3",
               "SLURM_NODEID": "2", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "3",
               "SLURM_JOB_NODELIST": "gpu[07-08],cpu3"}
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert slurm.rendezvous(submitit.JobEnvironment(), environ) == (3, 2, f"tcp://gpu07:{20000 + 123456 % 20000}")
    job = slurm.TrainingJob("tools/train_net.py", ["--num-gpus", "8", "SEED", "0"], "/runs/a",
                            ["SOLVER.CHECKPOINT_PERIOD", "1000"], {}, processes_per_node=8)
    command = job.command(submitit.JobEnvironment(), environ)
    assert command[1:] == ["tools/train_net.py", "--resume", "--num-machines", "3", "--machine-rank", "2",
                           "--dist-url", "tcp://gpu07:23456", "--num-gpus", "8", "SEED", "0",
                           "SOLVER.CHECKPOINT_PERIOD", "1000"]


def test_gpus_per_node_read_from_sinfo_gres():
    assert [slurm._gpus_in(g) for g in ("(null)", "gpu:8", "gpu:a100:4(S:0-1)", "gpu:2,shard:4")] == [0, 8, 4, 2]


def test_a_job_asks_for_one_task_per_node_and_the_resources_given(tmp_path):
    args = runner.argument_parser().parse_args(["--launcher", "slurm", "--num-gpus", "8", "--nodes", "2",
                                                "--partition", "gpu", "--account", "vision", "--max-in-flight", "3"])
    resources = slurm.resources_from(args, "cuda")
    assert resources.executor_parameters(9) == dict(
        partition="gpu", time=1440, nodes=2, ntasks_per_node=1, cpus_per_task=80, mem="480G", array_parallelism=3,
        gpus_per_node=8, account="vision")
    with pytest.raises(slurm.SlurmError, match="--gpus-per-node 4; ask for 8"):
        slurm.resources_from(runner.argument_parser().parse_args(["--num-gpus", "8", "--gpus-per-node", "4"]), "cuda")


def bad_input(tmp_path, monkeypatch, *extra):
    """Run the runner in-process on the tiny grid with ``extra`` options; return its one-line error.
    Nothing may be submitted: sbatch is replaced by a failing stand-in."""
    monkeypatch.setattr(slurm, "submit", lambda *a, **k: pytest.fail("a job was submitted"))
    args = runner.argument_parser().parse_args(["--output", str(tmp_path / "exp"), "--data-root",
                                                str(tmp_path / "data"), "--launcher", "slurm", *map(str, extra),
                                                *TINY_RUN])
    with pytest.raises(SystemExit) as exit_info:
        exit_on(runner.USER_ERRORS, runner.run_experiment, args)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message.split("error: ", 1)[1].strip()
    return message


def test_submitit_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert "pip install submitit" in bad_input(tmp_path, monkeypatch)


def test_no_sbatch_on_path_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "needs SLURM's sbatch, squeue, sinfo on PATH" in bad_input(tmp_path, monkeypatch)


def fake_sinfo(monkeypatch, lines, hostnames):
    def command(argv):
        if argv[0] == "sinfo":
            return "\n".join(lines) + "\n"
        if argv[:3] == ["scontrol", "show", "hostnames"]:
            return "\n".join(hostnames[argv[3]]) + "\n"
        raise AssertionError(argv)

    monkeypatch.setattr(slurm, "_command", command)
    monkeypatch.setattr(slurm.shutil, "which", lambda c: f"/usr/bin/{c}")


def test_unknown_partition_and_too_many_gpus_are_one_line(tmp_path, monkeypatch):
    fake_sinfo(monkeypatch, ["cpu*|(null)|n[1-2]", "gpu|gpu:4|g1"], {"n[1-2]": ["n1", "n2"], "g1": ["g1"]})
    message = bad_input(tmp_path, monkeypatch, "--partition", "gpus")
    assert "--partition 'gpus' is not a partition of this cluster (sinfo lists cpu, gpu)" in message
    message = bad_input(tmp_path, monkeypatch, "--partition", "gpu", "--gpus-per-node", 8)
    assert "--gpus-per-node 8 is more than partition 'gpu' offers (4 per node" in message


def test_a_node_local_path_is_refused_on_a_cluster_of_other_machines(tmp_path, monkeypatch):
    fake_sinfo(monkeypatch, ["cpu*|(null)|n[1-2]"], {"n[1-2]": ["n1", "n2"]})
    if not str(tmp_path).startswith(slurm.NODE_LOCAL):
        pytest.skip(f"pytest's tmp_path {tmp_path} is not in a node-local folder here")
    message = bad_input(tmp_path, monkeypatch)
    assert "in folders local to this machine" in message and "shared filesystem" in message


# ------------------------------------------------------------------------------------------------
# A real one-node SLURM cluster


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The tiny 2-arm x 2-seed grid run locally: the reference of the SLURM grid."""
    require_slurm()
    tmp = tmp_path_factory.mktemp("grid")
    done = run_runner(tmp / "local", tmp / "data", "--arms", "stock", "ohem", "--seeds", 0, 1, "--parallel", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def job_ids(out):
    return {str(p.parent.relative_to(out)): json.loads(p.read_text()).get("job_id") for p in out.rglob("run.json")}


def test_grid_on_slurm_survives_its_launcher_and_reports_as_local(local_grid):
    """Submitted through SLURM, the launcher killed while jobs are queued or running, started again:
    it re-attaches, submits nothing twice, and writes the local run's report."""
    tmp = local_grid
    out = tmp / "slurm"
    command = runner_command(out, tmp / "data", "--arms", "stock", "ohem", "--seeds", 0, 1, "--launcher", "slurm",
                             "--cpus-per-task", 1, "--mem", 2)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and sum(1 for j in job_ids(out).values() if j) < 4:
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    submitted = job_ids(out)
    assert len(submitted) == 4 and all(submitted.values()), first.stdout.read()[-3000:]

    again = run_runner(out, tmp / "data", "--arms", "stock", "ohem", "--seeds", 0, 1, "--launcher", "slurm",
                       "--cpus-per-task", 1, "--mem", 2)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "to submit" in again.stdout and "submitted as SLURM job" not in again.stdout
    assert job_ids(out) == submitted  # nothing submitted twice
    for run_dir in submitted:
        assert os.path.islink(out / run_dir / "slurm.out")
    local = json.loads((tmp / "local" / "results.json").read_text())
    remote = json.loads((out / "results.json").read_text())
    assert comparable(remote) == comparable(local)

    status = run_runner(out, tmp / "data", "--arms", "stock", "ohem", "--seeds", 0, 1, "--launcher", "slurm",
                        "--status")
    assert status.returncode == 0 and status.stdout.count(": done (job ") == 4, status.stdout


def test_a_requeued_job_resumes_from_its_last_checkpoint(tmp_path):
    require_slurm()
    out = tmp_path / "exp"
    command = runner_command(out, tmp_path / "data", "--arms", "ohem", "--launcher", "slurm", "--cpus-per-task", 1,
                             "--mem", 2, "--checkpoint-period", 4)
    command[command.index("SOLVER.MAX_ITER") + 1] = "16"
    runner_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_dir = out / "ohem" / "seed_0"
    deadline = time.time() + 600
    last = run_dir / "last_checkpoint"  # written after the checkpoint file: then the checkpoint is whole
    while time.time() < deadline and not (last.exists() and last.read_text().strip() == "model_0000007.pth"):
        time.sleep(0.2)
    assert (run_dir / "model_0000007.pth").exists() and not (run_dir / "model_final.pth").exists()
    job = json.loads((run_dir / "run.json").read_text())["job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    output, _ = runner_process.communicate(timeout=900)
    assert runner_process.returncode == 0, output[-3000:]
    assert (run_dir / "model_final.pth").exists()
    log = (run_dir / "train_net.out").read_text()
    assert log.count("Starting training from iteration 0") == 1
    resumed = [line for line in log.splitlines() if "Starting training from iteration" in line][-1]
    assert int(resumed.rsplit(" ", 1)[1]) >= 8  # no iteration lost beyond the checkpoint period
    assert json.loads((run_dir / "run.json").read_text())["job_id"] == job  # the same job, requeued
    # The same run, uninterrupted and local, ends with the same weights (ohem_d2.engine.hooks.ExactResume).
    local = tmp_path / "local"
    command = runner_command(local, tmp_path / "data", "--arms", "ohem")
    command[command.index("SOLVER.MAX_ITER") + 1] = "16"
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(local / "ohem" / "seed_0" / "model_final.pth", weights_only=False)["model"]
    actual = torch.load(run_dir / "model_final.pth", weights_only=False)["model"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_two_gloo_processes_of_one_run_on_one_node(tmp_path):
    require_slurm()
    out = tmp_path / "exp"
    done = run_runner(out, tmp_path / "data", "--arms", "ohem", "--launcher", "slurm", "--num-gpus", 2,
                      "--cpus-per-task", 2, "--mem", 4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world size: 2" in (out / "ohem" / "seed_0" / "train_net.out").read_text().lower()


def test_the_bootstrap_arm_runs_its_rounds_as_a_slurm_job(tmp_path):
    """The bootstrap arm goes out as tools/bootstrap.py (not train_net.py), mines its pool in the
    job, and reports its false positives per held-out negative image like a local run."""
    require_slurm()
    out = tmp_path / "exp"
    done = run_runner(out, tmp_path / "data", "--arms", "stock", "bootstrap", "--synthetic-negatives", 4,
                      "--bootstrap-opts", "--rounds 1 --initial-negatives 2 --budget 2 --score-thresh 0.05 "
                      "--drop-thresh 0.01", "--launcher", "slurm", "--cpus-per-task", 1, "--mem", 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = out / "bootstrap" / "seed_0"
    assert json.loads((run_dir / "run.json").read_text())["job_id"]
    state = json.loads((run_dir / "bootstrap.json").read_text())
    assert state["done"] and [r["round"] for r in state["rounds"]] == [0, 1]
    assert "bootstrapping done after round 1" in (run_dir / "train_net.out").read_text()
    results = json.loads((out / "results.json").read_text())
    held_out = json.loads((run_dir / "held_out_negatives.json").read_text())
    assert results["arms"]["bootstrap"]["mean"]["fp_per_negative_image"] == held_out["false_positives_per_image"]
