"""A frozen copy of OHEM's selection and read-only pass as of commit 9b1c3da (before issue 18's
cuts): the reference the equality tests (tests/test_selection_equality.py) hold the current code
to, RoI for RoI, bitwise. Do not edit to follow the package: it is what the package must match.

Copied: the selection strategies of ohem_d2/modeling/selection.py (without the registry), the
per-RoI losses of ohem_d2/modeling/roi_loss.py (Detectron2's get_deltas with its host sync), and
OHEMMixin's read-only chunking and select() (without the diagnostics).
"""
import math

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, smooth_l1_loss
from torchvision.ops import batched_nms

from detectron2.layers.losses import ciou_loss, diou_loss


def deduplicate(boxes, hardness, image_ids, nms_thresh):
    """Indices of the RoIs that survive the per-image NMS, hardest first.

    ``nms_thresh >= 1`` turns the NMS off: every RoI survives, sorted by hardness.
    """
    if nms_thresh >= 1.0:
        return torch.argsort(hardness, descending=True, stable=True)
    return batched_nms(boxes.float(), hardness.float(), image_ids, nms_thresh)


def _sort_by_group(keys, num_groups):
    """Stable sort of ``keys`` (int64 in [0, num_groups)) for a sequence already in hardness
    order: returns the sorting permutation and, for each sorted element, its rank inside its
    group (0 = hardest)."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_groups)
    first = torch.cumsum(counts, 0) - counts
    return perm, torch.arange(len(keys), device=keys.device) - first[sorted_keys]


def group_by_image(order, image_ids, num_images):
    """Regroup ``order`` (RoI indices, hardest first) image by image, keeping the hardness order
    inside each image. Returns the regrouped indices and each one's rank inside its image
    (0 = hardest)."""
    perm, rank = _sort_by_group(image_ids[order], num_images)
    return order[perm], rank


def rank_in_group(keys, num_groups):
    """For a sequence already in hardness order with a group key each (int64 in
    [0, num_groups)), the rank of every element inside its group (0 = hardest), in sequence order."""
    perm, sorted_rank = _sort_by_group(keys, num_groups)
    rank = torch.empty_like(keys)
    rank[perm] = sorted_rank
    return rank


def quota(fraction, batch_size_per_image):
    """RoIs per image a fraction of the budget stands for: floor(fraction * B/N), rounded as
    Detectron2's sampler rounds ``POSITIVE_FRACTION`` (with a tolerance for 0.3 * 10 = 2.99...)."""
    return int(math.floor(fraction * batch_size_per_image + 1e-6))


def select_per_image(hardness, boxes, image_ids, num_images, batch_size_per_image, nms_thresh):
    """The paper's selection: the ``batch_size_per_image`` hardest RoIs of each image after NMS.

    Args:
        hardness: (R,) loss of each RoI; higher is harder.
        boxes: (R, 4) RoI boxes (XYXY), used by the NMS.
        image_ids: (R,) int64, the image each RoI belongs to, in [0, num_images).
        num_images: N, the number of images in the batch.
        batch_size_per_image: B/N, RoIs kept per image (fewer where fewer survive the NMS).
        nms_thresh: IoU of the NMS (1.0: no NMS).

    Returns:
        (indices, num_after_nms): the kept RoIs, grouped by image (ascending image id), hardest
        first within each image; and the number of RoIs that survived the NMS.
    """
    order = deduplicate(boxes, hardness, image_ids, nms_thresh)
    grouped, rank = group_by_image(order, image_ids, num_images)
    return grouped[rank < batch_size_per_image], len(order)


def _hardest_fg_reserve(order, inputs):
    """Mask over ``order`` of the RoIs MIN_FG_FRACTION reserves: the floor(MIN_FG_FRACTION * B/N)
    hardest foreground RoIs of each image (all of its foreground where it has fewer)."""
    ids, fg = inputs.image_ids[order], inputs.is_fg[order]
    rank = rank_in_group(ids * 2 + fg.long(), 2 * inputs.num_images)
    return fg & (rank < quota(inputs.min_fg_fraction, inputs.batch_size_per_image))


def _kept_grouped_by_image(order, keep, inputs):
    """``order[keep]`` regrouped by image, hardest first inside each image."""
    return group_by_image(order[keep], inputs.image_ids, inputs.num_images)[0]


def per_image(inputs):
    """The paper (default): after the per-image NMS, the B/N hardest RoIs of each image.

    With ``MIN_FG_FRACTION`` m > 0: each image first keeps its floor(m * B/N) hardest foreground
    RoIs (all its foreground if it has fewer), then fills the rest of its B/N with the hardest of
    its remaining RoIs, foreground or background. m = 0 is exactly :func:`select_per_image`.
    """
    if inputs.min_fg_fraction <= 0:
        return select_per_image(inputs.hardness, inputs.boxes, inputs.image_ids, inputs.num_images,
                                inputs.batch_size_per_image, inputs.nms_thresh)
    order = deduplicate(inputs.boxes, inputs.hardness, inputs.image_ids, inputs.nms_thresh)
    ids = inputs.image_ids[order]
    reserved = _hardest_fg_reserve(order, inputs)
    num_reserved = torch.bincount(ids[reserved], minlength=inputs.num_images)
    # Rank of the other RoIs among the other RoIs of their image (group 2i; reserved ones are 2i+1).
    rank = rank_in_group(ids * 2 + reserved.long(), 2 * inputs.num_images)
    keep = reserved | (rank < inputs.batch_size_per_image - num_reserved[ids])
    return _kept_grouped_by_image(order, keep, inputs), len(order)


def per_batch(inputs):
    """After the per-image NMS, the N * B/N hardest RoIs of the whole batch, wherever they are:
    an image full of hard RoIs gives more than B/N, an easy one fewer (maybe none).

    With ``MIN_FG_FRACTION`` m > 0: each image first keeps its floor(m * B/N) hardest foreground
    RoIs (all its foreground if it has fewer); the rest of the batch budget N * B/N goes to the
    hardest remaining RoIs of the batch.
    """
    order = deduplicate(inputs.boxes, inputs.hardness, inputs.image_ids, inputs.nms_thresh)
    budget = inputs.num_images * inputs.batch_size_per_image
    if inputs.min_fg_fraction <= 0:
        return _kept_grouped_by_image(order, slice(0, budget), inputs), len(order)
    reserved = _hardest_fg_reserve(order, inputs)
    rest = ~reserved
    rank = torch.cumsum(rest.long(), 0) - 1  # rank of the unreserved RoIs among themselves
    keep = reserved | (rest & (rank < budget - reserved.sum()))
    return _kept_grouped_by_image(order, keep, inputs), len(order)


def stratified(inputs):
    """S-OHEM style: per image after the NMS, the hardest foreground RoIs up to a foreground quota
    and the hardest background RoIs up to the background quota.

    Foreground quota: floor(max(FG_FRACTION, MIN_FG_FRACTION) * B/N); background quota: the rest
    of B/N. An image with too few foreground RoIs fills its budget with more background, one with
    too little background with more foreground: each image keeps min(B/N, its RoIs after NMS), as
    ``per_image`` does. Ranking happens inside each stratum only, so a dataset with very few
    positives still trains on them however easy the background is.
    """
    order = deduplicate(inputs.boxes, inputs.hardness, inputs.image_ids, inputs.nms_thresh)
    n, b = inputs.num_images, inputs.batch_size_per_image
    q_fg = quota(max(inputs.fg_fraction, inputs.min_fg_fraction), b)
    q_bg = b - q_fg
    key = inputs.image_ids[order] * 2 + inputs.is_fg[order].long()  # (image, bg 0 / fg 1)
    rank = rank_in_group(key, 2 * n)
    counts = torch.bincount(key, minlength=2 * n).view(n, 2)
    num_bg, num_fg = counts[:, 0], counts[:, 1]
    take_fg = torch.minimum(num_fg, q_fg + (q_bg - num_bg).clamp(min=0))
    take_bg = torch.minimum(num_bg, q_bg + (q_fg - num_fg).clamp(min=0))
    limit = torch.stack([take_bg, take_fg], dim=1).view(-1)
    return _kept_grouped_by_image(order, rank < limit[key], inputs), len(order)


def importance_sampling(inputs):
    """Weighting instead of selecting: every candidate may train, with a weight for its chance.

    Per image, after the NMS: an image with at most B/N candidates trains on all of them; any other
    draws B/N RoIs with replacement, candidate j with probability q_j proportional to
    hardness_j ** (1 / SAMPLING_TEMPERATURE) (1.0: proportional to hardness; larger flattens
    towards uniform, smaller concentrates on the hardest; negative hardness counts as 0, and an
    image whose candidates all have hardness 0 draws uniformly). A RoI drawn c_j times, which it is
    e_j = B/N * q_j times on average (e_j = 1 where the image trains on all), gets the weight

        w_j = (c_j / e_j) * M / R,    M RoIs drawn at least once in the batch, R candidates,

    so that the trainable loss (1/M) sum_j w_j l_j = (1/R) sum_j (c_j / e_j) l_j has as its
    expectation over the draws the mean loss over all R candidates of the batch (Hansen-Hurwitz).
    With the default hardness ``loss`` and temperature 1, q_j is proportional to l_j, so every
    draw contributes the same weighted loss, the mean itself: the estimate of the loss has no
    variance (its gradient still has). A candidate with hardness 0 is never drawn: the estimate
    stays unbiased where its loss is 0 too, as with ``loss``.

    Cost: the read-only pass as two-pass OHEM, then one multinomial draw; the trainable pass runs
    on the distinct drawn RoIs, at most B/N per image (fewer where draws repeat, a hardness
    concentrated on a few RoIs: raise the temperature). ``MIN_FG_FRACTION`` and ``FG_FRACTION``
    do not apply.
    """
    order = deduplicate(inputs.boxes, inputs.hardness, inputs.image_ids, inputs.nms_thresh)
    n, draws, num_candidates = inputs.num_images, inputs.batch_size_per_image, len(order)
    # One row per image, one column per candidate of that image (its rank in `order`).
    ids = inputs.image_ids[order]
    rows, cols = ids, rank_in_group(ids, n)
    present = torch.zeros(n, max(num_candidates, 1), device=order.device)
    present[rows, cols] = 1.0
    per_image = present.sum(dim=1, keepdim=True)
    score = torch.zeros_like(present)
    score[rows, cols] = inputs.hardness[order].float().clamp(min=0) ** (1.0 / inputs.sampling_temperature)
    score = torch.where(score.sum(dim=1, keepdim=True) > 0, score, present)
    score[:, 0] += (per_image[:, 0] == 0).float()  # an image without candidates: a row never read
    probs = score / score.sum(dim=1, keepdim=True)
    drawn = torch.multinomial(probs, draws, replacement=True)
    times_drawn = torch.zeros_like(present).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=present.dtype))
    takes_all = per_image <= draws
    count = torch.where(takes_all, present, times_drawn)[rows, cols]
    expected = torch.where(takes_all, present, draws * probs)[rows, cols]
    kept = count > 0
    indices = order[kept]
    weights = count[kept] / expected[kept] * (len(indices) / max(num_candidates, 1))
    by_image = torch.sort(inputs.image_ids[indices], stable=True)[1]
    return indices[by_image], num_candidates, weights[by_image]


def per_roi_classification_loss(box_predictor, scores, gt_classes):
    """Classification loss of each RoI, shape (R,), as the predictor defines it."""
    scores = scores.float()
    if not box_predictor.use_sigmoid_ce:
        loss = F.cross_entropy(scores, gt_classes, reduction="none")
    else:
        num_classes = scores.shape[1] - 1
        target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(scores.dtype)
        loss = F.binary_cross_entropy_with_logits(scores[:, :-1], target, reduction="none").sum(dim=1)
    return loss * box_predictor.loss_weight.get("loss_cls", 1.0)


def per_roi_box_regression_loss(box_predictor, proposal_deltas, proposal_boxes, gt_boxes, gt_classes):
    """Box-regression loss of each RoI, shape (R,); zero for background RoIs."""
    num_classes = box_predictor.num_classes
    deltas = proposal_deltas.float()
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    if deltas.shape[1] != 4:  # class-specific: the deltas of each RoI's GT class
        cls = torch.where(fg, gt_classes, torch.zeros_like(gt_classes))
        deltas = deltas.view(-1, num_classes, 4)[torch.arange(len(cls), device=cls.device), cls]
    transform = box_predictor.box2box_transform
    loss_type = box_predictor.box_reg_loss_type
    if loss_type == "smooth_l1":
        gt_deltas = transform.get_deltas(proposal_boxes, gt_boxes)
        loss = smooth_l1_loss(deltas, gt_deltas, box_predictor.smooth_l1_beta, reduction="none").sum(dim=1)
    else:
        iou_losses = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}
        if loss_type not in iou_losses:
            raise ValueError(f"OHEM: unsupported MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {loss_type!r}")
        pred_boxes = transform.apply_deltas(deltas, proposal_boxes)
        loss = iou_losses[loss_type](pred_boxes, gt_boxes, reduction="none")
    loss = torch.where(fg, loss, torch.zeros_like(loss))
    return loss * box_predictor.loss_weight.get("loss_box_reg", 1.0)


def per_roi_losses(box_predictor, predictions, proposals):
    """(classification, box regression) loss of every RoI of ``proposals``, each of shape (R,).

    ``proposals`` are labelled Instances (``proposal_boxes``, ``gt_classes``, ``gt_boxes`` where the
    image has GT), in the order of ``predictions``.
    """
    scores, proposal_deltas = predictions
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    proposal_boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    gt_boxes = torch.cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals])
    # A background RoI's box loss is zeroed, but its gradient is still 0 x d(loss): finite only if
    # the loss is. Its gt_boxes are a placeholder (a cascade's later stages give images without
    # GT all-zero boxes, whose regression targets are infinite), so regress it onto itself.
    is_fg = ((gt_classes >= 0) & (gt_classes < box_predictor.num_classes))[:, None]
    gt_boxes = torch.where(is_fg, gt_boxes, proposal_boxes)
    return (
        per_roi_classification_loss(box_predictor, scores, gt_classes),
        per_roi_box_regression_loss(box_predictor, proposal_deltas, proposal_boxes, gt_boxes, gt_classes),
    )


STRATEGIES = {f.__name__: f for f in (per_image, per_batch, stratified, importance_sampling)}


def frozen_readonly_predictions(head, features, proposals, stage=0):
    """OHEMMixin._readonly_predictions as of 9b1c3da: chunks of one image each."""
    chunk = head.ohem.readonly_chunk_size
    if chunk == 0:
        return head._box_predictions(features, proposals, stage)
    parts = []
    for i, p in enumerate(proposals):
        image_features = [f[i : i + 1] for f in features]
        for start in range(0, len(p), chunk):
            parts.append(head._box_predictions(image_features, [p[start : start + chunk]], stage))
    if not parts:
        return head._box_predictions(features, proposals, stage)
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def frozen_select(head, hardness, proposals, inputs_cls, generator_seed=None):
    """OHEMMixin.select as of 9b1c3da, without the diagnostics: (selected, mined, weights or None)."""
    num_images = len(proposals)
    lengths = [len(p) for p in proposals]
    image_ids = torch.cat(
        [torch.full((n,), i, dtype=torch.int64, device=hardness.device) for i, n in enumerate(lengths)]
    )
    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    gt_classes = torch.cat([p.gt_classes for p in proposals])
    is_fg = (gt_classes >= 0) & (gt_classes < head.num_classes)
    s = head.ohem
    inputs = inputs_cls(hardness=hardness, boxes=boxes, image_ids=image_ids, is_fg=is_fg, num_images=num_images,
                        batch_size_per_image=s.batch_size_per_image, nms_thresh=s.nms_thresh,
                        fg_fraction=s.fg_fraction, min_fg_fraction=s.min_fg_fraction,
                        sampling_temperature=s.sampling_temperature)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    selected, _, *weights = STRATEGIES[s.selection](inputs)
    weights = weights[0] if weights else None
    by_image = torch.sort(image_ids[selected], stable=True)[1]
    selected = selected[by_image]
    per_image = torch.bincount(image_ids[selected], minlength=num_images).tolist()
    starts = [sum(lengths[:i]) for i in range(num_images)]
    mined = [p[idx - start] for p, idx, start in zip(proposals, selected.split(per_image), starts)]
    if weights is not None:
        weights = weights[by_image].float()
    return selected, mined, weights
