"""Per-RoI losses use the box predictor's own loss definitions: their means are its losses."""
import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.utils.events import EventStorage

from ohem_d2.modeling.roi_loss import per_roi_losses, regression_targets

from conftest import device, instances

pytestmark = pytest.mark.model

NUM_CLASSES = 3


def predictor(**kwargs):
    return FastRCNNOutputLayers(
        ShapeSpec(channels=8),
        box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
        num_classes=NUM_CLASSES,
        **kwargs,
    ).to(device())


def labelled_rois(seed=0, num=12, with_gt=True):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(num, 2, generator=g) * 20], dim=1)
    gt_boxes = boxes + torch.randn(num, 4, generator=g)
    gt_classes = torch.randint(0, NUM_CLASSES + 1, (num,), generator=g)  # NUM_CLASSES = background
    if not with_gt:
        return instances((80, 80), boxes, gt_classes=torch.full((num,), NUM_CLASSES))
    return instances((80, 80), boxes, gt_boxes=gt_boxes, gt_classes=gt_classes)


def random_predictions(box_predictor, proposals, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(len(p) for p in proposals), 8, generator=g)
    return box_predictor(x.to(device()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"smooth_l1_beta": 1.0},
        {"cls_agnostic_bbox_reg": True},
        {"box_reg_loss_type": "giou"},
        {"box_reg_loss_type": "diou"},
        {"box_reg_loss_type": "ciou"},
        {"use_sigmoid_ce": True},
        {"loss_weight": {"loss_cls": 2.0, "loss_box_reg": 0.5}},
    ],
    ids=["smooth_l1_beta0", "smooth_l1_beta1", "agnostic", "giou", "diou", "ciou", "sigmoid_ce", "weights"],
)
def test_per_roi_means_equal_the_predictor_losses(kwargs):
    box_predictor = predictor(**kwargs)
    proposals = [labelled_rois(0), labelled_rois(1, with_gt=False), labelled_rois(2)]
    predictions = random_predictions(box_predictor, proposals)
    with EventStorage():  # the predictor logs its accuracy there
        expected = box_predictor.losses(predictions, proposals)
    cls_loss, box_loss = per_roi_losses(box_predictor, predictions, proposals)
    assert cls_loss.shape == box_loss.shape == (36,)
    torch.testing.assert_close(cls_loss.mean(), expected["loss_cls"])
    torch.testing.assert_close(box_loss.mean(), expected["loss_box_reg"])


def test_background_rois_have_no_box_loss_and_hand_computed_cross_entropy():
    box_predictor = predictor()
    rois = instances(
        (40, 40),
        [[0, 0, 10, 10], [20, 20, 30, 30]],
        gt_boxes=[[1, 1, 11, 11], [0, 0, 1, 1]],
        gt_classes=[1, NUM_CLASSES],
    )
    scores = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], device=device())
    deltas = torch.zeros(2, 4 * NUM_CLASSES, device=device())
    cls_loss, box_loss = per_roi_losses(box_predictor, (scores, deltas), [rois])
    e2 = torch.exp(torch.tensor(2.0))
    e1 = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(cls_loss.cpu(), torch.stack([torch.log(e2 + 3) - 2, torch.log(e1 + 3)]))
    # fg RoI: zero deltas vs GT shifted by 1 px -> |dx| = |dy| = 10 * 1 / 10 = 1, dw = dh = 0.
    torch.testing.assert_close(box_loss.cpu(), torch.tensor([2.0, 0.0]))


def test_losses_are_fp32_from_low_precision_logits():
    box_predictor = predictor()
    proposals = [labelled_rois(0)]
    scores, deltas = random_predictions(box_predictor, proposals)
    cls_loss, box_loss = per_roi_losses(box_predictor, (scores.bfloat16(), deltas.bfloat16()), proposals)
    assert cls_loss.dtype == box_loss.dtype == torch.float32


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (10.0, 20.0, 5.0, 10.0)])
def test_regression_targets_equal_detectron2_get_deltas_bitwise(weights):
    """roi_loss's get_deltas without the host sync gives Detectron2's deltas bit for bit."""
    transform = Box2BoxTransform(weights)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        src_xy, tgt_xy = torch.rand(300, 2, generator=g) * 300, torch.rand(300, 2, generator=g) * 300
        src = torch.cat([src_xy, src_xy + 1 + torch.rand(300, 2, generator=g) * 200], dim=1)
        tgt = torch.cat([tgt_xy, tgt_xy + 1 + torch.rand(300, 2, generator=g) * 200], dim=1)
        assert torch.equal(regression_targets(transform, src, tgt), transform.get_deltas(src, tgt))
