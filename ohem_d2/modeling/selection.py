"""Which RoIs are hard: the selection step of OHEM (Shrivastava et al., 2016, Sec. 4.1), and
registered alternatives to it.

The paper, in three steps, on the RoIs of a mini-batch of N images:

1. every RoI gets a hardness, its loss under the current network (computed by
   :mod:`ohem_d2.modeling.roi_loss` in a read-only pass; other definitions in :mod:`ohem_d2.modeling.hardness`);
2. "co-located RoIs with high overlap are likely to have correlated losses",
   so a non-maximum suppression with the loss as score, IoU 0.7, removes
   near-duplicates (:func:`deduplicate`); it works on each image's RoIs apart;
3. the B/N hardest remaining RoIs of each image are kept (:func:`select_per_image`).

Step 3 is a *selection strategy*, chosen by ``MODEL.OHEM.SELECTION`` among the functions of
:data:`OHEM_SELECTION_REGISTRY`. The built-ins, what each does and when it may help, are listed
once, in docs/STRATEGIES.md (``per_image``, the default, is the paper's); each function's
docstring says what it computes, and whether it honours ``MODEL.OHEM.MIN_FG_FRACTION``.

A strategy is a function ``fn(inputs: SelectionInputs) -> (indices, num_after_nms)`` or
``-> (indices, num_after_nms, weights)``:

* ``indices``: int64 tensor of distinct flat RoI indices to train on, on the device (the head
  regroups them by image itself, so any order is accepted; the built-in strategies return them
  grouped by image, hardest first);
* ``num_after_nms``: how many RoIs survived its de-duplication (``len(inputs.hardness)`` if it
  does none); a Python int or a 0-dim tensor, only logged;
* ``weights`` (optional): float tensor, one per index, the RoI's factor in the trainable box
  losses, which become (1/M) sum_j w_j l_j over the M selected RoIs (all ones: the unweighted
  mean a strategy without weights trains on). The head applies them in both modes.

Register your own with ``@OHEM_SELECTION_REGISTRY.register()`` (the function's ``__name__`` is
its config name) and set ``MODEL.OHEM.SELECTION`` to that name.

All inputs are flat over the batch (one row per RoI, ``image_ids`` saying whose) and everything
stays on the device, with no Python loop over images. The host waits for the device where a size
depends on the data: in the NMS (torchvision copies its keep mask to the host) and in each
boolean selection (``x[mask]``); a strategy returns its indices without other syncs.
"""
import math
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from detectron2.utils.registry import Registry

OHEM_SELECTION_REGISTRY = Registry("OHEM_SELECTION")
OHEM_SELECTION_REGISTRY.__doc__ = """
Selection strategies of OHEM, by name (``MODEL.OHEM.SELECTION``). Each is called as
``fn(inputs: SelectionInputs) -> (indices, num_after_nms)``; see :mod:`ohem_d2.modeling.selection`.
"""


@dataclass(frozen=True)
class SelectionInputs:
    """What a selection strategy sees: flat per-RoI tensors over the batch, and the settings."""

    hardness: torch.Tensor  # (R,) float: higher is harder (MODEL.OHEM.HARDNESS)
    boxes: torch.Tensor  # (R, 4) XYXY RoI boxes, for the NMS
    image_ids: torch.Tensor  # (R,) int64 in [0, num_images): the image of each RoI
    is_fg: torch.Tensor  # (R,) bool: labelled with an object class (not background)
    num_images: int  # N
    batch_size_per_image: int  # B/N: MODEL.OHEM.BATCH_SIZE_PER_IMAGE (resolved)
    nms_thresh: float  # MODEL.OHEM.NMS_THRESH (1.0: no NMS)
    fg_fraction: float = 0.25  # MODEL.OHEM.FG_FRACTION (used by "stratified")
    min_fg_fraction: float = 0.0  # MODEL.OHEM.MIN_FG_FRACTION (0: off)
    sampling_temperature: float = 1.0  # MODEL.OHEM.SAMPLING_TEMPERATURE (used by "importance_sampling")
    neg_pos_ratio: float = 3.0  # MODEL.OHEM.NEG_POS_RATIO (used by "hard_negative_ratio")


def deduplicate(boxes, hardness, image_ids, nms_thresh):
    """Indices of the RoIs that survive the per-image NMS, hardest first.

    ``nms_thresh >= 1`` turns the NMS off: every RoI survives, sorted by hardness.
    """
    if nms_thresh >= 1.0:
        return torch.argsort(hardness, descending=True, stable=True)
    return batched_nms(boxes.float(), hardness.float(), image_ids, nms_thresh)


def group_bounds(sorted_keys, num_groups):
    """Where each group of ``sorted_keys`` (int64 in [0, num_groups), ascending) starts, and where
    the last one ends: (num_groups + 1,) positions. A binary search rather than a
    ``torch.bincount``, which on CUDA reads the keys' minimum and maximum on the host."""
    return torch.searchsorted(sorted_keys, torch.arange(num_groups + 1, device=sorted_keys.device))


def _sort_by_group(keys, num_groups):
    """Stable sort of ``keys`` (int64 in [0, num_groups)) for a sequence already in hardness
    order: returns the sorting permutation and, for each sorted element, its rank inside its
    group (0 = hardest)."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    first = group_bounds(sorted_keys, num_groups)[:-1]
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


@OHEM_SELECTION_REGISTRY.register()
def per_image(inputs: SelectionInputs):
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


@OHEM_SELECTION_REGISTRY.register()
def per_batch(inputs: SelectionInputs):
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


@OHEM_SELECTION_REGISTRY.register()
def stratified(inputs: SelectionInputs):
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


@OHEM_SELECTION_REGISTRY.register()
def importance_sampling(inputs: SelectionInputs):
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


@OHEM_SELECTION_REGISTRY.register()
def hard_negative_ratio(inputs: SelectionInputs):
    """SSD's hard negative mining (Liu et al., 2016, Sec. 2.2): every foreground candidate of an
    image, and its hardest background candidates up to floor(NEG_POS_RATIO * P), P its number of
    foreground candidates (counted as 1 where it has none, so that an image without objects still
    trains on its NEG_POS_RATIO hardest negatives).

    No NMS (SSD has none: ``nms_thresh`` does not apply) and no budget B/N: the number kept follows
    the image's positives. ``MIN_FG_FRACTION`` and ``FG_FRACTION`` do not apply.
    """
    order = torch.argsort(inputs.hardness, descending=True, stable=True)
    ids, fg = inputs.image_ids[order], inputs.is_fg[order]
    num_fg = torch.bincount(inputs.image_ids[inputs.is_fg], minlength=inputs.num_images)
    num_bg_kept = torch.floor(inputs.neg_pos_ratio * num_fg.clamp(min=1) + 1e-6).long()
    rank = rank_in_group(ids * 2 + fg.long(), 2 * inputs.num_images)  # rank among the image's bg (or fg)
    keep = fg | (rank < num_bg_kept[ids])
    return _kept_grouped_by_image(order, keep, inputs), len(order)


def registered_strategies():
    """The names ``MODEL.OHEM.SELECTION`` accepts now, sorted."""
    return sorted(name for name, _ in OHEM_SELECTION_REGISTRY)
