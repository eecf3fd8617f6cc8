"""Online Hard Example Mining (Shrivastava, Gupta, Girshick, CVPR 2016) for Detectron2.

``import ohem_d2`` registers the OHEM ROI heads, ``OHEMRetinaNet`` and ``OHEMRPN``
(:mod:`ohem_d2.modeling`) and the peers' (:mod:`ohem_d2.baselines`); ``add_ohem_config(cfg)`` adds ``MODEL.OHEM``. Selection strategies
and hardness definitions are registered by name in ``OHEM_SELECTION_REGISTRY`` and
``OHEM_HARDNESS_REGISTRY`` (docs/STRATEGIES.md). The packages and what each may import:
docs/ARCHITECTURE.md.
"""
import warnings as _warnings
from importlib.metadata import version as _installed_version

import torch as _torch

from .requirements import check_versions as _check_versions

# torchvision's version from its metadata: an old torchvision may fail to import with a newer torch.
_check_versions(_torch.__version__, _installed_version("torchvision"))

# Detectron2 (detectron2.modeling.box_regression) and fvcore (fvcore.nn.focal_loss, which
# Detectron2 imports) compile functions with torch.jit.script when they are imported; torch
# deprecates it with a FutureWarning for each, printed at every start, about code that no user of
# ohem_d2 can change. This message only, and only for this import, is silenced: Detectron2's other
# warnings show as they would. The tools import ohem_d2 before Detectron2 for this.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    import detectron2.modeling  # noqa: E402,F401

from .baselines import (  # noqa: E402 (after the check)
    FocalLossOutputLayers,
    FocalLossRes5ROIHeads,
    FocalLossROIHeads,
    IoUBalancedRes5ROIHeads,
    IoUBalancedROIHeads,
)
from .config import add_ohem_config, validate_ohem_config  # noqa: E402
from .modeling import (  # noqa: E402
    OHEM_HARDNESS_REGISTRY,
    OHEM_SELECTION_REGISTRY,
    FastRCNNHeuristicsCascadeROIHeads,
    HardnessInputs,
    MiningResult,
    OHEMCascadeROIHeads,
    OHEMConfigError,
    OHEMMixin,
    OHEMRes5ROIHeads,
    OHEMROIHeads,
    OHEMRPN,
    OHEMRetinaNet,
    OHEMSettings,
    SelectionInputs,
)

__all__ = [
    "add_ohem_config",
    "validate_ohem_config",
    "OHEMConfigError",
    "OHEMSettings",
    "OHEMMixin",
    "MiningResult",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
    "OHEMCascadeROIHeads",
    "OHEMRetinaNet",
    "OHEMRPN",
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
