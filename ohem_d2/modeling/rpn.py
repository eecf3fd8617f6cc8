"""An RPN trained on hard anchors: ``OHEMRPN`` (``MODEL.PROPOSAL_GENERATOR.NAME: "OHEMRPN"``).

Detectron2's RPN trains on ``MODEL.RPN.BATCH_SIZE_PER_IMAGE`` (256) anchors per image drawn at
random with at most half foreground: the kind of heuristic sampler OHEM replaces in the RoI head.
``OHEMRPN`` labels every anchor as the RPN does (same matcher, same ignore band and boundary
rule), samples none away, ranks them by their own loss (objectness + box regression, the RPN's
definitions and loss weights) and keeps the hard ones with
:func:`ohem_d2.modeling.anchor_mining.mine_anchors` (``MODEL.OHEM.ANCHOR_SELECTION``; the paper's
``per_image``: the B/N hardest per image after NMS on loss, no fg fraction). The RPN's own
``losses`` then runs on those, normalised as Detectron2 normalises it
(``MODEL.RPN.BATCH_SIZE_PER_IMAGE`` x images).

Proposals, parameters and checkpoints are exactly stock RPN's.
"""
import logging

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN

from .anchor_mining import box_loss_per_anchor, ignore_all_but, mine_anchors
from .settings import OHEMSettings

logger = logging.getLogger(__name__)


@PROPOSAL_GENERATOR_REGISTRY.register()
class OHEMRPN(RPN):
    """RPN whose training loss covers the hard anchors only (see the module docstring)."""

    @configurable
    def __init__(self, *, ohem: OHEMSettings = OHEMSettings(), **kwargs):
        """``ohem``: how to mine (its ``anchor_*`` fields); every other argument is the RPN's."""
        super().__init__(**kwargs)
        self.ohem = ohem
        logger.info(f"{type(self).__name__}: {self.ohem}")

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "ohem": OHEMSettings.from_config(cfg)}

    def _subsample_labels(self, label):
        """No sampling: every labelled anchor is a candidate for mining."""
        return label

    @torch.no_grad()
    def anchor_losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """(cls, loc): (N, R) losses of each anchor, 0 where ignored (loc: 0 off foreground), with
        the arguments of :meth:`losses`, unweighted; the RPN's ``losses`` is their sum over the
        batch divided by its normaliser."""
        labels = torch.stack(gt_labels)
        cls = F.binary_cross_entropy_with_logits(cat(pred_objectness_logits, dim=1), labels.clamp(min=0).float(),
                                                 reduction="none") * (labels >= 0)
        loc = box_loss_per_anchor(anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, labels == 1,
                                  self.box_reg_loss_type, self.smooth_l1_beta)
        return cls, loc

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """The RPN's losses over the anchors :func:`mine_anchors` keeps, ranked by their weighted sum."""
        labels = torch.stack(gt_labels)
        cls, loc = self.anchor_losses(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        hardness = self.loss_weight.get("loss_rpn_cls", 1.0) * cls + self.loss_weight.get("loss_rpn_loc", 1.0) * loc
        keep = mine_anchors(hardness, labels >= 0, labels == 1, anchors, self.ohem, scope="rpn/")
        return super().losses(anchors, pred_objectness_logits, ignore_all_but(gt_labels, keep),
                              pred_anchor_deltas, gt_boxes)
