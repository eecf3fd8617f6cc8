"""``add_ohem_config``: the ``MODEL.OHEM`` keys of a yacs config, as Detectron2's projects add theirs.

The keys are the fields of :class:`ohem_d2.modeling.settings.OHEMSettings` in upper case, with
its defaults; the settings object validates them (one definition for yacs and LazyConfig).
"""
from dataclasses import fields

from detectron2.config import CfgNode as CN

from .modeling.settings import OHEMConfigError, OHEMSettings, check_box_predictor_for_ohem

__all__ = ["add_ohem_config", "validate_ohem_config", "OHEMSettings", "OHEMConfigError"]


def add_ohem_config(cfg):
    """Add the ``MODEL.OHEM`` node to ``cfg`` (call before ``merge_from_file``), with the defaults
    and meanings of :class:`OHEMSettings`' fields."""
    cfg.MODEL.OHEM = CN({f.name.upper(): f.default for f in fields(OHEMSettings)})


def validate_ohem_config(cfg):
    """Raise :class:`OHEMConfigError` naming the first bad ``MODEL.OHEM`` (or related) value."""
    OHEMSettings.from_config(cfg)
    check_box_predictor_for_ohem(cfg.MODEL.ROI_BOX_HEAD.get("USE_FED_LOSS", False))
