"""Online Hard Example Mining (Shrivastava, Gupta, Girshick, CVPR 2016) for Detectron2.

``import ohem_d2`` registers the OHEM ROI heads and the peers' (``FocalLossROIHeads``,
``IoUBalancedROIHeads`` and their C4 versions); ``add_ohem_config(cfg)`` adds ``MODEL.OHEM``.
Selection strategies and hardness definitions are registered by name in
``OHEM_SELECTION_REGISTRY`` and ``OHEM_HARDNESS_REGISTRY`` (docs/STRATEGIES.md).
"""
from importlib.metadata import version as _installed_version

import torch as _torch

from .requirements import check_versions as _check_versions

# torchvision's version from its metadata: an old torchvision may fail to import with a newer torch.
_check_versions(_torch.__version__, _installed_version("torchvision"))

from .cascade import FastRCNNHeuristicsCascadeROIHeads, OHEMCascadeROIHeads  # noqa: E402 (after the check)
from .config import OHEMConfigError, OHEMSettings, add_ohem_config, validate_ohem_config
from .focal_loss import FocalLossOutputLayers, FocalLossRes5ROIHeads, FocalLossROIHeads
from .hardness import OHEM_HARDNESS_REGISTRY, HardnessInputs
from .iou_balanced import IoUBalancedRes5ROIHeads, IoUBalancedROIHeads
from .roi_heads import OHEMMixin, OHEMRes5ROIHeads, OHEMROIHeads
from .selection import OHEM_SELECTION_REGISTRY, SelectionInputs

__all__ = [
    "add_ohem_config",
    "validate_ohem_config",
    "OHEMConfigError",
    "OHEMSettings",
    "OHEMMixin",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
    "OHEMCascadeROIHeads",
    "FastRCNNHeuristicsCascadeROIHeads",
    "FocalLossOutputLayers",
    "FocalLossROIHeads",
    "FocalLossRes5ROIHeads",
    "IoUBalancedROIHeads",
    "IoUBalancedRes5ROIHeads",
    "OHEM_SELECTION_REGISTRY",
    "OHEM_HARDNESS_REGISTRY",
    "SelectionInputs",
    "HardnessInputs",
]
