"""A peer of OHEM: Libra R-CNN's IoU-balanced negative sampling (Pang et al., CVPR 2019).

Random sampling draws background RoIs in proportion to how many there are at each IoU with the
ground truth, and most have IoU near 0: easy. Libra R-CNN samples the negatives evenly across IoU
bins instead, which raises the share of the harder, higher-IoU background without ranking
anything by loss (no read-only pass: the cost is the stock sampler's).

The rule, as mmdetection's ``IoUBalancedNegSampler`` applies it in Libra R-CNN's configs
(``floor_thr=-1, floor_fraction=0, num_bins=3``), on Detectron2's budget (``BATCH_SIZE_PER_IMAGE``,
``POSITIVE_FRACTION``) and labels:

* positives: Detectron2's own sampler (random, at most ``POSITIVE_FRACTION`` of the budget); Libra
  R-CNN balances them over GT instances (``InstanceBalancedPosSampler``), not done here;
* negatives: as many as Detectron2's sampler would take (the rest of the budget, or all of them
  where fewer). If there are more, the IoU range [0, u) is cut into 3 equal bins, u being the
  highest IoU of any proposal of the image with a GT box (1.0 where GT boxes are appended to the
  proposals, as by default); each bin gives floor(n / 3) of its negatives at random (all of them
  where it has fewer), and the rest of the n is drawn at random from the negatives not taken yet.

With u = 1.0 the bins are [0, 1/3), [1/3, 2/3) and [2/3, 1): negatives (IoU < 0.5) fill the first
two only, [1/3, 0.5) being the hard one, and the third bin's share goes to the random fill. That
is mmdetection's code; the paper's text ("evenly split the sampling interval into K bins") leaves
the interval open.

:class:`IoUBalancedROIHeads` (FPN) and :class:`IoUBalancedRes5ROIHeads` (C4) are the stock heads
with this sampler: ``MODEL.ROI_HEADS.NAME: "IoUBalancedROIHeads"``. At inference they are stock.
"""
import torch

from detectron2.config import configurable
from detectron2.layers import nonzero_tuple
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, StandardROIHeads
from detectron2.modeling.sampling import subsample_labels

from ..modeling.selection import rank_in_group

NUM_IOU_BINS = 3  # Libra R-CNN's


class IoURecordingMatcher(Matcher):
    """Detectron2's :class:`Matcher` that keeps, from its latest call, each prediction's highest IoU
    with a GT box (``latest_ious``; 0 where the image has none).

    Detectron2's labelling calls the matcher, then ``_sample_proposals``, image by image, and hands
    the latter the matches but not their IoUs, which IoU-balanced sampling needs.
    """

    @classmethod
    def like(cls, matcher):
        """An IoURecordingMatcher with ``matcher``'s thresholds, labels and low-quality matching."""
        return cls(matcher.thresholds[1:-1], matcher.labels, matcher.allow_low_quality_matches)

    def __call__(self, match_quality_matrix):
        num_gt, num_predictions = match_quality_matrix.shape
        if num_gt == 0:
            self.latest_ious = match_quality_matrix.new_zeros(num_predictions)
        else:
            self.latest_ious = match_quality_matrix.max(dim=0).values
        return super().__call__(match_quality_matrix)


def iou_balanced_negatives(negatives, ious, num, num_bins=NUM_IOU_BINS):
    """``num`` of ``negatives`` (indices into ``ious``, the IoU of every proposal of the image),
    IoU-balanced as in the module docstring; all of them where there are no more than ``num``."""
    if len(negatives) <= num:
        return negatives
    edges = ious.max() * torch.arange(num_bins + 1, device=ious.device) / num_bins
    # Bin k holds IoUs in [edges[k], edges[k + 1]); num_bins marks an IoU in none (>= the highest).
    bins = torch.bucketize(ious[negatives], edges, right=True) - 1
    shuffled = torch.randperm(len(negatives), device=negatives.device)
    bins = bins[shuffled]
    in_bin_quota = (bins < num_bins) & (rank_in_group(bins, num_bins + 1) < num // num_bins)
    rest = ~in_bin_quota
    fill = rest & (torch.cumsum(rest.long(), 0) <= num - in_bin_quota.sum())
    return negatives[shuffled[in_bin_quota | fill]]


class IoUBalancedSamplingMixin:
    """A Detectron2 ROI head whose sampler draws the negatives IoU-balanced (module docstring)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proposal_matcher = IoURecordingMatcher.like(self.proposal_matcher)

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """Detectron2's labels and positives; the negatives redrawn IoU-balanced."""
        if gt_classes.numel() > 0:
            labels = gt_classes[matched_idxs]
            labels[matched_labels == 0] = self.num_classes
            labels[matched_labels == -1] = -1
        else:
            labels = torch.full_like(matched_idxs, self.num_classes)
        # Detectron2's sampler gives the positives, and how many negatives: min(#negatives, budget
        # - #positives); its random negatives are replaced.
        positives, stock_negatives = subsample_labels(
            labels, self.batch_size_per_image, self.positive_fraction, self.num_classes
        )
        candidates = nonzero_tuple(labels == self.num_classes)[0]
        negatives = iou_balanced_negatives(candidates, self.proposal_matcher.latest_ious, len(stock_negatives))
        sampled = torch.cat([positives, negatives])
        return sampled, labels[sampled]


@ROI_HEADS_REGISTRY.register()
class IoUBalancedROIHeads(IoUBalancedSamplingMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (FPN) with Libra R-CNN's IoU-balanced negative sampling."""


@ROI_HEADS_REGISTRY.register()
class IoUBalancedRes5ROIHeads(IoUBalancedSamplingMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (C4) with Libra R-CNN's IoU-balanced negative sampling."""
