# Detectron2's common/models/mask_rcnn_fpn.py (LazyConfig) with OHEM in the RoI heads and in the RPN,
# as COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem_rpn.yaml: the RPN trains on the 256 hardest anchors
# per image by its own loss after NMS 0.7 among them (no 50% foreground), the RoI heads on the 512
# hardest RoIs. Both read one OHEMSettings (model.roi_heads.ohem, shared by
# model.proposal_generator.ohem): change the mining with model.roi_heads.ohem.<field>=<value>.
from detectron2 import model_zoo

from ohem_d2.arms import apply_arm_to_lazy_model

model = apply_arm_to_lazy_model(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, "ohem_rpn")
