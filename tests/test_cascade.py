"""OHEM in every stage of Cascade R-CNN: what each stage mines and trains on, the next stage's RoIs,
the mask head's RoIs, and parity with stock CascadeROIHeads at inference and in checkpoints."""
import dataclasses

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import CascadeROIHeads, build_roi_heads
from detectron2.structures import BitMasks
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import EventStorage

from ohem_d2 import FastRCNNHeuristicsCascadeROIHeads, OHEMCascadeROIHeads

from conftest import device, instances, load_cfg, random_fpn_features, random_proposals

pytestmark = pytest.mark.model

CASCADE = "COCO-Detection/cascade_mask_rcnn_R_50_FPN_1x.yaml"
CASCADE_OHEM = "COCO-Detection/cascade_mask_rcnn_R_50_FPN_1x_ohem.yaml"
CASCADE_HEURISTICS = "COCO-Detection/cascade_mask_rcnn_R_50_FPN_1x_fast_rcnn_heuristics.yaml"
FPN_SHAPES = {f"p{l}": ShapeSpec(channels=256, stride=2**l) for l in range(2, 7)}
GT_BOXES = [[5.0, 5.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]
STAGE_IOUS = (0.5, 0.6, 0.7)
# Narrower box and mask heads than the configs': the same code paths at a fraction of the CPU time.
SMALL_HEADS = ["MODEL.ROI_BOX_HEAD.FC_DIM", 128, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
               "MODEL.ROI_MASK_HEAD.NUM_CONV", 1]


def targets_with_masks(size=(64, 64), no_gt_images=(), num_images=2):
    """GT boxes, classes and box-shaped masks; the images in ``no_gt_images`` have no GT."""
    out = []
    for i in range(num_images):
        boxes = [] if i in no_gt_images else GT_BOXES
        t = instances(size, None, gt_boxes=boxes, gt_classes=torch.tensor([1, 7][: len(boxes)]))
        masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[int(y0) : int(y1), int(x0) : int(x1)] = True
        t.gt_masks = BitMasks(masks.to(device()))
        out.append(t)
    return out


def cascade_heads(opts=(), config=CASCADE_OHEM):
    torch.manual_seed(0)
    return build_roi_heads(load_cfg(config, SMALL_HEADS + list(opts)), FPN_SHAPES).to(device()).train()


def record_selections(heads):
    """Per call of the head's selection: (number of candidates, number selected)."""
    calls = []
    original = heads.select

    def select(hardness, proposals):
        out = original(hardness, proposals)
        calls.append((len(hardness), len(out[0])))
        return out

    heads.select = select
    return calls


@pytest.mark.parametrize("selection", ["per_image", "per_batch", "stratified"])
def test_every_stage_mines_all_its_rois_and_trains_on_the_mined_ones(selection):
    b = 6
    heads = cascade_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b, "MODEL.OHEM.SELECTION", selection,
                           "MODEL.OHEM.READONLY_CHUNK_SIZE", 32])
    passes = {k: [] for k in range(3)}
    for k in range(3):
        heads.box_head[k].register_forward_hook(
            lambda m, inp, out, k=k: passes[k].append((torch.is_grad_enabled(), inp[0].shape[0]))
        )
    selections = record_selections(heads)
    mask_inputs = []
    forward_mask = heads._forward_mask
    heads._forward_mask = lambda features, instances: mask_inputs.append(instances) or forward_mask(features, instances)

    with EventStorage() as storage:
        mined, losses = heads(None, random_fpn_features(), random_proposals(), targets_with_masks(no_gt_images=(1,)))
    stats = storage.latest()

    assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)} | {"loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for k in range(3):
        assert all(p.grad is not None for p in heads.box_head[k].parameters())
        assert all(p.grad is not None for p in heads.box_predictor[k].parameters())

    num_candidates = 40 + 2 + 40  # proposals + the appended GT boxes (image 1 has none)
    # Each stage ranks all of its RoIs: stage k + 1 gets the refined boxes of all of stage k's RoIs
    # (none is empty with freshly initialised, near-zero deltas), not only the mined ones.
    assert selections == [(num_candidates, 2 * b)] * 3
    for k in range(3):
        readonly = [n for grad, n in passes[k] if not grad]
        trainable = [n for grad, n in passes[k] if grad]
        assert sum(readonly) == num_candidates and max(readonly) <= 32
        assert trainable == [2 * b]  # the backward pass scales with B, in every stage
        assert stats[f"stage{k}/ohem/mined_per_image"][0] == b
        assert stats[f"stage{k}/ohem/candidates_per_image"][0] == num_candidates / 2

    # The head returns the last stage's mined RoIs, labelled at IoU 0.7, and the mask head trains on them.
    assert sum(len(m) for m in mined) == 2 * b
    assert len(mask_inputs) == 1 and mask_inputs[0] is mined
    with_gt = mined[0]
    iou = matched_pairwise_iou(with_gt.proposal_boxes, with_gt.gt_boxes)
    fg = with_gt.gt_classes < 80
    assert (iou[fg] >= STAGE_IOUS[2]).all() and (iou[~fg] < STAGE_IOUS[2]).all()
    assert with_gt.has("gt_masks") and len(with_gt.gt_masks) == len(with_gt)
    assert (mined[1].gt_classes == 80).all()  # the image without GT: background only


def test_two_pass_and_loss_zeroing_agree_in_every_stage():
    heads = cascade_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.READONLY_CHUNK_SIZE", 0])
    features, proposals, targets = random_fpn_features(), random_proposals(), targets_with_masks()

    def step(mode):
        heads.ohem = dataclasses.replace(heads.ohem, mode=mode)
        heads.zero_grad()
        with EventStorage():
            mined, losses = heads(None, features, [p[:] for p in proposals], targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}
        return mined, losses, grads

    (m2, l2, g2), (mz, lz, gz) = step("two_pass"), step("loss_zeroing")
    for a, b in zip(m2, mz):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
    assert l2.keys() == lz.keys()
    for k in l2:
        torch.testing.assert_close(l2[k], lz[k])
    assert g2.keys() == gz.keys() and any("box_head.2" in n for n in g2)
    for n in g2:
        torch.testing.assert_close(g2[n], gz[n], rtol=1e-4, atol=1e-6)


def random_batch(seed=0):
    """Two random 96 x 128 images, the first with two objects, the second with none."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, 96, 128, generator=g) * 255, "instances": t, "height": 96, "width": 128}
        for t in targets_with_masks(size=(96, 128), no_gt_images=(1,))
    ]


def test_full_model_training_iteration():
    torch.manual_seed(0)
    model = build_model(load_cfg(CASCADE_OHEM, SMALL_HEADS + ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 16])).train()
    assert isinstance(model.roi_heads, OHEMCascadeROIHeads) and isinstance(model.roi_heads, CascadeROIHeads)
    with EventStorage() as storage:
        losses = model(random_batch())
    assert {"loss_rpn_cls", "loss_mask", "loss_cls_stage2", "loss_box_reg_stage0"} <= set(losses)
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    stats = storage.latest()
    assert all(stats[f"stage{k}/ohem/mined_per_image"][0] == 16 for k in range(3))


def build(config, seed):
    torch.manual_seed(seed)
    # Keep every detection above 0 (many outputs to compare), at most 20 (fewer masks to paste).
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20]
    return build_model(load_cfg(config, SMALL_HEADS + opts))


def save(model, path):
    """Save with Detectron2's checkpointer; return the file."""
    path.mkdir()
    DetectionCheckpointer(model, save_dir=str(path)).save("model")
    return path / "model.pth"


def load(model, file):
    """Load a checkpoint file as Detectron2 does; every key must match."""
    incompatible = DetectionCheckpointer(model)._load_model(torch.load(file, weights_only=False))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys


def test_checkpoints_round_trip_and_inference_is_stock(tmp_path):
    stock, ohem, heuristics = build(CASCADE, seed=1), build(CASCADE_OHEM, seed=2), build(CASCADE_HEURISTICS, seed=3)
    checkpoint = save(stock, tmp_path / "stock")
    load(ohem, checkpoint)
    load(heuristics, checkpoint)

    torch.manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128} for _ in range(2)]
    with torch.no_grad():
        expected = stock.eval()(inputs)
        for model in (ohem, heuristics):
            actual = model.eval()(inputs)
            for e, a in zip(expected, actual):
                e, a = e["instances"], a["instances"]
                assert len(e) > 0 and e.has("pred_masks")
                assert e.get_fields().keys() == a.get_fields().keys()
                for name in e.get_fields():
                    ev, av = e.get(name), a.get(name)
                    assert torch.equal(getattr(ev, "tensor", ev), getattr(av, "tensor", av)), name
    # And back: an OHEM checkpoint loads into the stock model.
    load(stock, save(ohem, tmp_path / "ohem"))


def test_heuristics_arm_ignores_rois_below_bg_lo_at_stage_0_only():
    heads = cascade_heads(config=CASCADE_HEURISTICS)
    assert isinstance(heads, FastRCNNHeuristicsCascadeROIHeads)
    below_bg_lo, far, fg = [30.0, 30.0, 50.0, 50.0], [40.0, 0.0, 60.0, 10.0], [5.0, 5.0, 30.0, 29.0]
    proposals = [instances((64, 64), [fg, far, below_bg_lo], objectness_logits=[1.0, 1.0, 1.0])]
    targets = [instances((64, 64), None, gt_boxes=GT_BOXES[:1], gt_classes=[2])]
    with EventStorage():
        labelled = heads.label_and_sample_proposals(proposals, targets)[0]
    # far (IoU 0) and below_bg_lo (IoU 0.083) are ignored; fg and the appended GT box remain.
    assert sorted(labelled.proposal_boxes.tensor.tolist()) == sorted([fg, GT_BOXES[0]])
    # The OHEM arm keeps all of them as background candidates.
    ohem = cascade_heads()
    with EventStorage():
        labelled = ohem.label_and_sample_proposals(proposals, targets)[0]
    assert labelled.gt_classes.tolist() == [2, 80, 80, 2]


def test_stage_0_threshold_must_be_the_first_cascade_iou():
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.IOU_THRESHOLDS = \[0\.1, 0\.6\] is invalid"):
        cascade_heads(["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.1, 0.6]], config=CASCADE_HEURISTICS)


@pytest.mark.parametrize("mode", ["two_pass", "loss_zeroing"])
def test_images_without_gt_give_finite_gradients_with_a_smooth_l1_beta(mode):
    """Later stages give the RoIs of an image without GT placeholder boxes (zeros); their box
    targets are infinite, which must not reach the gradient through the background's zeroed loss."""
    heads = cascade_heads(["MODEL.OHEM.MODE", mode, "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.5,
                           "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8])
    with EventStorage():
        _, losses = heads(None, random_fpn_features(), random_proposals(), targets_with_masks(no_gt_images=(1,)))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    bad = [n for n, p in heads.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
