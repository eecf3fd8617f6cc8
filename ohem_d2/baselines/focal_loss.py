"""A peer of OHEM: Detectron2's RoI sampler with a focal classification loss.

The focal loss (Lin et al., ICCV 2017) answers the same complaint as OHEM, that easy examples
swamp the loss, by weighting instead of choosing: every RoI of the stock sample trains, its
cross-entropy scaled by (1 - p_t) ** gamma, p_t the probability of its label, so that a
well-classified RoI (p_t near 1) counts little and a misclassified one almost fully. gamma = 0 is
plain cross-entropy.

* :class:`FocalLossOutputLayers`: Detectron2's box predictor with only its classification loss
  replaced (softmax: the multi-class form -(1 - p_t) ** gamma * log p_t over the K + 1 classes;
  sigmoid CE: fvcore's ``sigmoid_focal_loss`` per class, without its alpha balancing), averaged
  over the RoIs as Detectron2 averages its cross-entropy (RetinaNet divides by the number of
  foreground anchors instead; a RoI head samples a fixed budget with a fixed foreground share, so
  the mean over RoIs keeps the loss scale of the stock arm). Box regression, inference and
  parameters are the stock predictor's, so checkpoints load both ways.
* :class:`FocalLossROIHeads` (FPN) and :class:`FocalLossRes5ROIHeads` (C4): the stock heads and
  sampler with that predictor, for a yacs config: ``MODEL.ROI_HEADS.NAME: "FocalLossROIHeads"``.
  gamma is :data:`FOCAL_GAMMA` there (no yacs key); a LazyConfig sets it on the predictor:
  ``box_predictor=L(FocalLossOutputLayers)(..., gamma=1.0)``.
"""
import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, FastRCNNOutputLayers, Res5ROIHeads, StandardROIHeads

FOCAL_GAMMA = 2.0  # RetinaNet's


def softmax_focal_loss(scores, gt_classes, gamma, reduction="none"):
    """Multi-class focal loss, -(1 - p_t) ** gamma * log p_t per RoI, reduced as ``F.nll_loss``.

    Written as the negative log-likelihood of the modulated log-probabilities, which is how torch
    computes the cross-entropy: gamma = 0 gives Detectron2's loss bit for bit.
    """
    log_p = F.log_softmax(scores, dim=1)
    one_minus_p = -torch.expm1(log_p)  # exact for p near 1
    return F.nll_loss(log_p * one_minus_p**gamma, gt_classes, reduction=reduction)


class FocalLossOutputLayers(FastRCNNOutputLayers):
    """:class:`FastRCNNOutputLayers` whose classification loss is the focal loss (module docstring)."""

    def __init__(self, *args, gamma: float = FOCAL_GAMMA, **kwargs):
        """``gamma``: the focusing exponent (0: cross-entropy); the other arguments are the stock
        predictor's."""
        super().__init__(*args, **kwargs)
        if self.use_fed_loss:
            raise ValueError("MODEL.ROI_BOX_HEAD.USE_FED_LOSS = True is invalid: expected False with the "
                             "focal loss (it has no federated variant here).")
        self.gamma = gamma

    def losses(self, predictions, proposals):
        losses = super().losses(predictions, proposals)  # the box loss and the accuracy metrics
        scores = predictions[0]
        gt_classes = torch.cat([p.gt_classes for p in proposals]) if proposals else scores.new_zeros(0).long()
        if scores.numel() == 0:
            loss = scores.sum() * 0.0
        elif self.use_sigmoid_ce:
            target = F.one_hot(gt_classes, self.num_classes + 1)[:, :-1].to(scores.dtype)
            loss = sigmoid_focal_loss(scores[:, :-1], target, alpha=-1, gamma=self.gamma).sum() / len(scores)
        else:
            loss = softmax_focal_loss(scores, gt_classes, self.gamma, reduction="mean")
        losses["loss_cls"] = loss * self.loss_weight.get("loss_cls", 1.0)
        return losses


def focal_predictor_like(stock, cfg):
    """A :class:`FocalLossOutputLayers` with ``cfg``'s settings and ``stock``'s parameters.

    Built without drawing from the global random generator, so that every module built after it
    starts as it does in the stock model with the same seed: the arms differ in the loss only.
    """
    with torch.random.fork_rng(devices=[]):
        focal = FocalLossOutputLayers(cfg, ShapeSpec(channels=stock.cls_score.in_features))
    focal.load_state_dict(stock.state_dict())
    return focal


class FocalLossMixin:
    """A Detectron2 ROI head whose box predictor is a :class:`FocalLossOutputLayers`."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.box_predictor, FocalLossOutputLayers):  # a LazyConfig that set the head only
            raise ValueError(f"{type(self).__name__}: box_predictor is invalid: expected a FocalLossOutputLayers "
                             f"(in a LazyConfig: box_predictor=L(FocalLossOutputLayers)(...)), got "
                             f"{type(self.box_predictor).__name__}.")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box_predictor"] = focal_predictor_like(ret["box_predictor"], cfg)
        return ret


@ROI_HEADS_REGISTRY.register()
class FocalLossROIHeads(FocalLossMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (FPN) with the focal classification loss."""


@ROI_HEADS_REGISTRY.register()
class FocalLossRes5ROIHeads(FocalLossMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (C4) with the focal classification loss."""
