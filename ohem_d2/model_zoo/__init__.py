"""ohem_d2's configs, found from the installed package as Detectron2's model_zoo finds its own.

``pip install .`` (not editable) leaves no ``configs/`` folder beside the user's code: the configs
ship inside the package (``ohem_d2/model_zoo/configs``, a link to the repository's ``configs/`` in
a checkout, copied into a built wheel), and these functions find them by the same relative paths
the docs use under ``configs/``.

    from ohem_d2 import model_zoo
    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml")   # yacs, MODEL.OHEM added
    lazy = model_zoo.get_config("common/models/mask_rcnn_fpn_ohem.py")              # LazyConfig
"""
import os

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def get_config_file(config_path):
    """The absolute path of ``config_path`` (relative to ``configs/``), or FileNotFoundError
    listing the close names."""
    path = os.path.join(CONFIGS, config_path)
    if not os.path.isfile(path):
        import difflib

        known = [os.path.relpath(os.path.join(d, f), CONFIGS) for d, _, files in os.walk(CONFIGS)
                 for f in files if f.endswith((".yaml", ".py"))]
        close = difflib.get_close_matches(config_path, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(known)} configs are in {CONFIGS}"
        raise FileNotFoundError(f"ohem_d2 has no config {config_path!r}{hint}")
    return path


def get_config(config_path):
    """The config at ``config_path``: a yacs CfgNode with ``MODEL.OHEM`` added for a ``.yaml``,
    a LazyConfig (omegaconf DictConfig) for a ``.py``."""
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from detectron2.config import get_cfg

    from ..config import add_ohem_config

    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(path)
    return cfg
