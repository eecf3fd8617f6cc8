"""At test time an OHEM model is its stock model: same keys, same weights, same outputs."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import load_cfg

pytestmark = pytest.mark.model

PAIRS = [
    ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml"),
    ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", "COCO-Detection/faster_rcnn_R_50_C4_1x_ohem.yaml"),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
     "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_ohem.yaml"),
    ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "COCO-Detection/retinanet_R_50_FPN_1x_ohem.yaml"),
    ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", "COCO-Detection/retinanet_R_50_FPN_1x_ssd_mining.yaml"),
    ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml"),
]


def build(config, seed):
    torch.manual_seed(seed)
    # Keep every detection so that the comparison covers many outputs, not an empty list.
    return build_model(load_cfg(config, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                                         "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0]))


def transfer(src, dst, tmp_path):
    """Save ``src`` with Detectron2's checkpointer and load it into ``dst``; return incompatible keys."""
    tmp_path.mkdir()
    DetectionCheckpointer(src, save_dir=str(tmp_path)).save("model")
    checkpoint = torch.load(tmp_path / "model.pth", weights_only=False)
    return DetectionCheckpointer(dst)._load_model(checkpoint)


@pytest.mark.parametrize("stock_config, ohem_config", PAIRS)
def test_checkpoints_round_trip_and_inference_is_identical(stock_config, ohem_config, tmp_path):
    stock, ohem = build(stock_config, seed=1), build(ohem_config, seed=2)
    incompatible = transfer(stock, ohem, tmp_path / "to_ohem")
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    incompatible = transfer(ohem, build(stock_config, seed=3), tmp_path / "to_stock")
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    torch.manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128} for _ in range(2)]
    with torch.no_grad():
        expected = stock.eval()(inputs)
        actual = ohem.eval()(inputs)
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert len(e) > 0
        assert e.get_fields().keys() == a.get_fields().keys()
        for name in e.get_fields():
            ev, av = e.get(name), a.get(name)
            ev, av = getattr(ev, "tensor", ev), getattr(av, "tensor", av)
            assert torch.equal(ev, av), name
