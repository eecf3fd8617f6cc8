# Detectron2's new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py with Fast R-CNN's sampler heuristics
# (bg_lo 0.1, 25% foreground): the OHEM paper's baseline, beside mask_rcnn_R_50_FPN_100ep_LSJ_ohem.py.
from detectron2 import model_zoo

from ohem_d2.arms import apply_arm_to_lazy_model

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, lr_multiplier, optimizer, train = _base.dataloader, _base.lr_multiplier, _base.optimizer, _base.train
model = apply_arm_to_lazy_model(_base.model, "fast_rcnn_heuristics")
