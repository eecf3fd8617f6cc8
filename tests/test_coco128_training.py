"""Training iterations with OHEM on real COCO images (the shared coco128 folder)."""
import math

import pytest
import torch

from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import C4_OHEM, FPN_OHEM, MASK_OHEM, load_cfg, require_coco128

pytestmark = pytest.mark.model


def registered(name, json_name):
    root = require_coco128()
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(root / "annotations" / json_name), str(root / "train2017"))
    return name


@pytest.mark.parametrize(
    "config, json_name, mode",
    [
        (FPN_OHEM, "instances_train2017.json", "two_pass"),
        (FPN_OHEM, "instances_train2017.json", "loss_zeroing"),
        (C4_OHEM, "instances_train2017.json", "two_pass"),
        (MASK_OHEM, "instances_train2017_segm.json", "two_pass"),
    ],
)
def test_ohem_training_iterations_on_real_images_give_finite_losses(config, json_name, mode):
    dataset = registered(f"coco128_test_{json_name}", json_name)
    cfg = load_cfg(config, ["DATASETS.TRAIN", (dataset,), "MODEL.OHEM.MODE", mode,
                            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    data = iter(build_detection_train_loader(cfg))
    with EventStorage() as storage:
        for _ in range(2):
            losses = model(next(data))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            storage.step()
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    if config == MASK_OHEM:
        assert "loss_mask" in losses
    history = storage.histories()
    assert history["ohem/mined_per_image"].latest() <= 32
    assert 0.0 <= history["ohem/fg_fraction_mined"].latest() <= 1.0
