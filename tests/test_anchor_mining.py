"""Anchor-level OHEM (OHEMRetinaNet, OHEMRPN): per-anchor losses that sum to Detectron2's losses,
the selection by hand, gradients on mined anchors only, a training step per config, bad values."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.proposal_generator import RPN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ohem_d2 import OHEMConfigError, OHEMRetinaNet, OHEMRPN, OHEMSettings, SelectionInputs
from ohem_d2.modeling import anchor_mining
from ohem_d2.modeling.anchor_mining import mine_anchors
from ohem_d2.modeling.selection import hard_negative_ratio

from conftest import load_cfg

RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
RETINANET_OHEM = "COCO-Detection/retinanet_R_50_FPN_1x_ohem.yaml"
RETINANET_SSD = "COCO-Detection/retinanet_R_50_FPN_1x_ssd_mining.yaml"
SYNTHETIC_RETINANET = "Synthetic-Detection/retinanet_R_18_FPN_scratch.yaml"
FPN_OHEM_RPN = "COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml"


def batch(num_images=2, size=128, seed=0):
    """Random images with two GT boxes each (classes 0 and 1), as a data loader gives them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        inst = Instances((size, size))
        xy = torch.rand(2, 2, generator=g) * size / 2
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 16 + torch.rand(2, 2, generator=g) * size / 3], dim=1))
        inst.gt_classes = torch.tensor([0, 1])
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst,
                    "height": size, "width": size})
    return out


def retinanet_loss_inputs(model, inputs):
    """The arguments RetinaNet.forward_training gives its ``losses``, from real model outputs."""
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    predictions = model.head(features)
    anchors = model.anchor_generator(features)
    logits, deltas = model._transpose_dense_predictions(predictions, [model.num_classes, 4])
    gt_labels, gt_boxes = model.label_anchors(anchors, [x["instances"].to(model.device) for x in inputs])
    return anchors, logits, gt_labels, deltas, gt_boxes


def rpn_loss_inputs(model, inputs):
    """The arguments the RPN of a GeneralizedRCNN gives its ``losses``, from real model outputs."""
    rpn = model.proposal_generator
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features)
    logits, deltas = rpn.rpn_head(features)
    logits = [score.permute(0, 2, 3, 1).flatten(1) for score in logits]
    deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
              for x in deltas]
    gt_labels, gt_boxes = rpn.label_and_sample_anchors(anchors, [x["instances"].to(model.device) for x in inputs])
    return anchors, logits, gt_labels, deltas, gt_boxes


# --- the selection, by hand -------------------------------------------------------------------


def test_hard_negative_ratio_keeps_every_positive_and_ratio_times_as_many_hardest_negatives():
    hardness = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2, 0.6, 0.5, 0.4, 0.3, 0.05])
    is_fg = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    image_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    inputs = SelectionInputs(hardness=hardness, boxes=torch.zeros(10, 4), image_ids=image_ids, is_fg=is_fg,
                             num_images=2, batch_size_per_image=1, nms_thresh=0.7, neg_pos_ratio=2.0)
    kept, num_after_nms = hard_negative_ratio(inputs)
    # Image 0: its one positive (easy as it is) and the 2 hardest of its 4 negatives. Image 1 has no
    # positive and counts as one: its 2 hardest negatives. Grouped by image, hardest first; no NMS.
    assert kept.tolist() == [1, 2, 0, 5, 6]
    assert num_after_nms == 10


def test_anchor_mining_is_per_image_after_nms_on_loss_over_the_valid_anchors():
    # 2 images x 6 anchors; anchors 0 and 1 overlap (IoU 0.9), the others are apart.
    anchors = [Boxes(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [20, 0, 30, 10], [40, 0, 50, 10],
                                   [60, 0, 70, 10], [80, 0, 90, 10]], dtype=torch.float32))]
    hardness = torch.tensor([[5.0, 4.0, 3.0, 9.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    valid = torch.tensor([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    is_fg = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    settings = OHEMSettings(anchor_batch_size_per_image=2, log_diagnostics=False)
    keep = mine_anchors(hardness, valid, is_fg, anchors, settings)
    # Image 0: anchor 3 is ignored, anchor 1 is suppressed by the harder anchor 0 -> 0 and 2.
    # Image 1: the two hardest, 5 and 4.
    assert keep.nonzero().tolist() == [[0, 0], [0, 2], [1, 4], [1, 5]]


def test_the_candidate_set_is_bounded_but_holds_every_positive(monkeypatch):
    monkeypatch.setattr(anchor_mining, "CANDIDATES_PER_BUDGET", 1)
    anchors = [Boxes(torch.tensor([[i * 20.0, 0, i * 20.0 + 10, 10] for i in range(8)]))]
    hardness = torch.arange(8.0).flip(0).unsqueeze(0)  # anchor 0 hardest
    valid = torch.ones(1, 8, dtype=torch.bool)
    is_fg = torch.zeros(1, 8, dtype=torch.bool)
    is_fg[0, 7] = True  # the easiest anchor is a positive
    settings = OHEMSettings(anchor_batch_size_per_image=2, anchor_selection="hard_negative_ratio",
                            neg_pos_ratio=2.0)
    with EventStorage() as storage:
        keep = mine_anchors(hardness, valid, is_fg, anchors, settings)
    assert keep.nonzero()[:, 1].tolist() == [0, 1, 7]
    # 2 hardest negatives (max(1 * B/N, 2 * 1)) and the positive reached the strategy.
    assert storage.latest()["ohem/candidates_per_image"][0] == 3
    assert storage.latest()["ohem/fg_fraction_mined"][0] == pytest.approx(1 / 3)


# --- per-anchor losses equal Detectron2's, gradients on mined anchors only ----------------------


@pytest.mark.model
@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (0.0, -1.0)])
def test_retinanet_anchor_losses_sum_to_retinanets_losses(gamma, alpha):
    cfg = load_cfg(RETINANET_OHEM, ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", gamma, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", alpha])
    model = build_model(cfg)
    args = retinanet_loss_inputs(model, batch())
    with EventStorage():
        stock = RetinaNet.losses(model, *args)
    normalizer = model.loss_normalizer
    cls, box = model.anchor_losses(*args)
    assert (box > 0).sum() > 0
    torch.testing.assert_close(cls.sum() / normalizer, stock["loss_cls"])
    torch.testing.assert_close(box.sum() / normalizer, stock["loss_box_reg"])


@pytest.mark.model
def test_rpn_anchor_losses_sum_to_the_rpns_losses_and_no_anchor_is_sampled_away():
    model = build_model(load_cfg(FPN_OHEM_RPN))
    rpn = model.proposal_generator
    assert isinstance(rpn, OHEMRPN)
    args = rpn_loss_inputs(model, batch())
    labels = torch.stack(args[2])
    assert (labels == 0).sum(dim=1).min() > rpn.batch_size_per_image  # all negatives kept as candidates
    with EventStorage():
        stock = RPN.losses(rpn, *args)
    cls, loc = rpn.anchor_losses(*args)
    normalizer = rpn.batch_size_per_image * len(labels)
    torch.testing.assert_close(cls.sum() / normalizer, stock["loss_rpn_cls"])
    torch.testing.assert_close(loc.sum() / normalizer, stock["loss_rpn_loc"])


def _grad_rows(tensors):
    return torch.cat([t.grad for t in tensors], dim=1).abs().flatten(2).sum(-1) > 0


@pytest.mark.model
@pytest.mark.parametrize("config", [RETINANET_OHEM, RETINANET_SSD])
def test_retinanet_gradients_reach_only_the_mined_anchors(config):
    model = build_model(load_cfg(config))
    anchors, logits, gt_labels, deltas, gt_boxes = retinanet_loss_inputs(model, batch())
    logits = [x.detach().requires_grad_() for x in logits]
    deltas = [x.detach().requires_grad_() for x in deltas]
    labels = torch.stack(gt_labels)
    valid, is_fg = labels >= 0, (labels >= 0) & (labels != model.num_classes)
    with EventStorage():
        cls, box = model.anchor_losses(anchors, logits, gt_labels, deltas, gt_boxes)
        keep = mine_anchors(cls + box, valid, is_fg, anchors, model.ohem)
        losses = model.losses(anchors, logits, gt_labels, deltas, gt_boxes)
    sum(losses.values()).backward()
    assert 0 < keep.sum() < valid.sum()
    assert torch.equal(_grad_rows(logits), keep)
    assert torch.equal(_grad_rows(deltas), keep & is_fg)


@pytest.mark.model
def test_rpn_gradients_reach_only_the_mined_anchors():
    model = build_model(load_cfg(FPN_OHEM_RPN))
    rpn = model.proposal_generator
    anchors, logits, gt_labels, deltas, gt_boxes = rpn_loss_inputs(model, batch())
    logits = [x.detach().requires_grad_() for x in logits]
    deltas = [x.detach().requires_grad_() for x in deltas]
    labels = torch.stack(gt_labels)
    with EventStorage() as storage:
        cls, loc = rpn.anchor_losses(anchors, logits, gt_labels, deltas, gt_boxes)
        keep = mine_anchors(cls + loc, labels >= 0, labels == 1, anchors, rpn.ohem)
        losses = rpn.losses(anchors, logits, gt_labels, deltas, gt_boxes)
    sum(losses.values()).backward()
    assert keep.sum(dim=1).tolist() == [rpn.ohem.anchor_batch_size_per_image] * 2
    # A mined anchor whose sigmoid rounds to its label in fp32 (a logit beyond ~17) has a zero gradient.
    all_logits = torch.cat([x.detach() for x in logits], dim=1)
    saturated = torch.sigmoid(all_logits) == (labels == 1).float()
    assert torch.equal(torch.cat([x.grad for x in logits], dim=1) != 0, keep & ~saturated)
    assert torch.equal(_grad_rows(deltas), keep & (labels == 1))
    assert "rpn/ohem/fg_fraction_mined" in storage.latest()


# --- a training step per config, bad values -----------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("config, opts", [
    (RETINANET_OHEM, []),
    (RETINANET_SSD, []),
    (SYNTHETIC_RETINANET, []),
    (SYNTHETIC_RETINANET, ["MODEL.META_ARCHITECTURE", "OHEMRetinaNet"]),
    ("PascalVOC-Detection/retinanet_R_50_FPN_ssd_mining.yaml", []),
    (FPN_OHEM_RPN, []),
])
def test_a_training_step_runs_and_lowers_nothing_to_nan(config, opts):
    model = build_model(load_cfg(config, opts))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage() as storage:
        losses = model(batch())
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert torch.isfinite(total)
    mined = storage.latest()
    if isinstance(model, OHEMRetinaNet):
        assert mined["ohem/mined_per_image"][0] > 0
    if config == FPN_OHEM_RPN:
        assert mined["rpn/ohem/mined_per_image"][0] == 256 and "ohem/mined_per_image" in mined


@pytest.mark.parametrize("key, value", [
    ("ANCHOR_BATCH_SIZE_PER_IMAGE", 0),
    ("ANCHOR_BATCH_SIZE_PER_IMAGE", 1.5),
    ("ANCHOR_SELECTION", "hardest"),
    ("ANCHOR_NMS_THRESH", 0.0),
    ("NEG_POS_RATIO", 0.0),
    ("NEG_POS_RATIO", "3"),
])
def test_bad_anchor_values_are_refused_in_one_line(key, value):
    for config in (RETINANET_OHEM, FPN_OHEM_RPN):
        cfg = load_cfg(config)
        cfg.MODEL.OHEM[key] = value
        with pytest.raises(OHEMConfigError, match=rf"^MODEL\.OHEM\.{key} = {value!r} is invalid: expected [^\n]*$"):
            build_model(cfg)


def test_a_strategy_with_weights_is_refused_for_anchors_in_one_line():
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]]))]
    settings = OHEMSettings(anchor_selection="importance_sampling", log_diagnostics=False)
    with pytest.raises(OHEMConfigError, match=r"^MODEL\.OHEM\.ANCHOR_SELECTION = 'importance_sampling' is invalid"):
        mine_anchors(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool),
                     anchors, settings)
