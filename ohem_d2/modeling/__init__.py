"""The paper's method: OHEM RoI heads and what they are made of.

``roi_heads`` (FPN and C4 heads, the one-method head contract), ``cascade`` (the cascade head),
``settings`` (``OHEMSettings``, validating itself for yacs and LazyConfig), ``selection`` and
``hardness`` (registries of pure functions over flat device tensors), ``roi_loss`` (per-RoI losses
by the box predictor's own loss definitions), ``diagnostics`` (what the miner did, per step), and
the anchor-level miners: ``retinanet`` (``OHEMRetinaNet``), ``rpn`` (``OHEMRPN``) and
``anchor_mining`` (per-anchor losses, the bounded candidate set, the mined labels).
Nothing here imports dataset or experiment code.
"""
from .cascade import FastRCNNHeuristicsCascadeROIHeads, OHEMCascadeROIHeads
from .hardness import OHEM_HARDNESS_REGISTRY, HardnessInputs
from .retinanet import OHEMRetinaNet
from .roi_heads import MiningResult, OHEMMixin, OHEMRes5ROIHeads, OHEMROIHeads
from .rpn import OHEMRPN
from .selection import OHEM_SELECTION_REGISTRY, SelectionInputs
from .settings import OHEMConfigError, OHEMSettings

__all__ = [
    "FastRCNNHeuristicsCascadeROIHeads",
    "HardnessInputs",
    "MiningResult",
    "OHEM_HARDNESS_REGISTRY",
    "OHEM_SELECTION_REGISTRY",
    "OHEMCascadeROIHeads",
    "OHEMConfigError",
    "OHEMMixin",
    "OHEMRes5ROIHeads",
    "OHEMROIHeads",
    "OHEMRPN",
    "OHEMRetinaNet",
    "OHEMSettings",
    "SelectionInputs",
]
