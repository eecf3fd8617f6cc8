"""What OHEM mines is what it mined before issue 18's cuts: same RoIs, same order, same
predictions, hardness and weights, bitwise on the CPU, against the frozen copy of the code of
commit 9b1c3da (tests/frozen_selection.py), over many random batches: images without GT,
all-foreground images, fewer candidates than B/N, every chunk size, strategy and hardness."""
import itertools

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.utils.events import EventStorage

import frozen_selection as frozen
from conftest import C4_OHEM, FPN_OHEM, device, instances, load_cfg, random_fpn_features, random_proposals
from ohem_d2.modeling.selection import SelectionInputs

pytestmark = pytest.mark.model

STRATEGIES = ["per_image", "per_batch", "stratified", "importance_sampling"]
HARDNESS = ["loss", "probability", "uncertainty", "margin"]


def targets_for(proposals, seed):
    """GT per image: image 0 random boxes, image 1 none (seed odd) or its own proposals' boxes
    (seed even: every proposal foreground), image 2 a single box."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, p in enumerate(proposals):
        size = p.image_size
        if i == 1 and seed % 2:
            boxes = None
        elif i == 1:
            boxes = p.proposal_boxes.tensor.cpu()
        else:
            xy = torch.rand(1 + 2 * (i == 0), 2, generator=g) * 40
            boxes = torch.cat([xy, xy + 8 + torch.rand(len(xy), 2, generator=g) * 20], dim=1)
        classes = None if boxes is None else torch.randint(0, 80, (len(boxes),), generator=g)
        out.append(instances(size, None, gt_boxes=boxes if boxes is not None else torch.zeros(0, 4),
                             gt_classes=classes if classes is not None else torch.zeros(0, dtype=torch.int64)))
    return out


def build(config, opts):
    cfg = load_cfg(config, opts)
    if config == C4_OHEM:
        shapes = {"res4": ShapeSpec(channels=64, stride=16)}
        cfg.merge_from_list(["MODEL.RESNETS.RES2_OUT_CHANNELS", 16, "MODEL.RESNETS.WIDTH_PER_GROUP", 4])
    else:
        shapes = {f"p{l}": ShapeSpec(channels=32, stride=2**l) for l in range(2, 7)}
        cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64])
    torch.manual_seed(0)
    return build_roi_heads(cfg, shapes).to(device()).train()


def features_for(config, seed, num_images):
    if config == C4_OHEM:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(num_images, 64, 4, 4, generator=g).to(device())]
    return list(random_fpn_features(num_images, channels=32, seed=seed).values())[:4]


def frozen_mine(head, features, proposals, seed):
    """The read-only pass and the selection of 9b1c3da."""
    box_predictor = head._box_predictor_at(0)
    with torch.no_grad(), head._norm_layers_frozen():
        predictions = frozen.frozen_readonly_predictions(head, features, proposals)
        losses = frozen.per_roi_losses(box_predictor, predictions, proposals)
    hardness = head._hardness(box_predictor, predictions, proposals, *losses)
    selected, mined, weights = frozen.frozen_select(head, hardness, proposals, SelectionInputs, seed)
    return predictions, hardness, selected, mined, weights


def assert_same_mining(config, opts, seed, num_images=3, num=40):
    head = build(config, ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512] + list(opts))
    proposals = random_proposals(num_images, num=num, seed=seed)
    targets = targets_for(proposals, seed)
    features = features_for(config, seed, num_images)
    with EventStorage(seed % 3):  # iterations with (0) and without the diagnostics
        labelled = head.label_and_sample_proposals(proposals, targets)
        expected = frozen_mine(head, features, labelled, seed)
        torch.manual_seed(seed)
        got = head.mine(features, labelled)
    predictions, hardness, selected, mined, weights = expected
    for a, b in zip(got.predictions, predictions):
        assert torch.equal(a, b)
    assert torch.equal(got.hardness, hardness)
    assert torch.equal(got.selected, selected)
    assert len(got.mined) == len(mined)
    for a, b in zip(got.mined, mined):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.gt_classes, b.gt_classes)
        if weights is not None:
            assert a.has("ohem_weight")
    if weights is not None:
        assert torch.equal(torch.cat([p.ohem_weight for p in got.mined]), weights)


# B/N 8 and 16 leave fewer RoIs than candidates; 512 more than every image has.
@pytest.mark.parametrize("strategy,b", list(itertools.product(STRATEGIES, [8, 512])))
@pytest.mark.parametrize("seed", range(4))
def test_fpn_mines_as_before_every_strategy(strategy, b, seed):
    assert_same_mining(FPN_OHEM, ["MODEL.OHEM.SELECTION", strategy, "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b,
                                  "MODEL.OHEM.MIN_FG_FRACTION", 0.25 * (seed % 2)], seed)


@pytest.mark.parametrize("hardness", HARDNESS)
@pytest.mark.parametrize("chunk", [0, 1, 7, 40, 1024])
def test_fpn_mines_as_before_every_hardness_and_chunk(hardness, chunk):
    for seed in range(2):
        assert_same_mining(FPN_OHEM, ["MODEL.OHEM.HARDNESS", hardness, "MODEL.OHEM.READONLY_CHUNK_SIZE", chunk,
                                      "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 16], seed)


@pytest.mark.parametrize("opts", [["MODEL.OHEM.NMS_THRESH", 1.0], ["MODEL.OHEM.LOSS", "cls"],
                                  ["MODEL.OHEM.MODE", "loss_zeroing"]])
def test_fpn_mines_as_before_other_settings(opts):
    for seed in range(3):
        assert_same_mining(FPN_OHEM, opts + ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8], seed)


@pytest.mark.parametrize("chunk", [0, 13, 1024])
def test_c4_mines_as_before(chunk):
    for seed in range(2):
        assert_same_mining(C4_OHEM, ["MODEL.OHEM.READONLY_CHUNK_SIZE", chunk, "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8],
                           seed, num=20)
