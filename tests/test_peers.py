"""The peers of OHEM as arms: mmdetection's OHEMSampler in OHEM's settings, Libra R-CNN's
IoU-balanced negative sampling, and the focal classification loss; each from one base config with
only the RoI-choosing keys changed, from yacs and from a LazyConfig."""
import math

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, build_roi_heads
from detectron2.utils.events import EventStorage

from ohem_d2 import (
    FocalLossOutputLayers,
    FocalLossRes5ROIHeads,
    FocalLossROIHeads,
    IoUBalancedRes5ROIHeads,
    IoUBalancedROIHeads,
    OHEMROIHeads,
    OHEMSettings,
    SelectionInputs,
)
from ohem_d2.arms import ARMS, RETINANET_BY_KIND, apply_arm_to_lazy_model, arm_overrides
from ohem_d2.baselines.focal_loss import softmax_focal_loss
from ohem_d2.baselines.iou_balanced import IoURecordingMatcher, iou_balanced_negatives
from ohem_d2.modeling.selection import stratified

from conftest import device, instances, load_cfg, random_fpn_features, random_proposals
from test_configs import SAMPLING_KEYS, flatten
from test_roi_loss import labelled_rois, predictor, random_predictions
from test_strategies import FPN_SHAPES

pytestmark = pytest.mark.model

FPN = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
C4 = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
C4_SHAPES = {"res4": ShapeSpec(channels=256, stride=16)}
PEERS = ["mmdet_ohem", "iou_balanced", "focal", "ohem_uncertainty", "ohem_margin", "ohem_importance_sampling"]


def arm_cfg(arm, config=FPN, opts=()):
    cfg = load_cfg(config)
    cfg.merge_from_list(arm_overrides(arm, cfg.MODEL.ROI_HEADS.NAME) + list(opts))
    return cfg


def build_heads(cfg, seed=0):
    torch.manual_seed(seed)
    shapes = C4_SHAPES if "Res5" in cfg.MODEL.ROI_HEADS.NAME else FPN_SHAPES
    return build_roi_heads(cfg, shapes).to(device()).train()


def one_training_step(heads, seed=0):
    """A training step of FPN ``heads`` on random features, one image with GT and one without."""
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7]),
               instances((64, 64), None, gt_boxes=[], gt_classes=torch.zeros(0, dtype=torch.long))]
    with EventStorage():
        _, losses = heads(None, random_fpn_features(), random_proposals(seed=seed), targets)
    sum(losses.values()).backward()
    return losses


# ------------------------------------------------------------------------------------------ arms


@pytest.mark.parametrize("arm", [arm for arm, (_, kind, _) in ARMS.items() if kind not in RETINANET_BY_KIND])
@pytest.mark.parametrize("config", [FPN, C4])
def test_every_arm_is_the_base_config_with_only_the_roi_choice_changed(arm, config):
    """Only the choice of what trains changes: the RoIs (the anchors too for ohem_rpn, the images
    for the hard-image arms)."""
    base = load_cfg(config, tiny=False)
    armed = load_cfg(config, arm_overrides(arm, base.MODEL.ROI_HEADS.NAME), tiny=False)
    base, armed = flatten(base), flatten(armed)
    changed = {k for k in base if base[k] != armed[k] and not k.startswith("MODEL.OHEM.")}
    # ohem_rpn chooses the RPN's anchors too (tests/test_arms.py checks it against its config).
    other_choices = {"MODEL.PROPOSAL_GENERATOR.NAME"} if arm == "ohem_rpn" else set()
    other_choices |= {"DATALOADER.SAMPLER_TRAIN"} if "hard_images" in arm else set()
    assert changed <= SAMPLING_KEYS | other_choices, changed
    assert armed["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"] == base["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"] == 512


@pytest.mark.parametrize("arm, head", [("mmdet_ohem", OHEMROIHeads), ("iou_balanced", IoUBalancedROIHeads),
                                       ("focal", FocalLossROIHeads)])
def test_peer_arms_build_their_heads(arm, head):
    heads = build_heads(arm_cfg(arm))
    assert type(heads) is head and heads.batch_size_per_image == 512 and heads.positive_fraction == 0.25


def test_mmdet_ohem_arm_settings():
    s = build_heads(arm_cfg("mmdet_ohem")).ohem
    assert (s.selection, s.loss, s.nms_thresh, s.fg_fraction, s.hardness, s.min_fg_fraction) == \
        ("stratified", "cls", 1.0, 0.25, "loss", 0.0)


@pytest.mark.parametrize("arm, target", [("mmdet_ohem", "OHEMROIHeads"), ("iou_balanced", "IoUBalancedROIHeads"),
                                         ("focal", "FocalLossROIHeads")])
def test_peer_arms_apply_to_a_lazy_config(arm, target):
    model = apply_arm_to_lazy_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, arm)
    heads = instantiate(model.roi_heads)
    assert type(heads).__name__ == target
    if arm == "mmdet_ohem":
        assert heads.ohem == OHEMSettings(selection="stratified", loss="cls", nms_thresh=1.0,
                                          batch_size_per_image=512)
    if arm == "iou_balanced":
        assert isinstance(heads.proposal_matcher, IoURecordingMatcher)
        assert (heads.proposal_matcher.thresholds[1:-1], heads.proposal_matcher.labels) == ([0.5], [0, 1])
    if arm == "focal":
        assert type(heads.box_predictor) is FocalLossOutputLayers and heads.box_predictor.gamma == 2.0


def test_focal_head_refuses_a_stock_predictor():
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.roi_heads._target_ = FocalLossROIHeads
    with pytest.raises(ValueError, match="box_predictor is invalid: expected a FocalLossOutputLayers"):
        instantiate(model.roi_heads)


# ------------------------------------------------------------------------------------ mmdet_ohem


def mmdet_ohem_sampler(loss, is_fg, num, pos_fraction=0.25):
    """mmdetection's OHEMSampler for one image, as its documentation and BaseSampler describe it:
    positives up to int(num * pos_fraction), the hardest by classification loss; negatives up to
    num minus the positives taken, the hardest by the same loss; no NMS."""
    fg = sorted((i for i in range(len(loss)) if is_fg[i]), key=lambda i: -loss[i])
    bg = sorted((i for i in range(len(loss)) if not is_fg[i]), key=lambda i: -loss[i])
    pos = fg[: int(num * pos_fraction)]
    return set(pos) | set(bg[: num - len(pos)])


@pytest.mark.parametrize("fg_share", [0.02, 0.2, 0.6])  # positives short of, near and above the quota
def test_mmdet_ohem_settings_select_as_mmdetections_ohem_sampler(fg_share):
    g = torch.Generator().manual_seed(0)
    num_images, per_image, b = 3, 200, 32  # negatives never short here
    hardness = torch.rand(num_images * per_image, generator=g)
    is_fg = torch.rand(num_images * per_image, generator=g) < fg_share
    image_ids = torch.arange(num_images).repeat_interleave(per_image)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(num_images * per_image, 1)  # all overlapping
    s = build_heads(arm_cfg("mmdet_ohem")).ohem
    inputs = SelectionInputs(hardness.to(device()), boxes.to(device()), image_ids.to(device()), is_fg.to(device()),
                             num_images, b, s.nms_thresh, s.fg_fraction, s.min_fg_fraction)
    selected = set(stratified(inputs)[0].tolist())
    for i in range(num_images):
        rois = range(i * per_image, (i + 1) * per_image)
        expected = mmdet_ohem_sampler([hardness[j].item() for j in rois], [bool(is_fg[j]) for j in rois], b)
        assert {j - i * per_image for j in selected if j in rois} == expected


def test_mmdet_ohem_where_negatives_are_short_lends_to_positives_unlike_mmdetection():
    """The one difference: with fewer negatives than the rest of the budget, ``stratified`` fills
    it with more positives; mmdetection takes at most its positive quota and trains on fewer."""
    loss, is_fg = [0.9, 0.8, 0.7, 0.6, 0.5, 0.1], [1, 1, 1, 1, 1, 0]
    inputs = SelectionInputs(torch.tensor(loss, device=device()), torch.zeros(6, 4, device=device()),
                             torch.zeros(6, dtype=torch.long, device=device()),
                             torch.tensor(is_fg, dtype=torch.bool, device=device()), 1, 4, 1.0, 0.25)
    assert sorted(stratified(inputs)[0].tolist()) == [0, 1, 2, 5]
    assert mmdet_ohem_sampler(loss, is_fg, 4) == {0, 5}


# ---------------------------------------------------------------------------------- iou_balanced


def test_iou_balanced_negatives_take_a_third_of_the_budget_per_bin():
    # Highest IoU 0.45 -> bins [0, 0.15), [0.15, 0.3), [0.3, 0.45); the 0.45 itself is in none.
    ious = torch.tensor([0.05] * 10 + [0.2] * 10 + [0.35] * 10 + [0.45], device=device())
    negatives = torch.arange(31, device=device())
    for seed in range(5):
        torch.manual_seed(seed)
        taken = iou_balanced_negatives(negatives, ious, 9)
        assert len(set(taken.tolist())) == 9
        assert sorted(ious[taken].tolist()) == pytest.approx([0.05] * 3 + [0.2] * 3 + [0.35] * 3)


def test_iou_balanced_negatives_take_a_short_bin_whole_and_fill_at_random():
    ious = torch.tensor([0.05] * 20 + [0.2] * 2 + [0.35] * 20 + [1.0], device=device())  # bins of 1/3
    negatives = torch.arange(42, device=device())
    torch.manual_seed(0)
    taken = iou_balanced_negatives(negatives, ious, 12)
    values = ious[taken].tolist()
    # floor(12 / 3) = 4 per bin: bin [0, 1/3) 4 of its 22, bin [1/3, 2/3) 4 of its 20, bin
    # [2/3, 1) holds no negative; the other 4 at random from the 34 left.
    assert len(set(taken.tolist())) == 12
    assert sum(v < 1 / 3 for v in values) >= 4 and sum(v > 1 / 3 for v in values) >= 4
    assert iou_balanced_negatives(negatives[:5], ious, 12).tolist() == [0, 1, 2, 3, 4]  # all, when few


def boxes_with_ious(ious, gt=(0.0, 0.0, 100.0, 100.0)):
    """Boxes inside ``gt`` sharing its height: IoU = width / 100."""
    return [[gt[0], gt[1], gt[0] + 100.0 * iou, gt[3]] for iou in ious]


@pytest.mark.parametrize("config", [FPN, C4])
def test_iou_balanced_head_samples_the_stock_positives_and_balanced_negatives(config):
    heads = build_heads(arm_cfg("iou_balanced", config, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 12]))
    assert type(heads) is (IoUBalancedROIHeads if config == FPN else IoUBalancedRes5ROIHeads)
    ious = [0.8] * 4 + [0.1] * 30 + [0.4] * 4  # 4 positives (+ the appended GT), 34 negatives
    proposals = [instances((100, 100), boxes_with_ious(ious), objectness_logits=[0.0] * len(ious))] * 2
    targets = [instances((100, 100), None, gt_boxes=[[0, 0, 100, 100]], gt_classes=[5]),
               instances((100, 100), None, gt_boxes=[], gt_classes=torch.zeros(0, dtype=torch.long))]
    torch.manual_seed(0)
    with EventStorage():
        with_gt, without_gt = heads.label_and_sample_proposals(proposals, targets)
    widths = (with_gt.proposal_boxes.tensor[:, 2] / 100).tolist()
    fg = with_gt.gt_classes == 5
    # Quota floor(12 * 0.25) = 3 of the 5 positives; 9 negatives in bins of 1/3 (the GT has IoU 1):
    # 3 from [0, 1/3), 3 of the 4 at 0.4 in [1/3, 2/3), none in [2/3, 1), 3 at random from the rest.
    assert int(fg.sum()) == 3 and len(with_gt) == 12
    negative_ious = [w for w, f in zip(widths, fg.tolist()) if not f]
    assert sum(abs(w - 0.4) < 1e-6 for w in negative_ious) >= 3
    # Random sampling would take 9 * 4 / 34 ~ 1 of the 0.4 ones. An image without GT: random negatives.
    assert len(without_gt) == 12 and (without_gt.gt_classes == heads.num_classes).all()


def test_iou_balanced_head_trains():
    losses = one_training_step(build_heads(arm_cfg("iou_balanced", opts=["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16])))
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------- focal


def focal_predictor(gamma, **kwargs):
    stock = predictor(**kwargs)
    focal = FocalLossOutputLayers(ShapeSpec(channels=8), box2box_transform=stock.box2box_transform,
                                  num_classes=stock.num_classes, gamma=gamma, **kwargs).to(device())
    focal.load_state_dict(stock.state_dict())
    return stock, focal


@pytest.mark.parametrize("use_sigmoid_ce", [False, True])
def test_focal_loss_with_gamma_0_is_the_cross_entropy(use_sigmoid_ce):
    stock, focal = focal_predictor(0.0, use_sigmoid_ce=use_sigmoid_ce, loss_weight={"loss_cls": 2.0})
    proposals = [labelled_rois(0), labelled_rois(1, with_gt=False), labelled_rois(2, num=300)]
    predictions = random_predictions(stock, proposals)
    with EventStorage():
        expected, got = stock.losses(predictions, proposals), focal.losses(predictions, proposals)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit


def test_softmax_focal_loss_down_weights_easy_rois_by_hand():
    scores = torch.tensor([[math.log(27.0), 0.0, 0.0, 0.0],  # p_t = 27 / 30 = 0.9: easy
                           [0.0, 0.0, 0.0, 0.0]])             # p_t = 1 / 4: hard
    gt = torch.tensor([0, 1])
    per_roi = softmax_focal_loss(scores, gt, 2.0)
    expected = torch.tensor([0.1 ** 2 * -math.log(0.9), 0.75 ** 2 * math.log(4.0)])
    torch.testing.assert_close(per_roi, expected)
    # The easy RoI keeps 1% of its cross-entropy, the hard one 56%.
    ce = torch.nn.functional.cross_entropy(scores, gt, reduction="none")
    torch.testing.assert_close(per_roi / ce, torch.tensor([0.01, 0.5625]))
    _, focal = focal_predictor(2.0)
    rois = instances((40, 40), [[0, 0, 10, 10], [20, 20, 30, 30]], gt_boxes=[[0, 0, 10, 10]] * 2, gt_classes=[0, 1])
    with EventStorage():
        loss_cls = focal.losses((scores.to(device()), torch.zeros(2, 12, device=device())), [rois])["loss_cls"]
    torch.testing.assert_close(loss_cls.cpu(), expected.mean())


def test_sigmoid_focal_loss_by_hand():
    ln3 = math.log(3.0)
    # Class 0 (target 1) at p 1/2; class 1 (target 0) at 3/4, so p_t 1/4; class 2 at 1/4, p_t 3/4.
    scores = torch.tensor([[0.0, ln3, -ln3, 5.0]], device=device())
    _, focal = focal_predictor(2.0, use_sigmoid_ce=True)
    rois = instances((40, 40), [[0, 0, 10, 10]], gt_boxes=[[0, 0, 10, 10]], gt_classes=[0])
    with EventStorage():
        loss_cls = focal.losses((scores, torch.zeros(1, 12, device=device())), [rois])["loss_cls"]
    expected = 0.5 ** 2 * math.log(2) + 0.75 ** 2 * math.log(4) + 0.25 ** 2 * math.log(4 / 3)
    assert float(loss_cls) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_of_no_roi_is_zero():
    _, focal = focal_predictor(2.0)
    empty = instances((40, 40), [], gt_boxes=[], gt_classes=torch.zeros(0, dtype=torch.long))
    with EventStorage():
        losses = focal.losses((torch.zeros(0, 4, device=device()), torch.zeros(0, 12, device=device())), [empty])
    assert float(losses["loss_cls"]) == 0.0


@pytest.mark.parametrize("config", [FPN, C4])
def test_focal_heads_start_from_the_stock_weights_and_train(config):
    stock = build_heads(load_cfg(config, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16]))
    focal = build_heads(arm_cfg("focal", config, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16]))
    assert type(focal) is (FocalLossROIHeads if config == FPN else FocalLossRes5ROIHeads)
    assert type(focal.box_predictor) is FocalLossOutputLayers and type(stock.box_predictor) is FastRCNNOutputLayers
    assert focal.box_predictor.gamma == 2.0
    expected = stock.state_dict()
    assert focal.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in focal.state_dict().items())
    if config == FPN:
        losses = one_training_step(focal)
        assert all(torch.isfinite(v) for v in losses.values())
