"""Detectron2's ``ROIPooler`` output without its host syncs, for the read-only pass.

``ROIPooler.forward`` makes the host wait for the device once per call to build the batch index
of each box (``repeat_interleave`` without an output size) and, with several FPN levels, once per
level (``nonzero`` of the boxes assigned to it). The read-only pass pools every candidate, chunk by
chunk, so those waits add up. :func:`pool` gives the same tensor, bit for bit (tests/test_pooling.py):

* the batch index comes from the box counts the host already knows;
* every level pools every box, the boxes of other levels emptied (zero width and height: with
  the adaptive sampling ratio no point is sampled), and ``torch.where`` keeps each box's output
  from its own level. RoIAlign pools each box alone, so its output does not depend on the other
  boxes of the call.
"""
import torch

from detectron2.modeling.poolers import assign_boxes_to_levels


def pool(pooler, features, box_lists):
    """``pooler(features, box_lists)`` (a Detectron2 ``ROIPooler`` over axis-aligned ``Boxes``)."""
    boxes = torch.cat([b.tensor for b in box_lists])
    batch_index = torch.cat(
        [torch.full((len(b), 1), i, dtype=boxes.dtype, device=boxes.device) for i, b in enumerate(box_lists)]
    )
    rois = torch.cat([batch_index, boxes], dim=1)  # Detectron2's pooler format (index, x1, y1, x2, y2)
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](features[0], rois)
    levels = assign_boxes_to_levels(
        box_lists, pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    empty = torch.cat([rois[:, :3], rois[:, 1:3]], dim=1)  # (index, x1, y1, x1, y1)
    output = None
    for level, level_pooler in enumerate(pooler.level_poolers):
        here = (levels == level)[:, None]
        pooled = level_pooler(features[level], torch.where(here, rois, empty))
        output = pooled if output is None else torch.where(here[:, :, None, None], pooled, output)
    return output
