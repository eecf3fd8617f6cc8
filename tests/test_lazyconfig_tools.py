"""LazyConfig (.py) configs end to end: tools/lazyconfig_train_net.py trains and evaluates one on
the CPU, stops a bad OHEM value with one line, and the runner builds its arms from a .py base."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, require_coco128
from test_run_experiment import coco128_subset

TINY_LAZY_CONFIG = """
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from ohem_d2 import model_zoo as ohem_model_zoo

model = ohem_model_zoo.get_config("common/models/mask_rcnn_fpn_ohem.py").model
model.proposal_generator.post_nms_topk = (64, 64)
model.roi_heads.batch_size_per_image = 32
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.0001
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.max_iter = 2
train.device = "cpu"
train.eval_period = 0
train.checkpointer.period = 100
"""


@pytest.fixture(scope="module")
def lazy_setup(tmp_path_factory):
    root = require_coco128()
    tmp = tmp_path_factory.mktemp("lazy")
    (tmp / "tiny_ohem.py").write_text(TINY_LAZY_CONFIG)
    for split, count in (("train", 4), ("val", 2)):
        coco128_subset(root, split, count, tmp / f"{split}.json", segm=True)
    register = ["--register-coco", "lazy_train", str(tmp / "train.json"), str(root / "train2017"),
                "--register-coco", "lazy_val", str(tmp / "val.json"), str(root / "val2017")]
    datasets = ["dataloader.train.dataset.names=lazy_train", "dataloader.test.dataset.names=lazy_val"]
    return tmp, register, datasets


def tool(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_py_config_trains_and_evaluates_on_the_cpu(lazy_setup):
    tmp, register, datasets = lazy_setup
    out = tmp / "run"
    done = tool("lazyconfig_train_net.py", "--config-file", tmp / "tiny_ohem.py", *register, *datasets,
                f"train.output_dir={out}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("ohem/mined_per_image" in r for r in records)
    assert max(r["iteration"] for r in records if "total_loss" in r) == 1  # train.max_iter 2
    assert "bbox" in json.loads((out / "eval_results.json").read_text())


def test_a_bad_ohem_value_in_a_py_config_is_one_line(lazy_setup):
    tmp, register, datasets = lazy_setup
    done = tool("lazyconfig_train_net.py", "--config-file", tmp / "tiny_ohem.py", *register, *datasets,
                "model.roi_heads.ohem.nms_thresh=1.5", f"train.output_dir={tmp / 'bad'}")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: MODEL.OHEM.NMS_THRESH = 1.5 is invalid: expected an IoU in (0, 1]")


def test_the_runner_builds_its_arms_from_a_py_base(lazy_setup):
    tmp, register, datasets = lazy_setup
    done = tool("run_experiment.py", "--config-file", tmp / "tiny_ohem.py", *register, "--arms", "stock", "ohem",
                "--output", tmp / "exp", "--parallel", 2, *datasets)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp / "exp" / "results.json").read_text())
    assert list(results["arms"]) == ["stock", "ohem"]
    for arm, head in (("stock", "StandardROIHeads"), ("ohem", "OHEMROIHeads")):
        run = json.loads((tmp / "exp" / arm / "seed_0" / "run.json").read_text())
        assert run["argv"][run["argv"].index("--arm") + 1] == arm
        assert head in (tmp / "exp" / arm / "seed_0" / "config.yaml").read_text()
    assert results["arms"]["ohem"]["mean"]["ohem/fg_fraction_mined"] is not None
    assert results["arms"]["stock"]["mean"]["ohem/fg_fraction_mined"] is None
