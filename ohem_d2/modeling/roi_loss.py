"""Per-RoI loss: the hardness OHEM ranks RoIs by.

Detectron2's :meth:`FastRCNNOutputLayers.losses` returns batch means; OHEM needs
the same losses one RoI at a time. This module applies the very loss functions
the box predictor trains with (cross-entropy or sigmoid CE, smooth-L1 / GIoU /
DIoU / CIoU from fvcore and Detectron2, class-specific or class-agnostic
deltas, the predictor's loss weights), unreduced, so that

    [l.mean() for l in per_roi_losses(...)] == box_predictor.losses(...).values()

which the tests check. Always computed in fp32, whatever precision the logits
came in (AMP, bf16 read-only pass), so rankings do not overflow or saturate.
"""
import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, smooth_l1_loss

from detectron2.layers.losses import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform


def regression_targets(transform, src_boxes, target_boxes):
    """``transform.get_deltas(src_boxes, target_boxes)``, bitwise, without its host sync.

    Detectron2's :meth:`Box2BoxTransform.get_deltas` asserts ``(src_widths > 0).all().item()``: the
    host waits for the device on every call, and the read-only pass calls it on every candidate.
    Here the same arithmetic (same operations on the same values, per coordinate pair x/y and w/h
    instead of one coordinate at a time) gives the same deltas without the check; a zero-width
    proposal gives an infinite delta, which the trainable pass's own get_deltas still refuses.
    Other transforms (a subclass may change the arithmetic) keep their own get_deltas.
    """
    if type(transform) is not Box2BoxTransform:
        return transform.get_deltas(src_boxes, target_boxes)
    src_sizes = src_boxes[:, 2:] - src_boxes[:, :2]
    src_centers = src_boxes[:, :2] + 0.5 * src_sizes
    target_sizes = target_boxes[:, 2:] - target_boxes[:, :2]
    target_centers = target_boxes[:, :2] + 0.5 * target_sizes
    wx, wy, ww, wh = transform.weights
    center_weights = wx if wx == wy else src_boxes.new_tensor([wx, wy])
    size_weights = ww if ww == wh else src_boxes.new_tensor([ww, wh])
    d_centers = center_weights * (target_centers - src_centers) / src_sizes
    d_sizes = size_weights * torch.log(target_sizes / src_sizes)
    return torch.cat([d_centers, d_sizes], dim=1)


def per_roi_classification_loss(box_predictor, scores, gt_classes):
    """Classification loss of each RoI, shape (R,), as the predictor defines it."""
    scores = scores.float()
    if not box_predictor.use_sigmoid_ce:
        loss = F.cross_entropy(scores, gt_classes, reduction="none")
    else:
        num_classes = scores.shape[1] - 1
        target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].to(scores.dtype)
        loss = F.binary_cross_entropy_with_logits(scores[:, :-1], target, reduction="none").sum(dim=1)
    return _weighted(loss, box_predictor.loss_weight.get("loss_cls", 1.0))


def _weighted(loss, weight):
    """``loss * weight``; a weight of 1 (the default) launches nothing: x * 1.0 is x, bit for bit."""
    return loss if weight == 1.0 else loss * weight


def per_roi_box_regression_loss(box_predictor, proposal_deltas, proposal_boxes, gt_boxes, gt_classes):
    """Box-regression loss of each RoI, shape (R,); zero for background RoIs."""
    num_classes = box_predictor.num_classes
    deltas = proposal_deltas.float()
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    if deltas.shape[1] != 4:  # class-specific: the deltas of each RoI's GT class
        cls = torch.where(fg, gt_classes, 0)
        deltas = deltas.view(-1, num_classes, 4)[torch.arange(len(cls), device=cls.device), cls]
    transform = box_predictor.box2box_transform
    loss_type = box_predictor.box_reg_loss_type
    if loss_type == "smooth_l1":
        gt_deltas = regression_targets(transform, proposal_boxes, gt_boxes)
        loss = smooth_l1_loss(deltas, gt_deltas, box_predictor.smooth_l1_beta, reduction="none").sum(dim=1)
    else:
        iou_losses = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}
        if loss_type not in iou_losses:
            raise ValueError(f"OHEM: unsupported MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {loss_type!r}")
        pred_boxes = transform.apply_deltas(deltas, proposal_boxes)
        loss = iou_losses[loss_type](pred_boxes, gt_boxes, reduction="none")
    return _weighted(torch.where(fg, loss, 0.0), box_predictor.loss_weight.get("loss_box_reg", 1.0))


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
