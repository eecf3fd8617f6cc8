"""The essay's other ideas about "hard": label-free uncertainty and margin hardness, and weighting
instead of selecting (importance sampling), against hand-computed cases."""
import dataclasses
import itertools
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.utils.events import EventStorage

from ohem_d2 import OHEM_HARDNESS_REGISTRY, OHEM_SELECTION_REGISTRY, OHEMConfigError, OHEMSettings, SelectionInputs
from ohem_d2.modeling.hardness import margin, uncertainty
from ohem_d2.modeling.hardness import loss as loss_hardness
from ohem_d2.modeling.roi_loss import per_roi_classification_loss, per_roi_losses
from ohem_d2.modeling.selection import importance_sampling

from conftest import C4_OHEM, FPN_OHEM, device, instances, load_cfg, random_fpn_features, random_proposals
from test_cascade import cascade_heads, targets_with_masks
from test_mining import capture_selection, fpn_heads, run_heads
from test_roi_loss import predictor
from test_strategies import FPN_SHAPES, far_apart_boxes, hardness_inputs

pytestmark = pytest.mark.model

LN = math.log


def test_registry_names():
    assert {"uncertainty", "margin"} <= {name for name, _ in OHEM_HARDNESS_REGISTRY}
    assert "importance_sampling" in {name for name, _ in OHEM_SELECTION_REGISTRY}


# ------------------------------------------------------------------------------ uncertainty, margin


def test_uncertainty_and_margin_softmax_by_hand():
    scores = torch.tensor([
        [LN(2), LN(1), LN(1), LN(4)],  # p = (2, 1, 1, 4) / 8: top 1/2 (bg), second 1/4
        [LN(3), LN(3), LN(1), LN(1)],  # p = (3, 3, 1, 1) / 8: a tie between classes 0 and 1
        [0.0, 0.0, 0.0, 0.0],          # uniform: 1/4 each
    ])
    inp = hardness_inputs(predictor(), scores, [0, 0, 3])  # labels do not matter
    torch.testing.assert_close(uncertainty(inp).cpu(), torch.tensor([1 / 2, 5 / 8, 3 / 4]))
    torch.testing.assert_close(margin(inp).cpu(), torch.tensor([1 - (1 / 2 - 1 / 4), 1.0, 1.0]))
    other_labels = hardness_inputs(predictor(), scores, [1, 3, 2])
    assert torch.equal(uncertainty(other_labels), uncertainty(inp)) and torch.equal(margin(other_labels), margin(inp))


def test_uncertainty_and_margin_sigmoid_by_hand():
    ln3 = LN(3.0)
    # K = 3 classes, the last column unused. Per-class decisions: sigmoid(ln 3) = 3/4 fires,
    # sigmoid(-ln 3) = 1/4 does not; sigmoid(-50) ~ 0 surely does not.
    scores = torch.tensor([
        [ln3, -ln3, -50.0, 100.0],  # top vector (1, 0, 0): 3/4 * 3/4 * 1 = 9/16; flip one: 3/16
        [0.0, -50.0, -50.0, 100.0],  # class 0 at 1/2: top 1/2, second 1/2 (a tie)
        [-50.0, -50.0, -50.0, 0.0],  # surely background: top 1, second e^-50
    ])
    inp = hardness_inputs(predictor(use_sigmoid_ce=True), scores, [0, 3, 3])
    torch.testing.assert_close(uncertainty(inp).cpu(), torch.tensor([7 / 16, 1 / 2, 0.0]))
    torch.testing.assert_close(margin(inp).cpu(), torch.tensor([1 - (9 / 16 - 3 / 16), 1.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_sigmoid_ce", [False, True])
def test_label_free_hardness_differs_from_the_loss(use_sigmoid_ce):
    """A confidently wrong RoI is the hardest for the loss and the easiest here; a look-alike the
    classifier hesitates over (class 0 or 1) is the other way round."""
    if use_sigmoid_ce:
        wrong, lookalike = [-12.0, -12.0, 12.0, 0.0], [0.0, 0.0, -12.0, 0.0]
    else:
        wrong, lookalike = [0.0, 0.0, 12.0, 0.0], [5.0, 5.0, 0.0, 0.0]
    box_predictor = predictor(use_sigmoid_ce=use_sigmoid_ce)
    scores = torch.tensor([wrong, lookalike])
    gt_classes = torch.tensor([0, 0], device=device())
    cls_loss = per_roi_classification_loss(box_predictor, scores.to(device()), gt_classes)
    inp = dataclasses.replace(hardness_inputs(box_predictor, scores, [0, 0]), cls_loss=cls_loss, loss="cls")
    assert loss_hardness(inp).argmax() == 0  # the loss: the wrong one is hardest
    assert uncertainty(inp).argmax() == 1 and margin(inp).argmax() == 1
    assert uncertainty(inp)[0] < 1e-3 and margin(inp)[0] < 1e-3  # confident: easy for both


# ---------------------------------------------------------------------------- importance sampling


def sampling_inputs(hardness, image_ids, num_images, b, temperature=1.0, boxes=None):
    n = len(hardness)
    return SelectionInputs(
        hardness=torch.tensor(hardness, dtype=torch.float32, device=device()),
        boxes=far_apart_boxes(n) if boxes is None else boxes.to(device()),
        image_ids=torch.tensor(image_ids, device=device()),
        is_fg=torch.zeros(n, dtype=torch.bool, device=device()),
        num_images=num_images, batch_size_per_image=b, nms_thresh=1.0, sampling_temperature=temperature,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_frequencies_follow_the_tempered_hardness(temperature):
    """2000 images with the same 5 candidates, 4 draws each: the draw counts (recovered from the
    weights) average 4 * q_j, q_j proportional to hardness ** (1 / temperature)."""
    hardness, num_images, b = [1.0, 2.0, 3.0, 4.0, 10.0], 2000, 4
    inp = sampling_inputs(hardness * num_images, [i for i in range(num_images) for _ in hardness], num_images, b,
                          temperature, boxes=far_apart_boxes(5).repeat(num_images, 1))
    torch.manual_seed(0)
    indices, num_candidates, weights = importance_sampling(inp)
    q = torch.tensor(hardness) ** (1 / temperature)
    q = q / q.sum()
    # w_j = (c_j / (b q_j)) * M / R: the counts c_j are integers that sum to b per image.
    counts = (weights.cpu() * b * q[indices.cpu() % 5] * num_candidates / len(indices))
    assert torch.allclose(counts, counts.round(), atol=1e-3) and counts.round().min() >= 1
    totals = torch.zeros(5).index_add_(0, indices.cpu() % 5, counts.round())
    assert totals.sum() == b * num_images
    torch.testing.assert_close(totals / (b * num_images), q, atol=0.015, rtol=0)


def test_importance_weights_make_the_loss_unbiased_by_hand(monkeypatch):
    """Image 0: 3 candidates, hardness 1, 2, 3 (q = 1/6, 2/6, 3/6), B/N = 2 draws; image 1: one
    candidate, fewer than B/N, trained on as it is. Over the 9 possible draws of image 0, the
    expected weighted loss (1/M) sum w_j l_j is the mean of the 4 candidates' losses, for losses
    that are not the hardness."""
    q = [1 / 6, 2 / 6, 3 / 6]
    column = [2, 1, 0]  # each candidate's column in its image's row: rank by hardness, hardest first
    losses = torch.tensor([4.0, 1.0, 2.0, 5.0])
    inp = sampling_inputs([1.0, 2.0, 3.0, 0.5], [0, 0, 0, 1], 2, 2)
    expectation = 0.0
    for a, b in itertools.product(range(3), repeat=2):
        drawn = torch.tensor([[column[a], column[b]], [0, 0]], device=device())
        monkeypatch.setattr(torch, "multinomial", lambda probs, n, replacement: drawn)
        indices, num_candidates, weights = importance_sampling(inp)
        assert num_candidates == 4 and sorted(indices.tolist()) == sorted({a, b} | {3})
        estimate = float((weights.cpu() * losses[indices.cpu()]).sum() / len(indices))
        if (a, b) == (2, 2):  # drawn twice, expected 2 * 3/6 = 1 time: w = 2 * M / R = 2 * 2 / 4
            assert weights.tolist() == [1.0, 0.5]  # and the single candidate of image 1: 1 * 2 / 4
            assert estimate == pytest.approx((1.0 * 2.0 + 0.5 * 5.0) / 2)
        expectation += q[a] * q[b] * estimate
    assert expectation == pytest.approx(float(losses.mean()))


def test_all_candidates_when_the_budget_covers_them():
    inp = sampling_inputs([0.5, 0.1, 0.9, 0.0], [0, 0, 1, 1], 2, 2)
    indices, num_candidates, weights = importance_sampling(inp)
    assert indices.tolist() == [0, 1, 2, 3] and weights.tolist() == [1.0] * 4  # the plain mean


def test_no_candidates_and_all_zero_hardness():
    inp = sampling_inputs([], [], 2, 3)
    inp = dataclasses.replace(inp, boxes=torch.zeros(0, 4, device=device()), image_ids=inp.image_ids.long())
    indices, num_candidates, weights = importance_sampling(inp)
    assert (len(indices), num_candidates, len(weights)) == (0, 0, 0)
    torch.manual_seed(0)
    indices, _, weights = importance_sampling(sampling_inputs([0.0] * 6, [0] * 6, 1, 2))  # uniform draws
    assert 1 <= len(indices) <= 2 and torch.isfinite(weights).all()


# ------------------------------------------------------------------------------ in the heads


def trainable_pass_input(heads):
    """The box head's input of each call with autograd on (the trainable pass), its gradient kept."""
    inputs = []

    def keep(module, inp):
        if torch.is_grad_enabled():
            inp[0].retain_grad()
            inputs.append(inp[0])

    heads.box_head.register_forward_pre_hook(keep)
    return inputs


def test_fpn_training_step_trains_on_the_drawn_rois_only_with_their_weights():
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.SELECTION", "importance_sampling",
                            "MODEL.OHEM.NMS_THRESH", 1.0])
    pooled = trainable_pass_input(heads)
    selected = capture_selection(heads)
    torch.manual_seed(0)
    mined, losses, storage = run_heads(heads, features_require_grad=True)
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < len(selected[0]) <= 16 and all(0 < len(m) <= 8 for m in mined)
    assert len(pooled) == 1 and pooled[0].shape[0] == len(selected[0])  # one trainable pass, drawn RoIs only
    grad = pooled[0].grad.flatten(1).abs().sum(dim=1)
    assert torch.isfinite(grad).all() and (grad > 0).all()
    weights = torch.cat([m.ohem_weight for m in mined])
    assert weights.shape == (len(selected[0]),) and (weights > 0).all()
    assert "fast_rcnn/cls_accuracy" in storage.latest()


@pytest.mark.parametrize("mode", ["two_pass", "loss_zeroing"])
def test_weighted_losses_are_the_weighted_mean_of_the_per_roi_losses(mode):
    """Both modes give (1/M) sum_j w_j l_j, l_j Detectron2's per-RoI loss of the drawn RoI."""
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.SELECTION", "importance_sampling",
                            "MODEL.OHEM.MODE", mode])
    torch.manual_seed(1)
    mined, losses, _ = run_heads(heads)
    features = [random_fpn_features()[f] for f in heads.box_in_features]  # run_heads's
    with torch.no_grad(), EventStorage():
        cls_loss, box_loss = per_roi_losses(heads.box_predictor, heads._box_predictions(features, mined, 0), mined)
    weights = torch.cat([m.ohem_weight for m in mined])
    num = len(weights)
    torch.testing.assert_close(losses["loss_cls"].detach(), (weights * cls_loss).sum() / num)
    torch.testing.assert_close(losses["loss_box_reg"].detach(), (weights * box_loss).sum() / num)


def test_c4_head_applies_the_weights():
    cfg = load_cfg(C4_OHEM, ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 4, "MODEL.OHEM.SELECTION", "importance_sampling"])
    heads = build_roi_heads(cfg, {"res4": ShapeSpec(channels=256, stride=16)}).to(device()).train()
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30]], gt_classes=[3])] * 2
    box_losses = []
    original = heads._box_losses
    heads._box_losses = lambda *args: box_losses.append(args[2]) or original(*args)
    torch.manual_seed(0)
    with EventStorage():
        _, losses = heads(None, {"res4": torch.randn(2, 256, 4, 4).to(device())}, random_proposals(), targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(box_losses) == 1 and all(m.has("ohem_weight") for m in box_losses[0])


def test_cascade_refuses_weights_in_two_pass_and_applies_them_by_loss_zeroing():
    features, proposals = random_fpn_features(), random_proposals()
    opts = ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 4, "MODEL.OHEM.SELECTION", "importance_sampling"]
    with pytest.raises(OHEMConfigError, match=r"MODEL\.OHEM\.SELECTION = 'importance_sampling' is invalid: "
                                              r"expected a strategy without RoI weights for OHEMCascadeROIHeads"):
        with EventStorage():
            cascade_heads(opts)(None, features, [p[:] for p in proposals], targets_with_masks())
    heads = cascade_heads(opts + ["MODEL.OHEM.MODE", "loss_zeroing"])
    with EventStorage():
        _, losses = heads(None, features, [p[:] for p in proposals], targets_with_masks())
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), "1.0", True])
def test_bad_sampling_temperature_is_refused(value):
    cfg = load_cfg(FPN_OHEM)
    cfg.MODEL.OHEM.SAMPLING_TEMPERATURE = value
    with pytest.raises(OHEMConfigError, match=rf"MODEL\.OHEM\.SAMPLING_TEMPERATURE = {value!r} is invalid: "
                                              r"expected a number > 0"):
        build_roi_heads(cfg, FPN_SHAPES)


def test_default_and_integer_temperature():
    assert OHEMSettings.from_config(load_cfg(FPN_OHEM)).sampling_temperature == 1.0
    assert OHEMSettings(sampling_temperature=2).sampling_temperature == 2.0  # a float, as yacs gives
