# Detectron2's common/models/mask_rcnn_fpn.py (LazyConfig) with OHEM in the RoI heads, as the
# YAML OHEM configs: every proposal labelled (IoU < 0.5 is background, no bg_lo, no fg:bg ratio),
# the 512 hardest per image by loss after NMS 0.7. Change the mining with
# model.roi_heads.ohem.<field>=<value> (ohem_d2.OHEMSettings, the MODEL.OHEM keys in lower case).
from detectron2 import model_zoo

from ohem_d2.arms import apply_arm_to_lazy_model

model = apply_arm_to_lazy_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, "ohem")
