"""Each tool's --help, as a user sees it: the tool's own description, only the flags it honours,
and no warning on start-up that the user can do nothing about."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

CONFIG_FLAGS = {"--config-file", "--register-coco", "--register-voc", "--register-negatives"}
TRAINING_FLAGS = CONFIG_FLAGS | {"--resume", "--eval-only", "--num-gpus", "--num-machines", "--machine-rank",
                                 "--dist-url"}
FLAGS = {
    "check_datasets.py": CONFIG_FLAGS,
    "visualize_mining.py": CONFIG_FLAGS | {"--weights", "--dataset", "--num-images", "--max-rois", "--output"},
    "train_net.py": TRAINING_FLAGS,
    "bootstrap.py": TRAINING_FLAGS | {"--pool", "--held-out-pool", "--rounds", "--initial-negatives", "--budget",
                                      "--max-negatives", "--score-thresh", "--drop-thresh", "--hard-positives",
                                      "--from-scratch", "--bootstrap-seed", "--choose"},
    "lazyconfig_train_net.py": TRAINING_FLAGS | {"--arm", "--sizes-from-images"},
    "benchmark.py": {"--suite", "--arms", "--heads", "--precisions", "--iters", "--warmup", "--block", "--device",
                     "--threads", "--images", "--annotations", "--seed", "--out", "--image-size"},
    "run_experiment.py": {"--config-file", "--arms", "--reference", "--fp-score-threshold", "--seeds", "--output",
                          "--num-gpus", "--parallel", "--register-coco", "--register-voc", "--synthetic",
                          "--negatives", "--held-out-negatives", "--synthetic-negatives", "--bootstrap-opts",
                          "--data-root", "--report-only", "--launcher", "--status", "--partition", "--account",
                          "--qos", "--time", "--nodes", "--gpus-per-node", "--cpus-per-task", "--mem", "--constraint",
                          "--comment", "--max-in-flight", "--checkpoint-period"},
}


@pytest.fixture(scope="module")
def helps():
    """{tool: (stdout, stderr)} of ``python tools/TOOL --help``, the tools started at once."""
    started = {tool: subprocess.Popen([sys.executable, str(REPO / "tools" / tool), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for tool in FLAGS}
    return {tool: process.communicate(timeout=300) for tool, process in started.items()}


def first_line(tool):
    return ast.get_docstring(ast.parse((REPO / "tools" / tool).read_text())).splitlines()[0]


def test_every_tool_is_listed():
    assert set(FLAGS) == {path.name for path in (REPO / "tools").glob("*.py")}


@pytest.mark.parametrize("tool", sorted(FLAGS))
def test_help_lists_only_the_flags_the_tool_honours_and_describes_that_tool_alone(helps, tool):
    stdout, stderr = helps[tool]
    assert stderr == ""  # no FutureWarning (torch.jit.script in Detectron2's imports), nor any other
    assert set(re.findall(r"^  (--[a-z-]+)", stdout, re.MULTILINE)) == FLAGS[tool]
    assert first_line(tool) in stdout
    assert not [other for other in FLAGS if other != tool and first_line(other) in stdout]
    assert "Run on single machine" not in stdout  # the epilog of Detectron2's train_net


@pytest.mark.parametrize("tool", sorted(FLAGS))
def test_an_example_continued_with_a_backslash_stays_two_lines(helps, tool):
    description = helps[tool][0].split("options:")[0]
    assert not re.search(r"\S {3,}--", description), description
