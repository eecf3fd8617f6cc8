# SSD's hard negative mining on RetinaNet (LazyConfig), as
# configs/COCO-Detection/retinanet_R_50_FPN_1x_ssd_mining.yaml: every positive anchor and the
# hardest negatives, 3 per positive, no NMS; plain sigmoid cross-entropy.
from detectron2.config import LazyConfig

model = LazyConfig.load_rel("retinanet_ohem.py").model
model.ohem.anchor_selection = "hard_negative_ratio"
model.ohem.neg_pos_ratio = 3.0
