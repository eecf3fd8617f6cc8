"""The runner's arms are exactly the configs' arms: same keys changed, to the same values."""
import pytest

from ohem_d2.arms import ARMS, UnknownArmError, arm_overrides

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
