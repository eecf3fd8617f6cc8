"""What the miner did this iteration, written to Detectron2's EventStorage.

The scalars reach ``metrics.json`` and TensorBoard like any Detectron2 metric,
under ``ohem/``. They answer the questions a user of OHEM has: how many RoIs
compete, how many the NMS merged, how much of the mined batch is foreground,
how much harder the mined RoIs are than the average one, and how many mined
background RoIs Fast R-CNN's ``bg_lo`` (IoU >= 0.1) would never have shown.
"""
import torch

from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

BG_LO = 0.1  # Fast R-CNN's lower IoU bound for background RoIs


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
    """The ``ohem/*`` scalars as one dict of 0-dim tensors (no host sync yet)."""
    num_rois = hardness.new_tensor(float(len(hardness)))
    sel_fg = is_fg[selected].float()
    sel_bg = 1.0 - sel_fg
    below_bg_lo = (iou_with_gt[selected] < BG_LO).float() * sel_bg
    num_sel = max(len(selected), 1)
    return {
        "ohem/candidates_per_image": num_rois / num_images,
        "ohem/nms_removed_per_image": (num_rois - num_after_nms) / num_images,
        "ohem/mined_per_image": hardness.new_tensor(len(selected) / num_images),
        "ohem/fg_fraction_mined": sel_fg.sum() / num_sel,
        "ohem/fg_fraction_all": is_fg.float().mean() if len(is_fg) else num_rois * 0,
        "ohem/loss_mined_mean": hardness[selected].sum() / num_sel,
        "ohem/loss_all_mean": hardness.mean() if len(hardness) else num_rois * 0,
        "ohem/bg_below_bg_lo_share": below_bg_lo.sum() / sel_bg.sum().clamp(min=1.0),
    }


def record_mining_stats(stats):
    """Put the scalars into the current EventStorage with a single device-to-host copy."""
    names = list(stats)
    values = torch.stack([stats[k].float() for k in names]).tolist()
    get_event_storage().put_scalars(**dict(zip(names, values)))
