"""The OHEM heads' training step: labelling, what gets mined, and the read-only pass."""
import dataclasses

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from conftest import C4_OHEM, FPN_OHEM, device, instances, load_cfg, random_fpn_features, random_proposals

pytestmark = pytest.mark.model

GT = [[10.0, 10.0, 40.0, 40.0]]
P_FG = [10.0, 10.0, 40.0, 38.0]      # IoU 0.93 with the GT: foreground
P_FAR = [50.0, 50.0, 60.0, 60.0]     # IoU 0: background
P_BELOW_BG_LO = [30.0, 30.0, 50.0, 50.0]  # IoU 100 / 1200 = 0.083 < 0.1: background, below bg_lo


def fpn_heads(config=FPN_OHEM, opts=()):
    cfg = load_cfg(config, opts)
    shapes = {f"p{l}": ShapeSpec(channels=256, stride=2**l) for l in range(2, 7)}
    return build_roi_heads(cfg, shapes).to(device()).train()


def one_image_case():
    proposals = [instances((64, 64), [P_FG, P_FAR, P_BELOW_BG_LO], objectness_logits=[1.0, 1.0, 1.0])]
    targets = [instances((64, 64), None, gt_boxes=GT, gt_classes=[2])]
    return proposals, targets


def fake_box_predictions(special, num_classes=80, gt_class=2):
    """A stand-in for the read-only pass: logits making every RoI cost log(2) (bg and class 2
    tie at 10), except the boxes in ``special`` (box -> (logits overrides, class-2 dx delta))."""

    def predict(features, proposals, stage):
        b = Boxes.cat([p.proposal_boxes for p in proposals]).tensor
        scores = torch.zeros(len(b), num_classes + 1, device=b.device)
        scores[:, num_classes] = 10.0
        scores[:, gt_class] = 10.0
        deltas = torch.zeros(len(b), 4 * num_classes, device=b.device)
        for box, (logits, dx) in special.items():
            rows = (b == torch.tensor(box, device=b.device)).all(dim=1)
            for cls, value in logits.items():
                scores[rows, cls] = value
            deltas[rows, 4 * gt_class] = dx
        return scores, deltas

    return predict


def test_every_proposal_is_labelled_without_bg_lo_or_ratio():
    proposals, targets = one_image_case()
    heads = fpn_heads()
    with EventStorage():
        labelled = heads.label_and_sample_proposals(proposals, targets)[0]
    # 3 proposals + the appended GT box, none sampled away; IoU < 0.1 is background (80), not ignored.
    assert labelled.gt_classes.tolist() == [2, 80, 80, 2]


def test_fast_rcnn_heuristics_baseline_ignores_rois_below_bg_lo():
    proposals, targets = one_image_case()
    heads = fpn_heads("COCO-Detection/faster_rcnn_R_50_FPN_1x_fast_rcnn_heuristics.yaml")
    with EventStorage():
        labelled = heads.label_and_sample_proposals(proposals, targets)[0]
    boxes = labelled.proposal_boxes.tensor.tolist()
    assert P_BELOW_BG_LO not in boxes and P_FAR not in boxes and P_FG in boxes


def test_a_proposal_below_bg_lo_can_be_mined():
    proposals, targets = one_image_case()
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 1])
    heads._box_predictions = fake_box_predictions({tuple(P_BELOW_BG_LO): ({0: 20.0}, 0.0)})
    with EventStorage() as storage:
        labelled = heads.label_and_sample_proposals(proposals, targets)
        mined = heads.mine([], labelled).mined
        stats = storage.latest()
    assert mined[0].proposal_boxes.tensor.tolist() == [P_BELOW_BG_LO]
    assert stats["ohem/bg_below_bg_lo_share"][0] == 1.0
    assert stats["ohem/candidates_per_image"][0] == 4.0


@pytest.mark.parametrize("loss, expected", [("cls_box", P_FG), ("cls", P_FAR)])
def test_loss_cls_box_vs_cls(loss, expected):
    """P_FG: class loss log 2 but a box delta 5 off (box loss 5); P_FAR: class loss 1.87, no box
    loss; the appended GT box: log 2. cls_box ranks P_FG first, cls ranks P_FAR first."""
    proposals, targets = one_image_case()
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 1, "MODEL.OHEM.LOSS", loss])
    heads._box_predictions = fake_box_predictions({tuple(P_FG): ({}, 5.0), tuple(P_FAR): ({0: 11.5}, 0.0)})
    with EventStorage():
        mined = heads.mine([], heads.label_and_sample_proposals(proposals, targets)).mined
    assert mined[0].proposal_boxes.tensor.tolist() == [expected]


def run_heads(heads, num_images=2, seed=0, no_gt_images=(), features_require_grad=False):
    features = {k: f.requires_grad_(features_require_grad) for k, f in random_fpn_features(num_images, seed=seed).items()}
    proposals = random_proposals(num_images, seed=seed)
    targets = [
        instances((64, 64), None, gt_boxes=[] if i in no_gt_images else [[5, 5, 30, 30], [30, 20, 60, 50]],
                  gt_classes=[] if i in no_gt_images else [1, 7])
        for i in range(num_images)
    ]
    for t in targets:
        t.gt_classes = t.gt_classes.long()
    with EventStorage() as storage:
        mined, losses = heads(None, features, proposals, targets)
    return mined, losses, storage


def test_budget_per_image_and_all_background_image():
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8])
    mined, losses, storage = run_heads(heads, no_gt_images=(1,))
    assert [len(m) for m in mined] == [8, 8]
    assert (mined[1].gt_classes == 80).all()  # no GT: every candidate is background
    assert all(torch.isfinite(v) for v in losses.values())
    assert storage.latest()["ohem/mined_per_image"][0] == 8


def test_default_budget_is_the_baselines_batch_size_per_image():
    heads = fpn_heads(opts=["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 12])
    assert heads.ohem.batch_size_per_image == 12


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_read_only_pass_equals_unchunked(chunk):
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 10])
    features = [random_fpn_features()[f] for f in heads.box_in_features]
    proposals = random_proposals()
    whole = heads._box_predictions(features, proposals, 0)
    heads.ohem = dataclasses.replace(heads.ohem, readonly_chunk_size=chunk)
    chunked = heads._readonly_predictions(features, proposals, 0)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_read_only_pass_builds_no_autograd_graph_and_runs_in_chunks():
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 5, "MODEL.OHEM.READONLY_CHUNK_SIZE", 16])
    calls = []
    heads.box_head.register_forward_hook(
        lambda m, inp, out: calls.append((torch.is_grad_enabled(), inp[0].shape[0], out.requires_grad))
    )
    mined, losses, _ = run_heads(heads)
    num_candidates = 2 * (40 + 2)  # proposals + appended GT, per image
    readonly, trainable = calls[:-1], calls[-1]
    assert all(not grad and not req for grad, _, req in readonly)
    assert sum(n for _, n, _ in readonly) == num_candidates
    assert max(n for _, n, _ in readonly) <= 16
    # The trainable pass sees the mined RoIs only: its graph and backward scale with B.
    assert trainable == (True, sum(len(m) for m in mined), True) and trainable[1] == 10


def capture_selection(heads):
    """Record the flat indices the head selects."""
    selected = []
    original = heads.select

    def select(hardness, proposals):
        out = original(hardness, proposals)
        selected.append(out[0])
        return out

    heads.select = select
    return selected


def test_loss_zeroing_gives_zero_gradient_to_rois_not_mined():
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 6, "MODEL.OHEM.MODE", "loss_zeroing"])
    pooled = []

    def keep_input(module, inp):
        inp[0].retain_grad()
        pooled.append(inp[0])

    heads.box_head.register_forward_pre_hook(keep_input)
    selected = capture_selection(heads)
    _, losses, _ = run_heads(heads, features_require_grad=True)
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    grad_norm = pooled[0].grad.flatten(1).abs().sum(dim=1)
    mined = torch.zeros(len(grad_norm), dtype=torch.bool, device=grad_norm.device)
    mined[selected[0]] = True
    assert (grad_norm[~mined] == 0).all()
    assert (grad_norm[mined] > 0).all()


@pytest.mark.parametrize("config", [FPN_OHEM, C4_OHEM])
def test_two_pass_and_loss_zeroing_give_the_same_loss_and_gradients(config):
    cfg = load_cfg(config, ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    heads = model.roi_heads
    if config == C4_OHEM:
        features = {"res4": torch.randn(2, 256, 4, 4).to(device())}
    else:
        features = random_fpn_features()
    proposals = random_proposals()
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7])] * 2

    def step(mode):
        heads.ohem = dataclasses.replace(heads.ohem, mode=mode)
        heads.zero_grad()
        selected = capture_selection(heads)
        with EventStorage():
            _, losses = heads(None, features, [p[:] for p in proposals], targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}
        return losses, grads, selected[0]

    two_pass, loss_zeroing = step("two_pass"), step("loss_zeroing")
    assert torch.equal(two_pass[2].sort().values, loss_zeroing[2].sort().values)
    for k in ("loss_cls", "loss_box_reg"):
        torch.testing.assert_close(two_pass[0][k], loss_zeroing[0][k])
    assert two_pass[1].keys() == loss_zeroing[1].keys() and len(two_pass[1]) > 0
    for name in two_pass[1]:
        torch.testing.assert_close(two_pass[1][name], loss_zeroing[1][name], rtol=1e-4, atol=1e-6)


def test_c4_heads_mine_and_train():
    cfg = load_cfg(C4_OHEM, ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 4])
    heads = build_roi_heads(cfg, {"res4": ShapeSpec(channels=256, stride=16)}).to(device()).train()
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30]], gt_classes=[3])] * 2
    with EventStorage() as storage:
        _, losses = heads(None, {"res4": torch.randn(2, 256, 4, 4).to(device())}, random_proposals(), targets)
    sum(losses.values()).backward()
    assert storage.latest()["ohem/mined_per_image"][0] == 4
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("mode", ["two_pass", "loss_zeroing"])
def test_a_batch_without_any_roi_trains(mode):
    """No proposal and no GT in any image (e.g. the RPN kept nothing): nothing to mine, zero losses."""
    heads = fpn_heads(opts=["MODEL.OHEM.MODE", mode, "MODEL.OHEM.READONLY_CHUNK_SIZE", 16])
    proposals = [instances((64, 64), [], objectness_logits=[]) for _ in range(2)]
    targets = [instances((64, 64), None, gt_boxes=[], gt_classes=torch.zeros(0, dtype=torch.long))] * 2
    with EventStorage():
        mined, losses = heads(None, random_fpn_features(), proposals, targets)
    assert [len(m) for m in mined] == [0, 0]
    assert all(torch.isfinite(v) and v == 0 for v in losses.values())
