# Detectron2's new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py (from scratch, large-scale jitter,
# SyncBN, 100 epochs) with OHEM in the RoI heads. Its box head has synchronised batch norms: OHEM's
# read-only pass scores RoIs with their running statistics and never communicates, so ranks with
# different numbers of RoIs do not wait on each other.
# Train: python tools/lazyconfig_train_net.py --config-file THIS_FILE --num-gpus 8
from detectron2 import model_zoo

from ohem_d2.arms import apply_arm_to_lazy_model

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, lr_multiplier, optimizer, train = _base.dataloader, _base.lr_multiplier, _base.optimizer, _base.train
model = apply_arm_to_lazy_model(_base.model, "ohem")
