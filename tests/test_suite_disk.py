"""The suite's own disk use: CI's disk is small, and the suite trains dozens of models (issue of
stop 22: a run filled the disk in test_bootstrap.py and every test after it failed to make its
tmp_path). This runs a two-module suite under this suite's conftest.py and setup.cfg and checks
what stays on disk."""
import shutil
import subprocess
import sys

from conftest import REPO

FIRST = '''
import pytest

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    (folder / "model_final.pth").write_bytes(b"0" * 1000)
    (folder / "metrics.json").write_text("{}")
    return folder

def test_a_module_fixtures_checkpoint_is_there_for_its_module(run):
    assert (run / "model_final.pth").is_file()

def test_and_still_there_for_the_next_test(run):
    assert (run / "model_final.pth").is_file()

def test_own_folder(tmp_path):
    (tmp_path / "model_0000001.pth").write_bytes(b"0")

def test_failing(tmp_path):
    (tmp_path / "log.txt").write_text("kept for the post-mortem")
    assert False
'''

SECOND = '''
def test_the_first_module_left_no_checkpoint(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert sorted(p.name for p in base.rglob("*.pth")) == []
    assert (next(base.glob("run*")) / "metrics.json").is_file()
    assert [p for p in base.glob("test_own_folder*") if not p.is_symlink()] == []
    assert [p.read_text() for p in base.rglob("log.txt")] == ["kept for the post-mortem"]
'''


def test_checkpoints_go_after_their_module_and_passing_tests_folders_when_they_end(tmp_path):
    suite = tmp_path / "suite"
    (suite / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", suite / "tests" / "conftest.py")
    shutil.copy(REPO / "setup.cfg", suite / "setup.cfg")
    (suite / "tests" / "test_a.py").write_text(FIRST)
    (suite / "tests" / "test_b.py").write_text(SECOND)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "base"), "tests"], cwd=suite, capture_output=True, text=True, timeout=300)
    assert "1 failed, 4 passed" in done.stdout, done.stdout[-3000:]
    assert "test_failing" in done.stdout and "test_the_first_module_left_no_checkpoint" not in done.stdout.split(
        "short test summary")[-1]
