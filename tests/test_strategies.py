"""Selection strategies, hardness definitions and their registries, against hand-computed cases."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.utils.events import EventStorage

from ohem_d2 import OHEM_HARDNESS_REGISTRY, OHEM_SELECTION_REGISTRY, OHEMConfigError, SelectionInputs
from ohem_d2.modeling.hardness import HardnessInputs, probability
from ohem_d2.modeling.hardness import loss as loss_hardness
from ohem_d2.modeling.roi_loss import per_roi_losses
from ohem_d2.modeling.selection import per_batch, per_image, quota, select_per_image, stratified

from conftest import FPN_OHEM, device, load_cfg
from test_mining import P_FAR, P_FG, fake_box_predictions, fpn_heads, one_image_case, run_heads
from test_roi_loss import labelled_rois, predictor, random_predictions


pytestmark = pytest.mark.model

FPN_SHAPES = {f"p{l}": ShapeSpec(channels=256, stride=2**l) for l in range(2, 7)}


def far_apart_boxes(n):
    """n 10x10 boxes that do not overlap each other (the NMS keeps them all)."""
    return torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(n)], device=device())


def inputs(hardness, image_ids, num_images, b, is_fg=None, boxes=None, nms=0.7, fg_fraction=0.25, min_fg=0.0):
    n = len(hardness)
    return SelectionInputs(
        hardness=torch.tensor(hardness, device=device()),
        boxes=far_apart_boxes(n) if boxes is None else boxes.to(device()),
        image_ids=torch.tensor(image_ids, device=device()),
        is_fg=torch.tensor([False] * n if is_fg is None else [bool(x) for x in is_fg], device=device()),
        num_images=num_images,
        batch_size_per_image=b,
        nms_thresh=nms,
        fg_fraction=fg_fraction,
        min_fg_fraction=min_fg,
    )


def run(strategy, *args, **kwargs):
    idx, num_after_nms = strategy(inputs(*args, **kwargs))
    return idx.tolist(), int(num_after_nms)


# Seven RoIs of two images, used by several cases below.
H7 = [0.2, 0.7, 0.4, 0.9, 0.1, 0.6, 0.8]
IDS7 = [0, 0, 0, 1, 1, 1, 1]


def test_registry_names():
    assert {"per_image", "per_batch", "stratified", "hard_negative_ratio"} <= {name for name, _ in OHEM_SELECTION_REGISTRY}
    assert {"loss", "probability"} <= {name for name, _ in OHEM_HARDNESS_REGISTRY}


# ---------------------------------------------------------------------------------------- per_image


def test_per_image_is_the_papers_selection():
    assert run(per_image, H7, IDS7, 2, 2) == ([1, 2, 3, 6], 7)
    expected = select_per_image(torch.tensor(H7, device=device()), far_apart_boxes(7),
                                torch.tensor(IDS7, device=device()), 2, 2, 0.7)
    assert run(per_image, H7, IDS7, 2, 2)[0] == expected[0].tolist()


def test_per_image_min_fg_reserves_the_hardest_foreground_of_each_image():
    # fg: 0 (0.2) in image 0; 4 (0.1) in image 1. B = 2, MIN_FG_FRACTION 0.5 -> 1 fg reserved per image.
    fg = [1, 0, 0, 0, 1, 0, 0]
    # Image 0: reserved 0, then the hardest other: 1 (0.7). Image 1: reserved 4, then 3 (0.9).
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.5)[0] == [1, 0, 3, 4]
    # Off: the paper's selection ignores the labels.
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.0)[0] == [1, 2, 3, 6]
    # 0.4 * 2 = 0.8 -> floor 0: nothing reserved.
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.4)[0] == [1, 2, 3, 6]


def test_per_image_min_fg_takes_the_hardest_of_several_foreground():
    fg = [0, 0, 0, 0, 1, 1, 0]  # image 1: fg 4 (0.1) and 5 (0.6); image 0: none
    # Image 0 has no fg: plain top 2. Image 1: reserve 5 (the harder fg), then 3 (0.9).
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.5)[0] == [1, 2, 3, 5]
    # MIN_FG_FRACTION 1.0: the whole budget of image 1 is foreground; image 0 has none, fills with bg.
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=1.0)[0] == [1, 2, 5, 4]


def test_per_image_min_fg_changes_nothing_when_the_fg_are_hard_already():
    fg = [0, 1, 0, 1, 0, 0, 0]  # the hardest of each image are fg
    assert run(per_image, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.5)[0] == [1, 2, 3, 6]


# ---------------------------------------------------------------------------------------- per_batch


def test_per_batch_takes_the_hardest_of_the_whole_batch():
    # Budget 2 * 2 = 4: 0.9 (3), 0.8 (6), 0.7 (1), 0.6 (5): image 0 gives 1 RoI, image 1 three.
    assert run(per_batch, H7, IDS7, 2, 2) == ([1, 3, 6, 5], 7)
    # An image can give none: budget 2 -> 0.9, 0.8, both of image 1.
    assert run(per_batch, H7, IDS7, 2, 1)[0] == [3, 6]
    # Fewer candidates than the budget: all of them, grouped by image, hardest first.
    assert run(per_batch, H7, IDS7, 2, 100)[0] == [1, 2, 0, 3, 6, 5, 4]


def test_per_batch_deduplicates_each_image_before_ranking_the_batch():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [0.0, 0, 10, 10], [30.0, 0, 40, 10]])
    # RoI 1 duplicates the harder RoI 0 of image 0 (removed); RoI 2 is the same box in image 1 (kept).
    assert run(per_batch, [0.9, 0.85, 0.5, 0.4], [0, 0, 1, 1], 2, 1, boxes=boxes) == ([0, 2], 3)
    assert run(per_batch, [0.9, 0.85, 0.5, 0.4], [0, 0, 1, 1], 2, 1, boxes=boxes, nms=1.0) == ([0, 1], 4)


def test_per_batch_min_fg_reserves_per_image_then_ranks_the_batch():
    fg = [1, 0, 0, 0, 1, 0, 0]
    # Reserved: 0 (image 0), 4 (image 1); the other 4 - 2 = 2 go to the batch's hardest: 3, 6.
    assert run(per_batch, H7, IDS7, 2, 2, is_fg=fg, min_fg=0.5)[0] == [0, 3, 6, 4]


# --------------------------------------------------------------------------------------- stratified


def test_stratified_quotas_by_hand():
    hardness = [0.9, 0.8, 0.3, 0.2, 0.7, 0.1, 0.5,   # image 0: 5 bg, 2 fg
                0.4, 0.6, 0.5, 0.1,                  # image 1: 3 fg, 1 bg
                0.3, 0.2, 0.9, 0.4, 0.8,             # image 2: 5 bg, no fg
                0.5, 0.6]                            # image 3: 1 fg, 1 bg
    fg = [0, 0, 1, 1, 0, 0, 0,
          1, 1, 1, 0,
          0, 0, 0, 0, 0,
          1, 0]
    ids = [0] * 7 + [1] * 4 + [2] * 5 + [3] * 2
    idx, n = run(stratified, hardness, ids, 4, 4, is_fg=fg, fg_fraction=0.25)
    assert n == 18
    assert idx == [
        0, 1, 4, 2,       # fg quota 1: the harder fg (0.3); bg quota 3: 0.9, 0.8, 0.7 (not 0.5)
        8, 9, 7, 10,      # one bg only: it and 3 fg
        13, 15, 14, 11,   # no fg: the 4 hardest bg (0.9, 0.8, 0.4, 0.3)
        17, 16,           # 2 RoIs < budget: both
    ]
    # The paper's selection for image 0 would take the 4 hardest whatever their label: 0, 1, 4, 6.
    assert run(per_image, hardness, ids, 4, 4)[0][:4] == [0, 1, 4, 6]


def test_stratified_fg_fraction_and_min_fg_fraction():
    hardness = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1]
    fg = [0, 0, 0, 0, 1, 1, 1]
    ids = [0] * 7
    assert run(stratified, hardness, ids, 1, 4, is_fg=fg, fg_fraction=0.5)[0] == [0, 1, 4, 5]
    assert run(stratified, hardness, ids, 1, 4, is_fg=fg, fg_fraction=0.0)[0] == [0, 1, 2, 3]
    assert run(stratified, hardness, ids, 1, 4, is_fg=fg, fg_fraction=1.0)[0] == [0, 4, 5, 6]
    # B = 3, 0.5 -> floor(1.5) = 1 fg, as Detectron2 rounds POSITIVE_FRACTION.
    assert run(stratified, hardness, ids, 1, 3, is_fg=fg, fg_fraction=0.5)[0] == [0, 1, 4]
    # MIN_FG_FRACTION above FG_FRACTION raises the fg quota to floor(0.75 * 4) = 3.
    assert run(stratified, hardness, ids, 1, 4, is_fg=fg, fg_fraction=0.25, min_fg=0.75)[0] == [0, 4, 5, 6]


def test_quota_rounding():
    assert quota(0.25, 512) == 128
    assert quota(0.3, 10) == 3  # 0.3 * 10 = 2.9999999999999996 in floating point
    assert quota(0.5, 3) == 1
    assert quota(0.0, 7) == 0 and quota(1.0, 7) == 7


def test_empty_image_shifts_nothing():
    case = ([0.3, 0.5, 0.9, 0.1], [0, 0, 2, 2], 3, 1)
    for strategy in (per_image, stratified):
        assert run(strategy, *case, is_fg=[0, 1, 1, 0], min_fg=1.0)[0] == [1, 2], strategy.__name__
    # per_batch: the fg 1 and 2 reserved, the third RoI of the budget 3 * 1 is the harder bg, 0.
    assert run(per_batch, *case, is_fg=[0, 1, 1, 0], min_fg=1.0)[0] == [1, 0, 2]


# --------------------------------------------------------------- random cases vs a plain Python loop


def python_reference(strategy, hardness, boxes, image_ids, is_fg, num_images, b, nms, fg_fraction, min_fg):
    """The strategies written as greedy per-image loops, straight from their docstrings."""
    iou = box_iou(boxes, boxes).tolist()
    survivors = {}
    for i in range(num_images):
        rois = sorted((j for j in range(len(hardness)) if image_ids[j] == i), key=lambda j: -hardness[j])
        kept = []
        for j in rois:
            if nms >= 1 or all(iou[j][k] <= nms for k in kept):
                kept.append(j)
        survivors[i] = kept
    q_min = math.floor(min_fg * b + 1e-6)
    chosen = set()
    if strategy == "per_image":
        for rois in survivors.values():
            reserved = [j for j in rois if is_fg[j]][:q_min]
            rest = [j for j in rois if j not in reserved][: b - len(reserved)]
            chosen |= set(reserved) | set(rest)
    elif strategy == "per_batch":
        reserved = [j for rois in survivors.values() for j in [j for j in rois if is_fg[j]][:q_min]]
        rest = sorted((j for rois in survivors.values() for j in rois if j not in reserved), key=lambda j: -hardness[j])
        chosen = set(reserved) | set(rest[: num_images * b - len(reserved)])
    else:
        q_fg = math.floor(max(fg_fraction, min_fg) * b + 1e-6)
        for rois in survivors.values():
            fg = [j for j in rois if is_fg[j]]
            bg = [j for j in rois if not is_fg[j]]
            take_fg = min(len(fg), q_fg + max(0, b - q_fg - len(bg)))
            take_bg = min(len(bg), b - q_fg + max(0, q_fg - len(fg)))
            chosen |= set(fg[:take_fg]) | set(bg[:take_bg])
    return [j for i in range(num_images) for j in survivors[i] if j in chosen]


@pytest.mark.parametrize("strategy", ["per_image", "per_batch", "stratified"])
@pytest.mark.parametrize("nms, min_fg", [(0.7, 0.0), (0.5, 0.3), (1.0, 0.5)])
def test_strategies_match_plain_python_loops(strategy, nms, min_fg):
    g = torch.Generator().manual_seed(3)
    num, num_images, b = 240, 3, 16
    xy = torch.rand(num, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(num, 2, generator=g) * 30], dim=1)
    hardness = torch.rand(num, generator=g)
    image_ids = torch.randint(0, num_images, (num,), generator=g)
    is_fg = torch.rand(num, generator=g) < torch.tensor([0.05, 0.3, 0.8])[image_ids]  # few to many fg
    inp = SelectionInputs(*(x.to(device()) for x in (hardness, boxes, image_ids, is_fg)),
                          num_images, b, nms, 0.25, min_fg)
    idx, _ = OHEM_SELECTION_REGISTRY.get(strategy)(inp)
    expected = python_reference(strategy, hardness.tolist(), boxes, image_ids.tolist(), is_fg.tolist(),
                                num_images, b, nms, 0.25, min_fg)
    assert idx.tolist() == expected


def test_hard_negative_ratio_matches_a_plain_python_loop():
    g = torch.Generator().manual_seed(4)
    num, num_images, ratio = 200, 4, 2.5
    hardness = torch.rand(num, generator=g)
    image_ids = torch.randint(0, num_images, (num,), generator=g)
    is_fg = torch.rand(num, generator=g) < torch.tensor([0.0, 0.05, 0.2, 0.6])[image_ids]  # none to many fg
    inp = SelectionInputs(hardness.to(device()), torch.zeros(num, 4, device=device()), image_ids.to(device()),
                          is_fg.to(device()), num_images, 16, 0.7, neg_pos_ratio=ratio)
    idx, _ = OHEM_SELECTION_REGISTRY.get("hard_negative_ratio")(inp)
    expected = []
    for i in range(num_images):
        rois = sorted((j for j in range(num) if image_ids[j] == i), key=lambda j: -hardness[j])
        fg = [j for j in rois if is_fg[j]]
        negatives = [j for j in rois if not is_fg[j]][: math.floor(ratio * max(len(fg), 1))]
        expected += [j for j in rois if j in fg or j in negatives]
    assert idx.tolist() == expected


def test_hard_negative_ratio_in_the_roi_head():
    heads = fpn_heads(opts=["MODEL.OHEM.SELECTION", "hard_negative_ratio", "MODEL.OHEM.NEG_POS_RATIO", 1.0])
    candidates = record_fg_candidates(heads)
    mined, losses, _ = run_heads(heads, no_gt_images=(1,))
    assert all(torch.isfinite(v) for v in losses.values())
    # Image 0: every fg candidate and as many bg; image 1 (no GT) its one hardest bg, as if it had one fg.
    assert [len(m) for m in mined] == [2 * candidates[0][0], 1]


# ---------------------------------------------------------------------------------------- hardness


def hardness_inputs(box_predictor, scores, gt_classes, loss="cls_box"):
    gt_classes = torch.tensor(gt_classes, device=device())
    cls_loss = torch.zeros(len(gt_classes), device=device())
    return HardnessInputs(box_predictor, (scores.to(device()), torch.zeros(len(gt_classes), 4, device=device())),
                          [], gt_classes, cls_loss + 1.0, cls_loss + 2.0, loss)


def test_loss_hardness_follows_model_ohem_loss():
    inp = hardness_inputs(predictor(), torch.zeros(1, 4), [0])
    assert loss_hardness(inp).tolist() == [3.0]
    assert loss_hardness(hardness_inputs(predictor(), torch.zeros(1, 4), [0], loss="cls")).tolist() == [1.0]


def test_probability_hardness_softmax_by_hand():
    ln = math.log
    scores = torch.tensor([
        [ln(2), 0.0, 0.0, 0.0],  # class 0: p = 2 / 5
        [0.0, 0.0, 0.0, ln(5)],  # background (3): p = 5 / 8
        [0.0, 0.0, 0.0, 0.0],    # class 1: p = 1 / 4
        [0.0, 0.0, 9.0, 0.0],    # class 1 while class 2 is confident: p = 1 / (3 + e^9)
    ])
    hardness = probability(hardness_inputs(predictor(), scores, [0, 3, 1, 1]))
    expected = torch.tensor([3 / 5, 3 / 8, 3 / 4, 1 - 1 / (3 + math.exp(9))])
    torch.testing.assert_close(hardness.cpu(), expected)


def test_probability_hardness_sigmoid_by_hand():
    ln3 = math.log(3.0)
    # K = 3 classes -> 4 columns; the last one is unused by sigmoid CE (a large value must not matter).
    scores = torch.tensor([
        [0.0, 0.0, -50.0, 100.0],   # class 0: p = 0.5 * (1 - 0.5) * (1 - ~0) = 0.25
        [ln3, -ln3, -50.0, 100.0],  # background: p = (1 - 0.75) * (1 - 0.25) * 1 = 0.1875
        [-ln3, ln3, -50.0, 100.0],  # class 1: p = (1 - 0.25) * 0.75 = 0.5625
    ])
    hardness = probability(hardness_inputs(predictor(use_sigmoid_ce=True), scores, [0, 3, 1]))
    torch.testing.assert_close(hardness.cpu(), torch.tensor([0.75, 0.8125, 0.4375]))


@pytest.mark.parametrize("use_sigmoid_ce", [False, True])
def test_probability_hardness_is_one_minus_exp_of_minus_the_classification_loss(use_sigmoid_ce):
    """So it ranks as LOSS "cls" does (with any loss weight); it only rescales into [0, 1]."""
    box_predictor = predictor(use_sigmoid_ce=use_sigmoid_ce, loss_weight={"loss_cls": 3.0})
    proposals = [labelled_rois(0), labelled_rois(1)]
    predictions = random_predictions(box_predictor, proposals)
    cls_loss, box_loss = per_roi_losses(box_predictor, predictions, proposals)
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    inp = HardnessInputs(box_predictor, tuple(p.detach() for p in predictions), proposals, gt_classes,
                         cls_loss.detach(), box_loss.detach(), "cls_box")
    hardness = probability(inp)
    torch.testing.assert_close(hardness, 1 - torch.exp(-cls_loss.detach() / 3.0))
    assert ((hardness >= 0) & (hardness <= 1)).all()


@pytest.mark.parametrize("hardness, expected", [("loss", P_FG), ("probability", P_FAR)])
def test_hardness_option_in_the_head(hardness, expected):
    """As test_mining's cls_box vs cls case: P_FG is hard by its box loss only, P_FAR by its class."""
    proposals, targets = one_image_case()
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 1, "MODEL.OHEM.HARDNESS", hardness])
    heads._box_predictions = fake_box_predictions({tuple(P_FG): ({}, 5.0), tuple(P_FAR): ({0: 11.5}, 0.0)})
    with EventStorage():
        mined = heads.mine([], heads.label_and_sample_proposals(proposals, targets)).mined
    assert mined[0].proposal_boxes.tensor.tolist() == [expected]


# ------------------------------------------------------------------------------- strategies in heads


def record_fg_candidates(heads):
    """Per call of the head's selection, the number of foreground candidates of each image."""
    seen = []
    original = heads.select

    def select(hardness, proposals):
        seen.append([int(((p.gt_classes >= 0) & (p.gt_classes < 80)).sum()) for p in proposals])
        return original(hardness, proposals)

    heads.select = select
    return seen


@pytest.mark.parametrize("mode", ["two_pass", "loss_zeroing"])
@pytest.mark.parametrize("selection", ["per_image", "per_batch", "stratified"])
def test_strategies_in_the_head(selection, mode):
    b = 8
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b, "MODEL.OHEM.SELECTION", selection,
                            "MODEL.OHEM.MODE", mode, "MODEL.OHEM.FG_FRACTION", 0.5,
                            "MODEL.OHEM.NMS_THRESH", 1.0, "MODEL.OHEM.HARDNESS", "probability"])
    candidates = record_fg_candidates(heads)
    mined, losses, _ = run_heads(heads, no_gt_images=(1,))
    assert all(torch.isfinite(v) for v in losses.values())
    num_fg = [int((m.gt_classes < 80).sum()) for m in mined]
    if selection == "per_batch":
        assert sum(len(m) for m in mined) == 2 * b
    else:
        assert [len(m) for m in mined] == [b, b]
    if selection == "stratified":
        # Image 0: FG_FRACTION 0.5 of 8, or all its fg where fewer; image 1 has no GT, so no fg.
        assert num_fg == [min(4, candidates[0][0]), 0]


@pytest.mark.parametrize("selection", ["per_image", "per_batch"])
def test_min_fg_fraction_in_the_head(selection):
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.MIN_FG_FRACTION", 0.5,
                            "MODEL.OHEM.NMS_THRESH", 1.0, "MODEL.OHEM.SELECTION", selection])
    candidates = record_fg_candidates(heads)
    mined, _, _ = run_heads(heads)
    num_fg = [int((m.gt_classes < 80).sum()) for m in mined]
    assert all(n >= min(4, c) for n, c in zip(num_fg, candidates[0])), (num_fg, candidates)


# ------------------------------------------------------------------------- user-registered functions


def background_only_for_tests(inputs):
    """A user strategy: the B/N hardest background RoIs of each image, no NMS, returned in
    reverse order (the head regroups them by image)."""
    bg = torch.nonzero(~inputs.is_fg).squeeze(1)
    chosen, _ = select_per_image(inputs.hardness[bg], inputs.boxes[bg], inputs.image_ids[bg],
                                 inputs.num_images, inputs.batch_size_per_image, 1.0)
    return bg[chosen].flip(0), len(inputs.hardness)


def box_loss_for_tests(inputs):
    """A user hardness: the box-regression loss alone."""
    return inputs.box_loss


for fn, registry in [(background_only_for_tests, OHEM_SELECTION_REGISTRY), (box_loss_for_tests, OHEM_HARDNESS_REGISTRY)]:
    if fn.__name__ not in registry:
        registry.register(fn)


def test_user_registered_strategy_and_hardness_are_used_by_name():
    heads = fpn_heads(opts=["MODEL.OHEM.SELECTION", "background_only_for_tests",
                            "MODEL.OHEM.HARDNESS", "box_loss_for_tests",
                            "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 6])
    mined, losses, storage = run_heads(heads)
    assert [len(m) for m in mined] == [6, 6]
    assert all((m.gt_classes == 80).all() for m in mined)
    assert all(torch.isfinite(v) for v in losses.values())
    assert storage.latest()["ohem/fg_fraction_mined"][0] == 0.0


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value, listed",
    [
        ("SELECTION", "hardest", ["'per_batch'", "'per_image'", "'stratified'", "'background_only_for_tests'"]),
        ("HARDNESS", "focal", ["'loss'", "'probability'", "'box_loss_for_tests'"]),
        ("SELECTION", 3, []),
        ("FG_FRACTION", 1.5, []),
        ("FG_FRACTION", -0.1, []),
        ("FG_FRACTION", "0.25", []),
        ("MIN_FG_FRACTION", 2, []),
        ("MIN_FG_FRACTION", True, []),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_registered_names(key, value, listed):
    cfg = load_cfg(FPN_OHEM)
    cfg.MODEL.OHEM[key] = value
    with pytest.raises(OHEMConfigError, match=rf"MODEL\.OHEM\.{key} = {value!r} is invalid: expected") as e:
        build_roi_heads(cfg, FPN_SHAPES)
    for name in listed:
        assert name in str(e.value)


def test_defaults_are_the_paper():
    cfg = load_cfg(FPN_OHEM)
    o = cfg.MODEL.OHEM
    assert (o.SELECTION, o.HARDNESS, o.MIN_FG_FRACTION, o.FG_FRACTION) == ("per_image", "loss", 0.0, 0.25)
