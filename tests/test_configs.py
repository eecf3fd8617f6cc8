"""Every YAML in configs/ loads and builds; the compared arms differ only in how RoIs are chosen;
bad MODEL.OHEM values are refused with a message naming the key."""
import pytest

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ohem_d2 import OHEMConfigError, OHEMMixin, OHEMRetinaNet, OHEMRPN

from conftest import CONFIGS, FPN_OHEM, load_cfg

ALL_YAMLS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))
OHEM_YAMLS = [p for p in ALL_YAMLS if "/" in p and p.endswith("_ohem.yaml") and "retinanet" not in p]
RETINANET_MINING_YAMLS = [p for p in ALL_YAMLS if "/retinanet_" in p and p.endswith(("_ohem.yaml", "_ssd_mining.yaml"))]
# Keys by which the arms of one comparison may differ: the way RoIs are chosen, nothing else.
SAMPLING_KEYS = {
    "MODEL.ROI_HEADS.NAME",
    "MODEL.ROI_HEADS.IOU_THRESHOLDS",
    "MODEL.ROI_HEADS.IOU_LABELS",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION",
}


def flatten(node, prefix=""):
    out = {}
    for k, v in node.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_required_configs_exist():
    for name in [
        "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml",
        "COCO-Detection/faster_rcnn_R_50_C4_1x_ohem.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_ohem.yaml",
        "PascalVOC-Detection/faster_rcnn_R_50_FPN_ohem.yaml",
        "PascalVOC-Detection/faster_rcnn_R_50_C4_ohem.yaml",
    ]:
        assert name in OHEM_YAMLS
        for arm in ("", "_fast_rcnn_heuristics"):
            assert name.replace("_ohem", arm) in ALL_YAMLS
    for name in ["COCO-Detection/retinanet_R_50_FPN_1x_ohem.yaml", "PascalVOC-Detection/retinanet_R_50_FPN_ohem.yaml"]:
        for arm in ("", "_ohem", "_ssd_mining"):
            assert name.replace("_ohem", arm) in ALL_YAMLS
    assert "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml" in ALL_YAMLS
    assert "Synthetic-Detection/retinanet_R_18_FPN_scratch.yaml" in ALL_YAMLS


@pytest.mark.parametrize("config", ALL_YAMLS)
def test_every_yaml_loads_and_builds_a_model(config):
    cfg = load_cfg(config, tiny=False)
    model = build_model(cfg)
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        assert model.num_classes == cfg.MODEL.RETINANET.NUM_CLASSES
        assert isinstance(model, OHEMRetinaNet) == (cfg.MODEL.META_ARCHITECTURE == "OHEMRetinaNet")
        return
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if "OHEM" in cfg.MODEL.ROI_HEADS.NAME:
        assert isinstance(model.roi_heads, OHEMMixin)
    assert isinstance(model.proposal_generator, OHEMRPN) == (cfg.MODEL.PROPOSAL_GENERATOR.NAME == "OHEMRPN")


@pytest.mark.parametrize("ohem_config", OHEM_YAMLS)
def test_arms_share_everything_but_the_roi_choice(ohem_config):
    ohem = flatten(load_cfg(ohem_config, tiny=False))
    for arm in ("", "_fast_rcnn_heuristics"):
        other = flatten(load_cfg(ohem_config.replace("_ohem", arm), tiny=False))
        differing = {k for k in ohem if ohem[k] != other[k] and not k.startswith("MODEL.OHEM.")}
        assert differing <= SAMPLING_KEYS, differing
        # Same RoI budget per image: OHEM's B/N (0 = inherit) equals the baseline's sampler size.
        budget = ohem["MODEL.OHEM.BATCH_SIZE_PER_IMAGE"] or ohem["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
        assert budget == other["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
    # OHEM as in the paper: no bg_lo (nothing ignored below IoU 0.5), NMS 0.7, cls + box loss.
    assert ohem["MODEL.ROI_HEADS.IOU_THRESHOLDS"] == [0.5] and ohem["MODEL.ROI_HEADS.IOU_LABELS"] == [0, 1]
    assert ohem["MODEL.OHEM.NMS_THRESH"] == 0.7 and ohem["MODEL.OHEM.LOSS"] == "cls_box"
    heuristics = flatten(load_cfg(ohem_config.replace("_ohem", "_fast_rcnn_heuristics"), tiny=False))
    assert heuristics["MODEL.ROI_HEADS.IOU_THRESHOLDS"] == [0.1, 0.5]
    assert heuristics["MODEL.ROI_HEADS.IOU_LABELS"] == [-1, 0, 1]
    assert heuristics["MODEL.ROI_HEADS.POSITIVE_FRACTION"] == 0.25


@pytest.mark.parametrize("mining_config", RETINANET_MINING_YAMLS)
def test_retinanet_arms_share_everything_but_the_anchor_loss(mining_config):
    mining = flatten(load_cfg(mining_config, tiny=False))
    stock = flatten(load_cfg(mining_config.replace("_ohem", "").replace("_ssd_mining", ""), tiny=False))
    differing = {k for k in mining if mining[k] != stock[k] and not k.startswith("MODEL.OHEM.")}
    assert differing == {"MODEL.META_ARCHITECTURE", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "MODEL.RETINANET.FOCAL_LOSS_ALPHA"}
    # Plain sigmoid cross-entropy on the mined anchors: Detectron2's focal loss at gamma 0, alpha -1.
    assert mining["MODEL.RETINANET.FOCAL_LOSS_GAMMA"] == 0.0 and mining["MODEL.RETINANET.FOCAL_LOSS_ALPHA"] == -1.0
    selection = "hard_negative_ratio" if mining_config.endswith("_ssd_mining.yaml") else "per_image"
    assert mining["MODEL.OHEM.ANCHOR_SELECTION"] == selection


def test_rpn_mining_config_changes_only_the_proposal_generator():
    ohem = flatten(load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml", tiny=False))
    both = flatten(load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml", tiny=False))
    assert {k for k in both if both[k] != ohem[k] and not k.startswith("MODEL.OHEM.")} == {"MODEL.PROPOSAL_GENERATOR.NAME"}
    assert both["MODEL.OHEM.ANCHOR_BATCH_SIZE_PER_IMAGE"] == both["MODEL.RPN.BATCH_SIZE_PER_IMAGE"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("BATCH_SIZE_PER_IMAGE", -1),
        ("BATCH_SIZE_PER_IMAGE", 2.5),
        ("NMS_THRESH", 0.0),
        ("NMS_THRESH", 1.5),
        ("LOSS", "focal"),
        ("MODE", "one_pass"),
        ("READONLY_CHUNK_SIZE", -8),
        ("READONLY_DTYPE", "int8"),
        ("LOG_DIAGNOSTICS", "yes"),
    ],
)
def test_bad_ohem_values_are_refused_with_the_key_named(key, value):
    cfg = load_cfg(FPN_OHEM)
    cfg.MODEL.OHEM[key] = value
    with pytest.raises(OHEMConfigError, match=rf"MODEL\.OHEM\.{key} = {value!r} is invalid: expected"):
        build_model(cfg)


def test_federated_loss_is_refused():
    cfg = load_cfg(FPN_OHEM, ["MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True])
    with pytest.raises(OHEMConfigError, match="USE_FED_LOSS"):
        build_model(cfg)


def test_missing_add_ohem_config_is_explained():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", "OHEMROIHeads", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with pytest.raises(OHEMConfigError, match=r"add_ohem_config\(cfg\)"):
        build_model(cfg)


def test_ohem_yaml_without_add_ohem_config_fails_at_merge_with_key_named():
    cfg = get_cfg()
    with pytest.raises(KeyError, match="OHEM"):
        cfg.merge_from_file(str(CONFIGS / FPN_OHEM))
