"""The runner's arms are exactly the configs' arms: same keys changed, to the same values."""
import pytest

from detectron2.config import instantiate
from detectron2 import model_zoo

from ohem_d2 import OHEMRPN
from ohem_d2.arms import ARMS, RETINANET_BY_KIND, UnknownArmError, apply_arm_to_lazy_model, arm_overrides

from conftest import load_cfg
from test_configs import OHEM_YAMLS, flatten

SUFFIX = {"stock": "", "fast_rcnn_heuristics": "_fast_rcnn_heuristics", "ohem": "_ohem"}


@pytest.mark.parametrize("ohem_config", OHEM_YAMLS)
@pytest.mark.parametrize("arm", list(SUFFIX))
def test_arm_overrides_on_the_stock_config_give_the_arm_config(ohem_config, arm):
    stock = load_cfg(ohem_config.replace("_ohem", ""), tiny=False)
    stock.merge_from_list(arm_overrides(arm, stock.MODEL.ROI_HEADS.NAME))
    expected = flatten(load_cfg(ohem_config.replace("_ohem", SUFFIX[arm]), tiny=False))
    assert flatten(stock) == expected


def test_every_arm_builds_from_an_ohem_base_and_unknown_arms_are_refused():
    heads = {"ohem": "OHEMROIHeads", "iou_balanced": "IoUBalancedROIHeads", "focal": "FocalLossROIHeads"}
    for arm, (_, kind, _) in ARMS.items():
        if kind in RETINANET_BY_KIND:
            continue
        assert arm_overrides(arm, "OHEMROIHeads")[:2] == ["MODEL.ROI_HEADS.NAME", heads.get(kind, "StandardROIHeads")]
    with pytest.raises(UnknownArmError, match="unknown arm 'ohme'"):
        arm_overrides("ohme", "StandardROIHeads")
    with pytest.raises(UnknownArmError, match="no OHEM counterpart"):
        arm_overrides("ohem", "RROIHeads")
    with pytest.raises(UnknownArmError, match="arm 'focal' has no head for the CascadeROIHeads family"):
        arm_overrides("focal", "CascadeROIHeads")


@pytest.mark.parametrize("base", ["CascadeROIHeads", "OHEMCascadeROIHeads", "FastRCNNHeuristicsCascadeROIHeads"])
def test_a_cascade_base_of_any_arm_gives_every_cascade_arm(base):
    """A comparison may start from the OHEM or the heuristics cascade config as well as the stock one."""
    assert arm_overrides("stock", base)[:2] == ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads"]
    assert arm_overrides("ohem", base)[:2] == ["MODEL.ROI_HEADS.NAME", "OHEMCascadeROIHeads"]
    assert arm_overrides("fast_rcnn_heuristics", base)[:2] == ["MODEL.ROI_HEADS.NAME", "FastRCNNHeuristicsCascadeROIHeads"]


RETINANET_SUFFIX = {"retinanet_focal": "", "retinanet_ohem": "_ohem", "retinanet_ssd": "_ssd_mining"}


@pytest.mark.parametrize("base", ["COCO-Detection/retinanet_R_50_FPN_1x.yaml",
                                  "COCO-Detection/retinanet_R_50_FPN_1x_ssd_mining.yaml"])
@pytest.mark.parametrize("arm", list(RETINANET_SUFFIX))
def test_retinanet_arms_on_a_retinanet_base_give_the_arm_config(base, arm):
    cfg = load_cfg(base, tiny=False)
    cfg.merge_from_list(arm_overrides(arm, cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.META_ARCHITECTURE))
    expected = flatten(load_cfg(f"COCO-Detection/retinanet_R_50_FPN_1x{RETINANET_SUFFIX[arm]}.yaml", tiny=False))
    # A stock RetinaNet reads no MODEL.OHEM key: those it inherits from a mining base are inert.
    unread = {k for k in expected if k.startswith("MODEL.OHEM.")} if arm == "retinanet_focal" else set()
    assert {k: v for k, v in flatten(cfg).items() if k not in unread} == {
        k: v for k, v in expected.items() if k not in unread}


def test_retinanet_ce_is_stock_retinanet_with_plain_cross_entropy():
    assert arm_overrides("retinanet_ce", "Res5ROIHeads", "OHEMRetinaNet") == [
        "MODEL.META_ARCHITECTURE", "RetinaNet",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", 0.0, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", -1.0]


def test_arms_of_another_meta_architecture_are_refused_in_one_line():
    with pytest.raises(UnknownArmError, match=r"^arm 'ohem' does not apply to MODEL.META_ARCHITECTURE 'RetinaNet'"
                                              r": one comparison mixes arms of one meta-architecture, and this "
                                              r"base config's are retinanet_focal, retinanet_ce, retinanet_ohem, "
                                              r"retinanet_ssd$"):
        arm_overrides("ohem", "Res5ROIHeads", "RetinaNet")
    with pytest.raises(UnknownArmError, match=r"^arm 'retinanet_ohem' does not apply to MODEL.META_ARCHITECTURE "
                                              r"'GeneralizedRCNN'[^\n]* stock, [^\n]*ohem_rpn$"):
        arm_overrides("retinanet_ohem", "StandardROIHeads", "GeneralizedRCNN")


def test_ohem_rpn_arm_gives_the_rpn_mining_config_and_the_other_arms_the_stock_rpn():
    stock = load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", tiny=False)
    stock.merge_from_list(arm_overrides("ohem_rpn", stock.MODEL.ROI_HEADS.NAME))
    assert flatten(stock) == flatten(load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml", tiny=False))
    # From an RPN-mining base, every other arm trains Detectron2's RPN.
    base = load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml", tiny=False)
    base.merge_from_list(arm_overrides("ohem", base.MODEL.ROI_HEADS.NAME, proposal_generator="OHEMRPN"))
    assert flatten(base) == flatten(load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml", tiny=False))
    assert "MODEL.PROPOSAL_GENERATOR.NAME" not in arm_overrides("stock", "StandardROIHeads")
    assert "MODEL.PROPOSAL_GENERATOR.NAME" not in arm_overrides("stock", "StandardROIHeads",
                                                                proposal_generator="PrecomputedProposals")
    with pytest.raises(UnknownArmError, match="^arm 'ohem_rpn' mines the RPN's anchors"):
        arm_overrides("ohem_rpn", "StandardROIHeads", proposal_generator="PrecomputedProposals")


def test_ohem_rpn_arm_on_a_lazy_model():
    model = apply_arm_to_lazy_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, "ohem_rpn")
    model.roi_heads.ohem.anchor_batch_size_per_image = 128
    assert model.proposal_generator._target_ is OHEMRPN
    rpn = instantiate(model.proposal_generator)
    assert isinstance(rpn, OHEMRPN)
    stock = apply_arm_to_lazy_model(model, "stock")
    assert "ohem" not in stock.proposal_generator and stock.proposal_generator._target_ is not OHEMRPN
    with pytest.raises(UnknownArmError, match="^arm 'retinanet_ce' is a RetinaNet arm"):
        apply_arm_to_lazy_model(model, "retinanet_ce")


def test_the_runner_gives_each_arm_the_base_configs_meta_architecture_and_rpn():
    from ohem_d2.experiments.config_kinds import YACS

    retinanet = load_cfg("Synthetic-Detection/retinanet_R_18_FPN_scratch.yaml", tiny=False)
    assert YACS.arm_args("retinanet_ssd", retinanet) == ([], [
        "MODEL.META_ARCHITECTURE", "OHEMRetinaNet", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "0.0",
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0", "MODEL.OHEM.ANCHOR_SELECTION", "hard_negative_ratio",
        "MODEL.OHEM.NEG_POS_RATIO", "3.0"])
    with pytest.raises(UnknownArmError, match="one comparison mixes arms of one meta-architecture"):
        YACS.arm_args("stock", retinanet)
    both = load_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml", tiny=False)
    assert YACS.arm_args("stock", both)[1][-2:] == ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"]
