"""What the miner did this iteration, written to Detectron2's EventStorage.

The scalars reach ``metrics.json`` and TensorBoard like any Detectron2 metric,
under ``ohem/``. They answer the questions a user of OHEM has: how many RoIs
compete, how many the NMS merged, how much of the mined batch is foreground,
how much harder the mined RoIs are than the average one, and how many mined
background RoIs Fast R-CNN's ``bg_lo`` (IoU >= 0.1) would never have shown.

They are computed on one iteration in :data:`LOG_PERIOD` only: the event writers keep the latest
value of a scalar between their writes, and every step the statistics cost ~80 ops and a
device-to-host copy, 5% of an FPN step's ops (``tools/benchmark.py --suite ops``).
"""
import torch

from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

BG_LO = 0.1  # Fast R-CNN's lower IoU bound for background RoIs
# Iterations between two records: the period of Detectron2's default writers (PeriodicWriter,
# engine.hooks), so that each of their writes has a record at most LOG_PERIOD - 1 iterations old.
LOG_PERIOD = 20


def records_this_iteration():
    """Whether the current EventStorage iteration is one the statistics are recorded on (0, 20, ...)."""
    return get_event_storage().iter % LOG_PERIOD == 0


def max_iou_with_gt(proposals):
    """(R,) IoU of each labelled proposal with the GT box it was matched to (0 without GT)."""
    ious = []
    for p in proposals:
        if p.has("gt_boxes"):
            ious.append(matched_pairwise_iou(p.proposal_boxes, p.gt_boxes))
        else:
            ious.append(p.proposal_boxes.tensor.new_zeros(len(p)))
    return torch.cat(ious)


def mining_stats(hardness, is_fg, iou_with_gt, selected, num_images, num_after_nms):
    """The ``ohem/*`` scalars: counts known on the host as floats, the rest as 0-dim device
    tensors, so that nothing waits for the device before :func:`record_mining_stats`."""
    num_rois, num_mined = len(hardness), len(selected)
    sel_fg = is_fg[selected].float()
    sel_bg = 1.0 - sel_fg
    below_bg_lo = (iou_with_gt[selected] < BG_LO).float() * sel_bg
    return {
        "ohem/candidates_per_image": num_rois / num_images,
        "ohem/nms_removed_per_image": (num_rois - num_after_nms) / num_images,
        "ohem/mined_per_image": num_mined / num_images,
        "ohem/fg_fraction_mined": sel_fg.sum() / max(num_mined, 1),
        "ohem/fg_fraction_all": is_fg.float().sum() / max(num_rois, 1),
        "ohem/loss_mined_mean": hardness[selected].sum() / max(num_mined, 1),
        "ohem/loss_all_mean": hardness.sum() / max(num_rois, 1),
        "ohem/bg_below_bg_lo_share": below_bg_lo.sum() / sel_bg.sum().clamp(min=1.0),
    }


def record_mining_stats(stats):
    """Put the scalars into the current EventStorage with a single device-to-host copy."""
    on_device = [k for k, v in stats.items() if torch.is_tensor(v)]
    values = dict(zip(on_device, torch.stack([stats[k].float() for k in on_device]).tolist()))
    get_event_storage().put_scalars(**{k: values.get(k, v) for k, v in stats.items()})
