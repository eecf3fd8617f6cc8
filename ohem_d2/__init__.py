"""Online Hard Example Mining (Shrivastava, Gupta, Girshick, CVPR 2016) for Detectron2.

``import ohem_d2`` registers the OHEM ROI heads; ``add_ohem_config(cfg)`` adds ``MODEL.OHEM``.
"""
from .config import OHEMConfigError, OHEMSettings, add_ohem_config, validate_ohem_config
from .roi_heads import OHEMMixin, OHEMRes5ROIHeads, OHEMROIHeads

__all__ = [
    "add_ohem_config",
    "validate_ohem_config",
    "OHEMConfigError",
    "OHEMSettings",
    "OHEMMixin",
    "OHEMROIHeads",
    "OHEMRes5ROIHeads",
]
