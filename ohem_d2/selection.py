"""Which RoIs are hard: the selection step of OHEM (Shrivastava et al., 2016, Sec. 4.1).

The paper, in three steps, on the RoIs of a mini-batch of N images:

1. every RoI gets a hardness, its loss under the current network (computed by
   :mod:`ohem_d2.roi_loss` in a read-only pass);
2. "co-located RoIs with high overlap are likely to have correlated losses",
   so a non-maximum suppression with the loss as score, IoU 0.7, removes
   near-duplicates (:func:`deduplicate`); it works on each image's RoIs apart;
3. the B/N hardest remaining RoIs of each image are kept (:func:`select_per_image`).

All inputs are flat over the batch (one row per RoI, ``image_ids`` saying whose)
and everything stays on the device: no Python loop over images, no host sync.
"""
import torch
from torchvision.ops import batched_nms


def deduplicate(boxes, hardness, image_ids, nms_thresh):
    """Indices of the RoIs that survive the per-image NMS, hardest first.

    ``nms_thresh >= 1`` turns the NMS off: every RoI survives, sorted by hardness.
    """
    if nms_thresh >= 1.0:
        return torch.argsort(hardness, descending=True, stable=True)
    return batched_nms(boxes.float(), hardness.float(), image_ids, nms_thresh)


def group_by_image(order, image_ids, num_images):
    """Regroup ``order`` (RoI indices, hardest first) image by image, keeping the hardness order
    inside each image. Returns the regrouped indices and each one's rank inside its image
    (0 = hardest)."""
    order_image_ids, perm = torch.sort(image_ids[order], stable=True)
    counts = torch.bincount(order_image_ids, minlength=num_images)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - first[order_image_ids]
    return order[perm], rank


def select_per_image(hardness, boxes, image_ids, num_images, batch_size_per_image, nms_thresh):
    """The paper's selection: the ``batch_size_per_image`` hardest RoIs of each image after NMS.

    Args:
        hardness: (R,) loss of each RoI; higher is harder.
        boxes: (R, 4) RoI boxes (XYXY), used by the NMS.
        image_ids: (R,) int64, the image each RoI belongs to, in [0, num_images).
        num_images: N, the number of images in the batch.
        batch_size_per_image: B/N, RoIs kept per image (fewer where fewer survive the NMS).
        nms_thresh: IoU of the NMS (1.0: no NMS).

    Returns:
        (indices, num_after_nms): the kept RoIs, grouped by image (ascending image id), hardest
        first within each image; and the number of RoIs that survived the NMS.
    """
    order = deduplicate(boxes, hardness, image_ids, nms_thresh)
    grouped, rank = group_by_image(order, image_ids, num_images)
    return grouped[rank < batch_size_per_image], len(order)
