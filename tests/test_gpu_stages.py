"""scripts/gpu_stages.py end to end at toy size on the CPU: every stage, the ledger, the budget
stop and resume, and pack / unpack for a fresh machine."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, require_coco128

DRIVER = REPO / "scripts" / "gpu_stages.py"


def stage(name, results, *extra, timeout=600):
    return subprocess.run([sys.executable, str(DRIVER), name, "--toy", "--results", str(results), *map(str, extra)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def ledger(results):
    return json.loads((results / "stages.json").read_text())


def test_tests_stage_runs_once_and_is_skipped_after(tmp_path):
    done = stage("tests", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = ledger(tmp_path)["tests"]
    assert entry["status"] == "done" and entry["attempts"] == 1 and entry["torch"] and entry["device"]
    assert "passed" in (tmp_path / "tests" / "pytest.log").read_text()
    assert (tmp_path / "tests" / "junit.xml").is_file()
    again = stage("tests", tmp_path)
    assert again.returncode == 0 and "[tests] done earlier: skipped" in again.stdout
    assert ledger(tmp_path)["tests"]["attempts"] == 1


def test_benchmark_stage_writes_every_part_and_the_targets(tmp_path):
    require_coco128()
    done = stage("benchmark", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {k for k in ledger(tmp_path) if k.startswith("benchmark/")} == {"benchmark/fpn", "benchmark/mask"}
    summary = (tmp_path / "benchmark" / "summary.md").read_text()
    assert "| R18-FPN ohem fp32: time <= 1.03x stock |" in summary
    assert "| R18-FPN-Mask (bitmask) ohem fp32: peak memory vs stock | n/a | (no target) |" in summary
    assert "### mask" in summary and "| ohem_loss_zeroing | R18-FPN-Mask (bitmask) |" in summary


def test_study_stopped_at_the_budget_resumes_and_packs_without_checkpoints(tmp_path):
    results, data = tmp_path / "results", tmp_path / "data"
    stopped = stage("study", results, "--data-root", data, "--budget-minutes", 0.2)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "run the same command again to resume" in stopped.stdout
    assert ledger(results)["study"]["status"] == "stopped at the budget"

    archive = tmp_path / "pack.tgz"
    done = stage("study", results, "--data-root", data, "--pack", archive)
    assert done.returncode == 0, done.stdout + done.stderr
    entry = ledger(results)["study"]
    assert entry["status"] == "done" and entry["attempts"] == 2
    summary = json.loads((results / "study" / "results.json").read_text())
    assert set(summary["arms"]) == {"stock", "ohem"}
    assert any(results.glob("study/*/seed_0/*.pth"))  # checkpoints stay on the machine ...
    names = tarfile.open(archive).getnames()
    assert "results/study/results.json" in names and "results/study/ohem/seed_0/metrics.json" in names
    assert not [n for n in names if n.endswith(".pth") or "last_checkpoint" in n]  # ... and are not packed

    # A fresh machine seeded from the archive skips the finished study.
    fresh = tmp_path / "fresh"
    again = stage("study", fresh, "--data-root", data, "--unpack", archive)
    assert again.returncode == 0 and "[study] done earlier: skipped" in again.stdout, again.stdout + again.stderr


def test_probe_records_the_speed_of_every_arm(tmp_path):
    done = stage("probe", tmp_path / "results", "--data-root", tmp_path / "data")
    assert done.returncode == 0, done.stdout + done.stderr
    speed = json.loads((tmp_path / "results" / "probe" / "speed.json").read_text())
    assert set(speed) == {"stock", "ohem"} and all(v["s_per_iter"] > 0 for v in speed.values())


def add_json(tar, name, value):
    data = json.dumps(value).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_unpack_keeps_finished_parts_and_runs_only(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_stages

    archive = tmp_path / "state.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        add_json(tar, "r/stages.json", {"tests": {"status": "done"}, "study": {"status": "stopped at the budget"}})
        add_json(tar, "r/study/ohem/seed_0/run.json", {"status": "done"})
        add_json(tar, "r/study/ohem/seed_0/metrics.json", {"iteration": 3})
        add_json(tar, "r/study/stock/seed_0/run.json", {"status": "interrupted"})
        add_json(tar, "r/study/stock/seed_0/metrics.json", {"iteration": 1})
    fresh = tmp_path / "fresh"
    gpu_stages.unpack(archive, fresh)
    assert json.loads((fresh / "stages.json").read_text()) == {"tests": {"status": "done"}}
    assert (fresh / "study" / "ohem" / "seed_0" / "metrics.json").is_file()
    assert not (fresh / "study" / "stock" / "seed_0").exists()  # no checkpoint: it starts again
    with pytest.raises(gpu_stages.StageError, match="no such file"):
        gpu_stages.unpack(tmp_path / "missing.tgz", tmp_path / "other")


def test_a_part_whose_budget_is_spent_before_it_starts_is_recorded_as_stopped(tmp_path):
    """A slow machine can spend a short budget before the first part starts (the environment probe
    imports torch): the ledger must still say the stage stopped, so that a resume knows."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_stages

    ledger_ = gpu_stages.Ledger(tmp_path)
    spent = gpu_stages.Budget(deadline=0.0)
    status = gpu_stages.run_part(ledger_, "study", [sys.executable, "-c", "raise SystemExit(5)"],
                                 tmp_path / "study.log", spent)
    assert status == gpu_stages.STOPPED and not (tmp_path / "study.log").exists()  # never started
    assert ledger(tmp_path)["study"]["status"] == "stopped at the budget"


def test_ops_stage_writes_the_counts_and_the_timed_table(tmp_path):
    require_coco128()
    done = stage("ops", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {k for k in ledger(tmp_path) if k.startswith("ops/")} == {"ops/counts", "ops/time"}
    summary = (tmp_path / "ops" / "summary.md").read_text()
    assert "| ohem | R50-FPN |" in summary and "| CUDA-reported syncs |" in summary
    assert "| ohem | R18-FPN | fp32 |" in summary
