"""What OHEM is compared against besides Detectron2's own sampler: the peers that answer the same
question (which RoIs should train?) without mining by loss. ``focal_loss``: the stock sampler with a
focal classification loss; ``iou_balanced``: Libra R-CNN's IoU-balanced negative sampler."""
from .focal_loss import FocalLossOutputLayers, FocalLossRes5ROIHeads, FocalLossROIHeads
from .iou_balanced import IoUBalancedRes5ROIHeads, IoUBalancedROIHeads

__all__ = [
    "FocalLossOutputLayers",
    "FocalLossROIHeads",
    "FocalLossRes5ROIHeads",
    "IoUBalancedROIHeads",
    "IoUBalancedRes5ROIHeads",
]
