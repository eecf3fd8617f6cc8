# Detectron2's common/models/mask_rcnn_fpn.py (LazyConfig) with Fast R-CNN's sampler heuristics:
# background RoIs only from IoU [0.1, 0.5) (bg_lo 0.1), 25% foreground. The baseline of the
# OHEM paper, for comparison with mask_rcnn_fpn_ohem.py.
from detectron2 import model_zoo

from ohem_d2.arms import apply_arm_to_lazy_model

model = apply_arm_to_lazy_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, "fast_rcnn_heuristics")
