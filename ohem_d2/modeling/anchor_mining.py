"""Hard anchors: OHEM's selection step applied to the dense predictions of an RPN or a RetinaNet.

Those detectors compute every anchor's logits and deltas anyway, so the read-only pass of the RoI
heads costs nothing here: each anchor's loss comes from the detached predictions, a selection
strategy of ``OHEM_SELECTION_REGISTRY`` (``MODEL.OHEM.ANCHOR_SELECTION``) keeps the hard ones, and
the detector's own Detectron2 loss then runs with every other anchor labelled "ignore" (-1). The
normaliser, the box loss and the ignore band stay Detectron2's; gradients reach the mined anchors
only.

The candidate set is bounded: sorting and NMS over the 10^5 anchors of an image would cost more
than the loss itself. The strategy sees every foreground anchor of each image and its
max(CANDIDATES_PER_BUDGET * B/N, ceil(NEG_POS_RATIO * P)) hardest other anchors (P: the most
foreground anchors of any image in the batch), which holds every anchor the built-in strategies
can keep: ``per_image`` keeps B/N of the hardest (NMS only removes), ``hard_negative_ratio`` all
foreground and at most NEG_POS_RATIO * P negatives.
"""
import math

import torch
from fvcore.nn import giou_loss, smooth_l1_loss

from detectron2.layers import cat, ciou_loss, diou_loss
from detectron2.structures import Boxes

from .diagnostics import record_mining_stats, records_this_iteration
from .selection import OHEM_SELECTION_REGISTRY, SelectionInputs
from .settings import OHEMConfigError

# The hardest non-foreground anchors of each image that reach the strategy, in multiples of B/N.
CANDIDATES_PER_BUDGET = 4
# Box losses Detectron2's dense detectors accept (MODEL.RETINANET/RPN.BBOX_REG_LOSS_TYPE) other
# than smooth L1, each with reduction="none" giving one loss per box.
_IOU_BOX_LOSSES = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}


def flat_anchors(anchors):
    """(R, 4) tensor of the anchors of all levels (a list of Boxes or of tensors)."""
    return Boxes.cat(anchors).tensor if isinstance(anchors[0], Boxes) else cat(anchors)


def box_loss_per_anchor(anchors, box2box_transform, pred_anchor_deltas, gt_boxes, fg_mask,
                        box_reg_loss_type="smooth_l1", smooth_l1_beta=0.0):
    """(N, R) box regression loss of each anchor, 0 outside ``fg_mask``: the terms of Detectron2's
    ``_dense_box_regression_loss`` (same arguments), which is their sum."""
    anchors = flat_anchors(anchors)
    deltas = cat(pred_anchor_deltas, dim=1)
    loss = deltas.new_zeros(fg_mask.shape)
    if box_reg_loss_type == "smooth_l1":
        gt_deltas = torch.stack([box2box_transform.get_deltas(anchors, k) for k in gt_boxes])
        loss[fg_mask] = smooth_l1_loss(deltas[fg_mask], gt_deltas[fg_mask], beta=smooth_l1_beta,
                                       reduction="none").sum(dim=-1)
    elif box_reg_loss_type in _IOU_BOX_LOSSES:
        pred_boxes = torch.stack([box2box_transform.apply_deltas(k, anchors) for k in deltas])
        loss[fg_mask] = _IOU_BOX_LOSSES[box_reg_loss_type](
            pred_boxes[fg_mask], torch.stack(gt_boxes)[fg_mask], reduction="none")
    else:
        raise ValueError(f"Invalid dense box regression loss type '{box_reg_loss_type}'")
    return loss


@torch.no_grad()
def mine_anchors(hardness, valid, is_fg, anchors, settings, scope=""):
    """The anchors to train on: an (N, R) bool mask, a subset of ``valid``.

    Args:
        hardness: (N, R) loss of each anchor (any value where not ``valid``).
        valid: (N, R) bool: labelled foreground or background (not ignored).
        is_fg: (N, R) bool: labelled foreground.
        anchors: list of Boxes (or tensors) per level, R anchors in all: the boxes of the NMS.
        settings: OHEMSettings (the ``anchor_*`` fields and ``neg_pos_ratio``).
        scope: prefix of the ``ohem/*`` diagnostics ("rpn/" for the RPN), recorded in the
            current EventStorage when ``settings.log_diagnostics``, on the iterations the event
            writers log (:func:`~ohem_d2.modeling.diagnostics.records_this_iteration`).
    """
    num_images, num_anchors = hardness.shape
    budget = settings.anchor_batch_size_per_image
    most_fg = int(is_fg.sum(dim=1).max()) if num_images else 0
    pool = min(num_anchors, max(CANDIDATES_PER_BUDGET * budget, math.ceil(settings.neg_pos_ratio * max(most_fg, 1))))
    others = valid & ~is_fg
    top = torch.topk(hardness.masked_fill(~others, -math.inf), pool, dim=1)
    candidate = torch.zeros_like(valid).scatter_(1, top.indices, top.values > -math.inf) | is_fg
    image_ids, anchor_ids = candidate.nonzero(as_tuple=True)
    inputs = SelectionInputs(
        hardness=hardness[image_ids, anchor_ids],
        boxes=flat_anchors(anchors)[anchor_ids],
        image_ids=image_ids,
        is_fg=is_fg[image_ids, anchor_ids],
        num_images=num_images,
        batch_size_per_image=budget,
        nms_thresh=settings.anchor_nms_thresh,
        fg_fraction=settings.fg_fraction,
        min_fg_fraction=settings.min_fg_fraction,
        sampling_temperature=settings.sampling_temperature,
        neg_pos_ratio=settings.neg_pos_ratio,
    )
    selected, num_after_nms, *weights = OHEM_SELECTION_REGISTRY.get(settings.anchor_selection)(inputs)
    if weights:
        raise OHEMConfigError(
            f"MODEL.OHEM.ANCHOR_SELECTION = {settings.anchor_selection!r} is invalid: expected a strategy that "
            "returns no weights (anchor losses are Detectron2's, unweighted)")
    keep = torch.zeros_like(valid)
    keep[image_ids[selected], anchor_ids[selected]] = True
    if settings.log_diagnostics and records_this_iteration():
        record_mining_stats(anchor_mining_stats(hardness, valid, is_fg, keep, len(image_ids), num_after_nms, scope))
    return keep


def anchor_mining_stats(hardness, valid, is_fg, keep, num_candidates, num_after_nms, scope=""):
    """The ``ohem/*`` scalars of one anchor-mining step (as the RoI heads' in
    :mod:`ohem_d2.modeling.diagnostics`; "all" means every labelled anchor, not only candidates)."""
    num_images = max(len(hardness), 1)
    num_valid, num_mined = valid.sum().clamp(min=1), keep.sum().clamp(min=1)
    return {
        f"{scope}ohem/candidates_per_image": num_candidates / num_images,
        f"{scope}ohem/nms_removed_per_image": (num_candidates - num_after_nms) / num_images,
        f"{scope}ohem/mined_per_image": keep.sum() / num_images,
        f"{scope}ohem/fg_fraction_mined": (keep & is_fg).sum() / num_mined,
        f"{scope}ohem/fg_fraction_all": is_fg.sum() / num_valid,
        f"{scope}ohem/loss_mined_mean": hardness[keep].sum() / num_mined,
        f"{scope}ohem/loss_all_mean": hardness[valid].sum() / num_valid,
    }


def ignore_all_but(gt_labels, keep):
    """Per-image labels (a list, as Detectron2's losses take them) with every anchor outside
    ``keep`` (N, R) set to -1, ignored by the loss."""
    return list(torch.where(keep, torch.stack(gt_labels), -1).unbind(0))
