"""RetinaNet trained on hard anchors: ``OHEMRetinaNet`` (``MODEL.META_ARCHITECTURE: "OHEMRetinaNet"``).

Focal loss answers class imbalance by down-weighting easy anchors; OHEM by training on the hard
ones alone. This meta-architecture is Detectron2's RetinaNet with one change, its training loss:
every anchor's loss (classification + box regression, RetinaNet's own definitions) ranks the
anchors, :func:`ohem_d2.modeling.anchor_mining.mine_anchors` keeps the hard ones
(``MODEL.OHEM.ANCHOR_SELECTION``: the paper's B/N per image after NMS on loss, or SSD's
``hard_negative_ratio``), and RetinaNet's own ``losses`` runs on those. The mined anchors are meant
to train with plain sigmoid cross-entropy, Detectron2's focal loss at
``MODEL.RETINANET.FOCAL_LOSS_GAMMA: 0.0`` and ``FOCAL_LOSS_ALPHA: -1.0``, as
configs/Base-OHEM-RetinaNet.yaml sets; the normaliser (EMA of the positives, here the mined
positives), box loss and ignore band are RetinaNet's.

Inference, parameters and checkpoints are exactly stock RetinaNet's.
"""
import logging

import torch
from fvcore.nn import sigmoid_focal_loss

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.layers import cat

from .anchor_mining import box_loss_per_anchor, ignore_all_but, mine_anchors
from .settings import OHEMSettings

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class OHEMRetinaNet(RetinaNet):
    """RetinaNet whose training loss covers the hard anchors only (see the module docstring)."""

    @configurable
    def __init__(self, *, ohem: OHEMSettings = OHEMSettings(), **kwargs):
        """``ohem``: how to mine (its ``anchor_*`` fields); every other argument is RetinaNet's."""
        super().__init__(**kwargs)
        self.ohem = ohem
        logger.info(f"{type(self).__name__}: {self.ohem}")

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "ohem": OHEMSettings.from_config(cfg)}

    @torch.no_grad()
    def anchor_losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """(cls, box): (N, R) losses of each anchor, 0 where ignored (box: 0 off foreground), with
        the arguments of :meth:`losses`; RetinaNet's ``losses`` is their sum over the batch divided
        by its normaliser."""
        labels = torch.stack(gt_labels)
        valid = labels >= 0
        # Detectron2's one-hot targets without F.one_hot, which reads the labels' range on the host:
        # background (num_classes) and ignored (-1) anchors get all-zero rows.
        classes = torch.arange(self.num_classes, device=labels.device)
        targets = labels.unsqueeze(-1) == classes
        logits = cat(pred_logits, dim=1)
        cls = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=self.focal_loss_alpha,
                                 gamma=self.focal_loss_gamma, reduction="none").sum(dim=-1) * valid
        box = box_loss_per_anchor(anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes,
                                  valid & (labels != self.num_classes), self.box_reg_loss_type, self.smooth_l1_beta)
        return cls, box

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """RetinaNet's losses over the anchors :func:`mine_anchors` keeps."""
        labels = torch.stack(gt_labels)
        valid = labels >= 0
        cls, box = self.anchor_losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        keep = mine_anchors(cls + box, valid, valid & (labels != self.num_classes), anchors, self.ohem)
        return super().losses(anchors, pred_logits, ignore_all_but(gt_labels, keep), pred_anchor_deltas, gt_boxes)
