# Detectron2's common/models/retinanet.py (LazyConfig) trained on hard anchors, as
# configs/Base-OHEM-RetinaNet.yaml: ohem_d2.OHEMRetinaNet with plain sigmoid cross-entropy (the
# focal loss at gamma 0, alpha -1) on the 256 hardest anchors per image after NMS 0.7 on loss.
# Change the mining with model.ohem.<field>=<value> (ohem_d2.OHEMSettings, the MODEL.OHEM keys in
# lower case), e.g. model.ohem.anchor_selection=hard_negative_ratio for SSD's.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from ohem_d2 import OHEMRetinaNet, OHEMSettings

model = model_zoo.get_config("common/models/retinanet.py").model
model._target_ = OHEMRetinaNet
model.focal_loss_gamma = 0.0
model.focal_loss_alpha = -1.0
model.ohem = L(OHEMSettings)(anchor_selection="per_image")
