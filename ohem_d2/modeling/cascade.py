"""OHEM in every stage of Cascade R-CNN (Cai & Vasconcelos, 2018).

Stock :class:`CascadeROIHeads` samples 512 RoIs per image once, at stage 0 (IoU 0.5, 25%
foreground); each later stage relabels the boxes the previous stage predicted from those RoIs at
its own IoU (0.6, 0.7) and trains on all of them. :class:`OHEMCascadeROIHeads` mines in every
stage instead:

* stage 0 labels every proposal (GT boxes appended, nothing sampled away, no ``bg_lo``), as
  :class:`ohem_d2.OHEMROIHeads` does;
* each stage k runs a read-only pass of its own box head and predictor on *all* its RoIs, ranks
  them by hardness (``MODEL.OHEM.HARDNESS``), selects B/N per image (``MODEL.OHEM.SELECTION``,
  after the NMS), and trains its head on the mined RoIs only (the trainable pass is stock
  ``_run_stage``, gradient scaling included; losses ``loss_cls_stage{k}``, ``loss_box_reg_stage{k}``);
* stage k+1's RoIs are the boxes stage k predicts for *all* of its RoIs (from the read-only pass,
  which computes them anyway), relabelled at stage k+1's IoU: every stage labels and ranks all
  candidates. (Stock Detectron2 refines the RoIs stage 0 trained on, its sample; mmdetection
  samples anew per stage, from the refined boxes of the previous stage's sample.) Refining only
  the mined RoIs would let stage 0's hardness decide what the later stages may see, and stage 0's
  hardest RoIs are mostly background, the opposite of what the high-IoU stages are for. (With
  batch norm in the box heads, the read-only pass, hence these refined boxes, uses the norm
  layers' running statistics; the shipped configs have no norm there);
* the mask (and keypoint) head trains on the foreground among the *last* stage's mined RoIs: the
  best-localised boxes, closest to the boxes it sees at test time. Stock Detectron2 trains it on
  the stage-0 sample instead (its later-stage RoIs carry no ``gt_masks``); here the last stage's
  mined RoIs get the mask and keypoint targets of their matched GT, gathered for them alone.

``MODEL.OHEM.MODE: loss_zeroing`` runs each stage's trainable pass on all RoIs and zeroes the
losses of those not mined. Mining statistics go to the EventStorage as ``stage{k}/ohem/*``.

At inference the head is stock :class:`CascadeROIHeads`: same parameters (checkpoints load both
ways), same outputs.

:class:`FastRCNNHeuristicsCascadeROIHeads` is the "Fast R-CNN heuristics" arm of the comparison:
stock cascade, except that stage 0 labels proposals by ``MODEL.ROI_HEADS.IOU_THRESHOLDS`` /
``IOU_LABELS``, so that Fast R-CNN's ``bg_lo`` (IoU < 0.1 ignored) applies; stock
``CascadeROIHeads`` builds its stage-0 matcher from the cascade IoUs and cannot express it.
"""
import torch

from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import get_event_storage

from .roi_heads import OHEMMixin


class Stage0MatcherFromROIHeadsMixin:
    """Stage 0 of a cascade labels proposals with ``MODEL.ROI_HEADS.IOU_THRESHOLDS`` and
    ``IOU_LABELS`` (the highest threshold must be the first cascade IoU), so that a ``-1`` label
    (ignored proposals, e.g. Fast R-CNN's ``bg_lo``) is possible. With the defaults ([0.5], [0, 1])
    this is stock Detectron2's stage-0 matcher."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        thresholds = list(cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS)
        first_iou = cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS[0]
        if thresholds[-1] != first_iou:
            raise ValueError(
                f"MODEL.ROI_HEADS.IOU_THRESHOLDS = {thresholds} is invalid: expected its highest "
                f"(last) threshold to be the first cascade IoU, MODEL.ROI_BOX_CASCADE_HEAD.IOUS[0] = {first_iou}."
            )
        stock_cfg = cfg.clone()
        stock_cfg.defrost()
        stock_cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS = [first_iou]  # what the stock assertion expects
        ret = super()._init_box_head(stock_cfg, input_shape)
        ret["proposal_matchers"][0] = Matcher(
            thresholds, list(cfg.MODEL.ROI_HEADS.IOU_LABELS), allow_low_quality_matches=False
        )
        return ret


@ROI_HEADS_REGISTRY.register()
class FastRCNNHeuristicsCascadeROIHeads(Stage0MatcherFromROIHeadsMixin, CascadeROIHeads):
    """Stock :class:`CascadeROIHeads` whose stage-0 sampler may ignore proposals (``bg_lo``)."""


@ROI_HEADS_REGISTRY.register()
class OHEMCascadeROIHeads(OHEMMixin, Stage0MatcherFromROIHeadsMixin, CascadeROIHeads):
    """:class:`CascadeROIHeads` (box, mask and keypoint heads) trained with OHEM in every stage."""

    def _box_predictions(self, features, proposals, stage):
        # Stock _run_stage: in training it also scales the gradient reaching the features.
        return self._run_stage(features, proposals, stage)

    def forward(self, images, features, proposals, targets=None):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses, mined = self._forward_box_ohem(features, proposals, targets)
        # The mask and keypoint heads train on the foreground among the last stage's mined RoIs.
        mined = self._with_targets(mined, targets)
        losses.update(self._forward_mask(features, mined))
        losses.update(self._forward_keypoint(features, mined))
        return mined, losses

    def _forward_box_ohem(self, features, proposals, targets):
        """Mine and train every stage; returns (losses, the last stage's mined proposals)."""
        features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        storage = get_event_storage()
        losses, refined = {}, None
        for k in range(self.num_cascade_stages):
            if k > 0:
                # Every box the previous stage predicted, relabelled at this stage's IoU.
                proposals = self._create_proposals_from_boxes(refined, image_sizes)
                proposals = self._match_and_label_boxes(proposals, k, targets)
            predictor = self.box_predictor[k]
            with storage.name_scope(f"stage{k}"):
                if self.ohem.mode == "two_pass":
                    predictions, _, _, mined = self.mine(features, proposals, k)
                    stage_losses = predictor.losses(self._run_stage(features, mined, k), mined)
                else:
                    predictions, mined, stage_losses = self._loss_zeroing(features, proposals, k)
            losses.update({f"{name}_stage{k}": value for name, value in stage_losses.items()})
            if k + 1 < self.num_cascade_stages:
                refined = predictor.predict_boxes(predictions, proposals)
        return losses, mined

    @torch.no_grad()
    def _match_and_label_boxes(self, proposals, stage, targets):
        """Label ``proposals`` (all of them; nothing is sampled) at stage ``stage``'s IoU.

        As stock, plus ``gt_index``, the matched GT of each proposal, from which
        :meth:`_with_targets` gathers the mask and keypoint targets of the last stage's mined RoIs.
        Images without GT get background labels and placeholder ``gt_boxes``, as stock.
        """
        num_fg, num_all = [], []
        for p, t in zip(proposals, targets):
            matched_idxs, labels = self.proposal_matchers[stage](pairwise_iou(t.gt_boxes, p.proposal_boxes))
            if len(t) > 0:
                gt_classes = t.gt_classes[matched_idxs]
                gt_classes[labels == 0] = self.num_classes
                p.gt_classes = gt_classes
                p.gt_boxes = t.gt_boxes[matched_idxs]
                p.gt_index = matched_idxs
            else:
                p.gt_classes = torch.full_like(matched_idxs, self.num_classes)
                p.gt_boxes = Boxes(t.gt_boxes.tensor.new_zeros((len(p), 4)))
            num_fg.append((labels == 1).sum())
            num_all.append(labels.numel())
        # The stock scalars (candidates here, not samples), with one device-to-host copy.
        fg = torch.stack(num_fg).float().mean().item()
        get_event_storage().put_scalars(**{
            f"stage{stage}/roi_head/num_fg_samples": fg,
            f"stage{stage}/roi_head/num_bg_samples": sum(num_all) / len(num_all) - fg,
        })
        return proposals
