"""tools/visualize_mining.py: legible side-by-side pictures of what Detectron2's sampler and OHEM
train on, whose boxes are those a training step of either head chooses."""
import json
import os
import subprocess
import sys

import cv2
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from ohem_d2.arms import arm_overrides
from ohem_d2.data.datasets import add_dataset_config, register_coco
from ohem_d2.data.synthetic import generate_synthetic_dataset

from conftest import CONFIGS, REPO, load_cfg, require_coco128

from ohem_d2.experiments import mining_pictures as visualize_mining
from ohem_d2.experiments.mining_pictures import COLOURS, MIN_SHORT_SIDE, write_mining_pictures

SYNTHETIC = "Synthetic-Detection/faster_rcnn_R_18_FPN_scratch.yaml"
CASCADE_OHEM = "COCO-Detection/cascade_mask_rcnn_R_50_FPN_1x_ohem.yaml"
# More proposals than the stock sampler's budget, and OHEM's budget half of that: three different
# counts (candidates, sampled, mined) that a panel drawing the wrong set would not match.
SMALL_RUN = ["MODEL.RPN.POST_NMS_TOPK_TRAIN", 60, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 24,
             "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 12, "DATASETS.TRAIN", ("vis_train",)]
# family -> (config, its stock head, overrides: an OHEM head, small)
FAMILIES = {
    "fpn": (SYNTHETIC, "StandardROIHeads", ["MODEL.ROI_HEADS.NAME", "OHEMROIHeads"]),
    "cascade": (CASCADE_OHEM, "CascadeROIHeads", ["MODEL.MASK_ON", False, "MODEL.ROI_HEADS.NUM_CLASSES", 3,
                                                  "MODEL.ROI_BOX_HEAD.FC_DIM", 128]),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("vis") / "data", num_train=2, num_val=1,
                                      image_size=128)


def setup_run(tmp_path, synthetic, family, stock_head=False):
    """A config with the synthetic train split as ``vis_train`` and a checkpoint of its random
    initialisation: what a finished run leaves, at a test's cost."""
    register_coco("vis_train", synthetic.train_json, synthetic.train_images)
    config, stock, opts = FAMILIES[family]
    cfg = load_cfg(config, opts + SMALL_RUN)
    if stock_head:
        cfg.merge_from_list(arm_overrides("stock", stock))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("init")
    return cfg, tmp_path / "init.pth"


def training_step_scalars(cfg, weights, family, arm, data):
    """The EventStorage scalars of a training forward of ``cfg`` turned into ``arm`` on ``data``."""
    cfg = cfg.clone()
    cfg.merge_from_list(arm_overrides(arm, FAMILIES[family][1]))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    with EventStorage() as storage, torch.no_grad():
        model.train()([data])
    return {name: history.latest() for name, history in storage.histories().items()}


def test_small_images_are_scaled_up_into_two_titled_panels_over_a_legend(tmp_path, synthetic):
    cfg, weights = setup_run(tmp_path, synthetic, "fpn")
    paths = write_mining_pictures(cfg, weights, tmp_path / "vis", num_images=2)
    summary = json.loads((tmp_path / "vis" / "mining.json").read_text())
    assert [os.path.basename(p) for p in paths] == [image["png"] for image in summary] and len(paths) == 2
    for path, image in zip(paths, summary):
        png = cv2.imread(path)
        assert image["input_size"] == [128, 128] and image["scale"] * 128 >= MIN_SHORT_SIDE
        stock, ohem = (image["panels"][name] for name in ("stock", "ohem"))
        for x0, y0, x1, y1 in (stock, ohem):
            assert x1 - x0 == y1 - y0 == 128 * image["scale"] and y0 > 0  # a title above
        assert ohem[0] >= stock[2] and png.shape[1] >= 2 * MIN_SHORT_SIDE  # side by side
        assert (png[: stock[1]] == 255).all(axis=2).any()  # white title text
        x0, y0, x1, y1 = image["legend"]
        assert y0 >= stock[3] and png.shape[:2] == (y1, x1)
        legend = png[y0:y1, x0:x1]
        for kind, colour in COLOURS.items():
            assert (legend == colour).all(axis=2).sum() > 20, kind


@pytest.mark.parametrize("family", ["fpn", "cascade"])
def test_the_panels_hold_what_a_training_step_of_each_head_chooses(tmp_path, synthetic, family):
    """The left panel's RoIs are what a stock head's training step samples (count, fg share), the
    right panel's what the OHEM head mines (for a cascade: stage 0)."""
    cfg, weights = setup_run(tmp_path, synthetic, family)
    write_mining_pictures(cfg, weights, tmp_path / "vis", num_images=1)
    (image,) = json.loads((tmp_path / "vis" / "mining.json").read_text())
    no_flip = cfg.clone()
    no_flip.INPUT.RANDOM_FLIP = "none"
    data = DatasetMapper(no_flip, is_train=True)(DatasetCatalog.get("vis_train")[0])
    stock = training_step_scalars(cfg, weights, family, "stock", data)
    sampled_fg = sum(roi["foreground"] for roi in image["sampled"])
    assert len(image["sampled"]) == stock["roi_head/num_fg_samples"] + stock["roi_head/num_bg_samples"]
    assert sampled_fg == stock["roi_head/num_fg_samples"]
    ohem = training_step_scalars(cfg, weights, family, "ohem", data)
    prefix = "stage0/" if family == "cascade" else ""
    mined_fg = sum(roi["foreground"] for roi in image["mined"])
    assert len(image["mined"]) == ohem[f"{prefix}ohem/mined_per_image"] == 12 < len(image["sampled"])
    assert mined_fg / len(image["mined"]) == pytest.approx(ohem[f"{prefix}ohem/fg_fraction_mined"])


def test_a_panel_draws_the_hardest_mined_and_as_many_sampled_rois_in_their_shares(tmp_path, synthetic):
    cfg, weights = setup_run(tmp_path, synthetic, "fpn")
    write_mining_pictures(cfg, weights, tmp_path / "few", num_images=1, max_rois=8)
    (image,) = json.loads((tmp_path / "few" / "mining.json").read_text())
    sampled, mined, drawn = image["sampled"], image["mined"], image["drawn"]
    assert len(sampled) == 24 and len(mined) == 12 and len(drawn["sampled"]) == len(drawn["mined"]) == 8
    hardest = sorted(range(len(mined)), key=lambda i: mined[i]["hardness"], reverse=True)[:8]
    assert sorted(drawn["mined"]) == sorted(hardest)
    foreground = sum(roi["foreground"] for roi in sampled)
    assert sum(sampled[i]["foreground"] for i in drawn["sampled"]) == round(8 * foreground / len(sampled))
    write_mining_pictures(cfg, weights, tmp_path / "all", num_images=1, max_rois=0)
    (image,) = json.loads((tmp_path / "all" / "mining.json").read_text())
    assert image["drawn"] == {"sampled": list(range(24)), "mined": list(range(12))}
    assert visualize_mining.MAX_ROIS == 32  # the default, of the runner's pictures and the tool's --max-rois


def test_a_panel_title_gives_the_totals_and_how_many_are_drawn():
    rois = Instances((10, 10), gt_classes=torch.tensor([0] * 128 + [3] * 384))
    assert visualize_mining.title("Detectron2 sampler", "RoIs", rois, 3, 32) == \
        "Detectron2 sampler: 512 RoIs, 25% fg (32 drawn)"
    assert visualize_mining.title("OHEM", "mined", rois[:128], 3, "hardest 32") == "OHEM: 128 mined, 100% fg (hardest 32 drawn)"
    assert visualize_mining.title("OHEM", "mined", rois[:16], 3) == "OHEM: 16 mined, 100% fg"


def test_a_stock_run_config_file_is_mined_with_the_ohem_counterpart_head(tmp_path, synthetic):
    """A run's config.yaml (its datasets in DATASETS.REGISTER_COCO) whose head is stock: the same
    checkpoint, mined by the OHEM head of the family."""
    cfg, weights = setup_run(tmp_path, synthetic, "fpn", stock_head=True)
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    add_dataset_config(cfg)
    cfg.DATASETS.REGISTER_COCO = [["vis_train", str(synthetic.train_json), str(synthetic.train_images)]]
    DatasetCatalog.remove("vis_train")  # the config file registers it
    (tmp_path / "config.yaml").write_text(cfg.dump())
    paths = write_mining_pictures(tmp_path / "config.yaml", weights, tmp_path / "vis", num_images=1)
    (image,) = json.loads((tmp_path / "vis" / "mining.json").read_text())
    assert len(paths) == 1 and image["mined"] and all("hardness" in roi for roi in image["mined"])


def test_the_tool_refuses_a_head_without_an_ohem_counterpart(tmp_path, synthetic):
    cfg, weights = setup_run(tmp_path, synthetic, "fpn")
    cfg.merge_from_list(arm_overrides("iou_balanced", cfg.MODEL.ROI_HEADS.NAME))
    with pytest.raises(ValueError, match="'IoUBalancedROIHeads' has no OHEM counterpart"):
        visualize_mining.mining_model(cfg, weights)


def test_the_command_line_tool_on_real_images(tmp_path):
    root = require_coco128()
    out = tmp_path / "vis"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "visualize_mining.py"), *map(str, [
        "--config-file", CONFIGS / "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml",
        "--register-coco", "vis_train", root / "annotations/instances_train2017.json", root / "train2017",
        "--num-images", 2, "--output", out, "DATASETS.TRAIN", "('vis_train',)", "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 192, "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 16,
    ])], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "mining.json").read_text())
    assert len(summary) == 2
    for image in summary:
        assert len(image["mined"]) == 16 and 32 < len(image["sampled"]) <= 512  # ROI_HEADS.BATCH_SIZE_PER_IMAGE
        assert len(image["drawn"]["mined"]) == 16 and len(image["drawn"]["sampled"]) == 32  # --max-rois 32
        hardness = [m["hardness"] for m in image["mined"]]
        assert hardness == sorted(hardness, reverse=True)  # hardest first
        png = cv2.imread(str(out / image["png"]))
        assert png.shape[:2] == (image["legend"][3], image["legend"][2])
        assert min(image["input_size"]) * image["scale"] >= MIN_SHORT_SIDE > min(image["input_size"])
