"""LazyConfig: OHEMSettings with the paper's defaults and one validation, OHEM heads built by
``instantiate`` with or without ``ohem=``."""
import dataclasses

import pytest

from detectron2.config import get_cfg, instantiate
from detectron2.config import LazyCall as L

from ohem_d2 import OHEMConfigError, OHEMROIHeads, OHEMSettings, add_ohem_config


def test_the_defaults_are_the_papers_and_the_yacs_defaults():
    s = OHEMSettings()
    assert (s.nms_thresh, s.loss, s.mode, s.selection, s.hardness) == (0.7, "cls_box", "two_pass", "per_image", "loss")
    cfg = get_cfg()
    add_ohem_config(cfg)
    assert OHEMSettings.from_config(cfg) == s
    assert set(cfg.MODEL.OHEM) == {f.name.upper() for f in dataclasses.fields(OHEMSettings)}


@pytest.mark.parametrize("field, value, message", [
    ("nms_thresh", 1.5, "MODEL.OHEM.NMS_THRESH = 1.5 is invalid: expected an IoU in (0, 1]"),
    ("mode", "one_pass", "MODEL.OHEM.MODE = 'one_pass' is invalid: expected one of ('two_pass', 'loss_zeroing')"),
    ("batch_size_per_image", -1, "MODEL.OHEM.BATCH_SIZE_PER_IMAGE = -1 is invalid"),
])
def test_a_bad_value_gives_the_same_line_as_the_yacs_path(field, value, message):
    with pytest.raises(OHEMConfigError) as lazy:
        OHEMSettings(**{field: value})
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.MODEL.OHEM[field.upper()] = value
    with pytest.raises(OHEMConfigError) as yacs:
        OHEMSettings.from_config(cfg)
    assert str(lazy.value) == str(yacs.value) and str(lazy.value).startswith(message)
    with pytest.raises(OHEMConfigError, match="NMS_THRESH"):  # also inside a LazyConfig's instantiate
        instantiate(L(OHEMSettings)(nms_thresh=0.0))


def test_integer_fractions_become_floats():
    assert OHEMSettings(nms_thresh=1, min_fg_fraction=0).nms_thresh == 1.0


LAZY_CONFIGS = ["common/models/mask_rcnn_fpn{}.py", "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ{}.py"]


def lazy(path):
    from detectron2.config import LazyConfig

    from conftest import CONFIGS

    return LazyConfig.load(str(CONFIGS / path))


def flat(node, prefix=""):
    """Every leaf of a LazyConfig node as {dotted key: value}; classes and functions by name."""
    from omegaconf import OmegaConf

    def leaves(value, key):
        if isinstance(value, dict):
            return {k: v for name, item in value.items() for k, v in leaves(item, f"{key}.{name}").items()}
        return {key: getattr(value, "__qualname__", value)}

    return leaves(OmegaConf.to_container(node), prefix.rstrip("."))


@pytest.mark.parametrize("config", LAZY_CONFIGS)
@pytest.mark.parametrize("arm", ["ohem", "fast_rcnn_heuristics"])
def test_lazy_arm_configs_are_detectron2s_with_only_the_roi_choice_changed(config, arm):
    from detectron2 import model_zoo

    stock = flat(model_zoo.get_config(config.format("")).model, "model.")
    armed = flat(lazy(config.format("_" + arm)).model, "model.")
    changed = {k for k in stock.keys() | armed.keys() if stock.get(k) != armed.get(k)}
    if arm == "ohem":  # Detectron2's matcher is already the paper's (IoU < 0.5 is background)
        expected = {"model.roi_heads._target_", "model.roi_heads.ohem._target_"}
    else:
        expected = {"model.roi_heads.proposal_matcher.thresholds", "model.roi_heads.proposal_matcher.labels"}
    assert changed == expected
    assert armed["model.roi_heads._target_"] == ("OHEMROIHeads" if arm == "ohem" else "StandardROIHeads")


def test_a_lazy_ohem_model_instantiates_and_trains_a_step_on_the_cpu():
    import torch
    from detectron2.utils.events import EventStorage

    from test_cascade import targets_with_masks

    cfg = lazy("common/models/mask_rcnn_fpn_ohem.py")
    cfg.model.roi_heads.ohem.batch_size_per_image = 16
    cfg.model.proposal_generator.post_nms_topk = (64, 64)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert isinstance(model.roi_heads, OHEMROIHeads) and model.roi_heads.ohem.batch_size_per_image == 16
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "instances": t}
             for t in targets_with_masks(size=(96, 128))]
    with EventStorage() as storage:
        losses = model(batch)
    sum(losses.values()).backward()
    assert {"loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < storage.latest()["ohem/mined_per_image"][0] <= 16


def test_the_lsj_box_heads_sync_batch_norm_is_kept_and_scores_with_running_statistics():
    cfg = lazy("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py")
    heads = instantiate(cfg.model.roi_heads)
    from detectron2.layers import NaiveSyncBatchNorm

    assert isinstance(heads, OHEMROIHeads)
    assert sum(isinstance(m, NaiveSyncBatchNorm) for m in heads.box_head.modules()) == 4


@pytest.mark.parametrize("config, selection", [("common/models/retinanet_ohem.py", "per_image"),
                                               ("common/models/retinanet_ssd_mining.py", "hard_negative_ratio")])
def test_lazy_retinanet_mining_configs_are_detectron2s_with_only_the_anchor_loss_changed(config, selection):
    from detectron2 import model_zoo

    from ohem_d2 import OHEMRetinaNet

    stock = flat(model_zoo.get_config("common/models/retinanet.py").model, "model.")
    cfg = lazy(config)
    mined = flat(cfg.model, "model.")
    changed = {k for k in stock.keys() | mined.keys() if stock.get(k) != mined.get(k)}
    assert {k for k in changed if not k.startswith("model.ohem.")} == {
        "model._target_", "model.focal_loss_gamma", "model.focal_loss_alpha"}
    assert mined["model.focal_loss_gamma"] == 0.0 and mined["model.focal_loss_alpha"] == -1.0
    model = instantiate(cfg.model)
    assert isinstance(model, OHEMRetinaNet) and model.ohem.anchor_selection == selection


def test_the_lazy_rpn_mining_config_is_the_ohem_one_with_the_rpn_mining_too():
    import torch
    from detectron2.utils.events import EventStorage

    from ohem_d2.modeling.rpn import OHEMRPN
    from test_cascade import targets_with_masks

    ohem = flat(lazy("common/models/mask_rcnn_fpn_ohem.py").model, "model.")
    both = flat(lazy("common/models/mask_rcnn_fpn_ohem_rpn.py").model, "model.")
    changed = {k for k in ohem.keys() | both.keys() if ohem.get(k) != both.get(k)}
    assert changed == {"model.proposal_generator._target_"} | {k for k in both if k.startswith("model.proposal_generator.ohem.")}
    cfg = lazy("common/models/mask_rcnn_fpn_ohem_rpn.py")
    cfg.model.proposal_generator.post_nms_topk = (64, 64)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert isinstance(model.proposal_generator, OHEMRPN)
    # One settings node: the RoI heads resolve its batch size 0 to their own (512), the RPN has no use for it.
    assert dataclasses.replace(model.proposal_generator.ohem, batch_size_per_image=512) == model.roi_heads.ohem
    batch = [{"image": torch.rand(3, 96, 128) * 255, "instances": t} for t in targets_with_masks(size=(96, 128))]
    with EventStorage() as storage:
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert storage.latest()["rpn/ohem/mined_per_image"][0] == 256
