"""ROI heads that train on hard examples mined online (OHEM).

``OHEMROIHeads`` (FPN and other StandardROIHeads models, box / mask / keypoint)
and ``OHEMRes5ROIHeads`` (C4) replace Detectron2's RoI sampler during training:

* every proposal is labelled (GT boxes appended as usual) and none is sampled
  away: no ``bg_lo``, no fg:bg ratio;
* ``two_pass`` mode: a read-only forward of the box head (no autograd graph,
  chunked over RoIs) gives each RoI its loss, or another hardness
  (:mod:`ohem_d2.modeling.hardness`, ``MODEL.OHEM.HARDNESS``); the selection strategy of
  :mod:`ohem_d2.modeling.selection` (``MODEL.OHEM.SELECTION``) keeps the hardest; the stock
  trainable forward and backward then run on those alone, so the backward pass
  costs what the baseline's does (a strategy may also weight the RoIs it keeps,
  as ``importance_sampling`` does: the trainable box losses are then weighted
  means of the per-RoI losses);
* ``loss_zeroing`` mode: one trainable forward on all RoIs whose losses outside
  the hard set are zeroed, the costly alternative the paper argues against.

The read-only pass leaves the training state alone: batch-norm layers run on their
running statistics (no update, no SyncBN collective), and under AMP it casts
weights without autocast's cache. Mask and keypoint targets are gathered for the
mined RoIs only, not for every candidate.

At inference both heads are exactly their stock parents: same parameters, same
outputs, checkpoints interchangeable.
"""
import contextlib
import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.nn.modules.batchnorm import _NormBase

from detectron2.config import configurable
from detectron2.layers import nonzero_tuple
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    Res5ROIHeads,
    StandardROIHeads,
    select_foreground_proposals,
)
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from detectron2.structures import Boxes, ImageList, Instances

from .diagnostics import max_iou_with_gt, mining_stats, record_mining_stats, records_this_iteration
from .hardness import OHEM_HARDNESS_REGISTRY, HardnessInputs
from .pooling import pool
from .roi_loss import per_roi_losses
from .selection import OHEM_SELECTION_REGISTRY, SelectionInputs, group_bounds
from .settings import OHEMConfigError, OHEMSettings, check_box_predictor_for_ohem

logger = logging.getLogger(__name__)


class MiningResult(NamedTuple):
    """What :meth:`OHEMMixin.mine` found in one batch."""

    predictions: Tuple[torch.Tensor, ...]  # the box predictor's read-only outputs for every candidate
    hardness: torch.Tensor  # (R,) fp32 hardness of every candidate, flat over the images
    selected: torch.Tensor  # flat indices of the mined candidates, grouped by image
    mined: List[Instances]  # the mined proposals, one Instances per image


class OHEMMixin:
    """Online hard example mining for a Detectron2 ROI head.

    The head class mixing this in provides one method, ``_box_predictions(features, proposals,
    stage)``: the box predictor's outputs of box stage ``stage`` for a list of feature maps and a
    list of proposals (one Instances per image; only ``proposal_boxes`` is read). Heads with a
    single box stage (FPN, C4) have only stage 0; a cascade has one per cascade stage, its box
    predictors in ``self.box_predictor[stage]``.
    """

    # Whether the head's two-pass trainable box losses come from :meth:`_box_losses`, which applies
    # the per-RoI weights a selection strategy may return (``loss_zeroing`` applies them in every
    # head). A head without it refuses such a strategy in two-pass mode rather than ignore its weights.
    applies_roi_weights = False

    @configurable
    def __init__(self, *, ohem: OHEMSettings = OHEMSettings(), **kwargs):
        """``ohem``: how to mine (the paper's way by default); every other argument is the parent
        head's."""
        super().__init__(**kwargs)
        self.ohem = ohem.resolved(self.batch_size_per_image)
        predictors = self.box_predictor if isinstance(self.box_predictor, torch.nn.ModuleList) else [self.box_predictor]
        for predictor in predictors:
            check_box_predictor_for_ohem(getattr(predictor, "use_fed_loss", False))
        logger.info(f"{type(self).__name__}: {self.ohem}")

    @classmethod
    def from_config(cls, cfg, input_shape):
        # Validated before the parent builds anything (a federated-loss predictor needs dataset
        # metadata to be built at all).
        ohem = OHEMSettings.from_config(cfg)
        check_box_predictor_for_ohem(cfg.MODEL.ROI_BOX_HEAD.get("USE_FED_LOSS", False))
        return {**super().from_config(cfg, input_shape), "ohem": ohem}

    def _box_predictor_at(self, stage):
        """The FastRCNNOutputLayers of box stage ``stage``."""
        if isinstance(self.box_predictor, torch.nn.ModuleList):
            return self.box_predictor[stage]
        return self.box_predictor

    # ------------------------------------------------------------------------------------------
    # Labelling: every proposal, with the targets the box losses need

    def label_and_sample_proposals(self, proposals, targets):
        """Detectron2's labelling of every proposal (see :meth:`_sample_proposals`), carrying only
        ``gt_boxes``, ``gt_classes`` and ``gt_index`` (the matched GT of each proposal).

        Detectron2 copies every ``gt_*`` field (masks, keypoints) to each sampled proposal; here
        every proposal is a candidate (1000-2000 per image), and bitmask targets for all of them
        would take gigabytes. :meth:`_with_targets` gathers those fields for the mined RoIs only.
        """
        return super().label_and_sample_proposals(proposals, [_box_targets(t) for t in targets])

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        """Label every proposal and keep all of them as candidates (the miner replaces the sampler).

        Same labels as Detectron2's sampler: the matched GT class, background (``num_classes``)
        below the IoU threshold, and ignored (-1) proposals dropped where the config asks for them.
        """
        if gt_classes.numel() > 0:
            gt_classes = gt_classes[matched_idxs]
            gt_classes[matched_labels == 0] = self.num_classes
            gt_classes[matched_labels == -1] = -1
        else:
            gt_classes = torch.full_like(matched_idxs, self.num_classes)
        if -1 not in self.proposal_matcher.labels:  # nothing ignored: no nonzero, no host sync
            return torch.arange(len(gt_classes), device=gt_classes.device), gt_classes
        keep = nonzero_tuple(gt_classes != -1)[0]
        return keep, gt_classes[keep]

    @staticmethod
    def _with_targets(proposals, targets):
        """``proposals`` (labelled by this head) with every other ``gt_*`` field of ``targets``
        (``gt_masks``, ``gt_keypoints``, ...) gathered for them by their ``gt_index``."""
        for p, t in zip(proposals, targets):
            if len(t) == 0:  # no GT: as stock, the proposals carry no other gt_* field
                continue
            for name, value in t.get_fields().items():
                if name.startswith("gt_") and not p.has(name):
                    p.set(name, value[p.gt_index])
        return proposals

    # ------------------------------------------------------------------------------------------
    # The read-only pass

    def _readonly_predictions(self, features, proposals, stage):
        """Box-predictor outputs for every RoI, in chunks of ``READONLY_CHUNK_SIZE`` RoIs of one image.

        Chunks stay inside an image: a chunk spanning images would feed the box head's matrix
        products other row counts, and a RoI's outputs would change in the last bits (the ranking
        would no longer be the one the tests freeze). The pooling has no host sync
        (:mod:`ohem_d2.modeling.pooling`), so a chunk costs its launches only.
        """
        chunk = self.ohem.readonly_chunk_size
        if chunk == 0:
            return self._box_predictions(features, proposals, stage)
        parts = []
        for i, p in enumerate(proposals):
            image_features = [f[i : i + 1] for f in features]
            for start in range(0, len(p), chunk):
                if self.ohem.readonly_channels_last:  # one shape: the last chunk padded with its last RoI
                    rows = torch.arange(start, start + chunk, device=p.proposal_boxes.device).clamp(max=len(p) - 1)
                    outputs = self._box_predictions(image_features, [p[rows]], stage)
                    parts.append(tuple(x[: min(chunk, len(p) - start)] for x in outputs))
                else:
                    parts.append(self._box_predictions(image_features, [p[start : start + chunk]], stage))
        if not parts:  # no RoI in the whole batch: the predictor's empty outputs
            return self._box_predictions(features, proposals, stage)
        return tuple(torch.cat(outputs) for outputs in zip(*parts))

    def _readonly_precision(self, device_type):
        """The autocast of the read-only pass: AMP's own dtype under AMP, else the opt-in
        ``READONLY_DTYPE``; in both cases with autocast's weight-cast cache disabled.

        Under AMP the whole training forward is one autocast region, and autocast caches the
        low-precision copy of each weight it casts for reuse later in the region. A copy cast
        here, under ``no_grad``, has no autograd history; torch <= 2.10 (pytorch issues 112583,
        142234, 158232) reuses it in the trainable pass, whose head then gets no gradient. With
        the cache off nothing cast here is kept: each chunk casts the head's weights again.
        """
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        elif self.ohem.readonly_dtype != "float32":
            dtype = getattr(torch, self.ohem.readonly_dtype)
        else:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype, cache_enabled=False)

    @contextlib.contextmanager
    def _norm_layers_frozen(self):
        """Batch-norm layers of this head in eval mode (running statistics) for the read-only pass.

        In training mode each chunk would update the running statistics from candidate RoIs that
        are mostly easy background, several times per step, and SyncBN would issue one
        collective per chunk: chunk counts differ between ranks, so multi-GPU runs would hang.
        In eval mode a norm layer neither updates nor communicates, and a RoI's hardness does not
        depend on the chunk it is in.
        """
        switched = [m for m in self.modules() if isinstance(m, _NormBase) and m.training]
        for m in switched:
            m.train(False)
        try:
            yield
        finally:
            for m in switched:
                m.train(True)

    def _hardness(self, box_predictor, predictions, proposals, cls_loss, box_loss):
        """(R,) fp32 hardness of every RoI by the registered ``MODEL.OHEM.HARDNESS`` function,
        computed without autograd or autocast."""
        device_type = cls_loss.device.type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            inputs = HardnessInputs(
                box_predictor=box_predictor,
                predictions=tuple(x.detach() for x in predictions),
                proposals=proposals,
                gt_classes=torch.cat([p.gt_classes for p in proposals]),
                cls_loss=cls_loss.detach(),
                box_loss=box_loss.detach(),
                loss=self.ohem.loss,
            )
            return OHEM_HARDNESS_REGISTRY.get(self.ohem.hardness)(inputs).float()

    def _readonly_pass(self, features, proposals, stage):
        """Read-only pass of box stage ``stage`` over every RoI: (predictor outputs, hardness (R,))."""
        box_predictor = self._box_predictor_at(stage)
        device_type = proposals[0].proposal_boxes.device.type
        with torch.no_grad(), self._norm_layers_frozen(), self._readonly_precision(device_type):
            predictions = self._readonly_predictions(features, proposals, stage)
            losses = per_roi_losses(box_predictor, predictions, proposals)
        return predictions, self._hardness(box_predictor, predictions, proposals, *losses)

    # ------------------------------------------------------------------------------------------
    # Mining

    def mine(self, features, proposals, stage=0):
        """OHEM's mining step on its own: the read-only pass of box stage ``stage`` over every
        candidate RoI and the selection of the hard ones (``MODEL.OHEM.SELECTION``).

        ``features``: the box head's input feature maps (a list, in ``box_in_features`` order for
        FPN, ``[res4]`` for C4); ``proposals``: one Instances per image, labelled by
        :meth:`label_and_sample_proposals` (every proposal a candidate). The training forward of
        ``two_pass`` calls this; the visualiser and the tests call it to see what is mined.
        Returns a :class:`MiningResult`.
        """
        predictions, hardness = self._readonly_pass(features, proposals, stage)
        selected, mined = self.select(hardness, proposals)
        return MiningResult(predictions, hardness, selected, mined)

    def select(self, hardness, proposals):
        """Select the hard RoIs by ``hardness`` (R,) with the registered ``MODEL.OHEM.SELECTION``
        strategy; returns (flat indices grouped by image, mined proposals). Both modes select
        here: two_pass through :meth:`mine`, loss_zeroing from its trainable pass.

        Host syncs: the strategy's NMS and boolean selections (data-dependent sizes), the
        per-image bounds below, and the diagnostics' one device-to-host copy (on the iterations
        they are recorded on, :func:`~ohem_d2.modeling.diagnostics.records_this_iteration`).
        """
        num_images = len(proposals)
        lengths = [len(p) for p in proposals]
        # Built from host-known sizes: uploading them would wait for the device.
        image_ids = torch.cat(
            [torch.full((n,), i, dtype=torch.int64, device=hardness.device) for i, n in enumerate(lengths)]
        )
        boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        is_fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        inputs = SelectionInputs(
            hardness=hardness,
            boxes=boxes,
            image_ids=image_ids,
            is_fg=is_fg,
            num_images=num_images,
            batch_size_per_image=self.ohem.batch_size_per_image,
            nms_thresh=self.ohem.nms_thresh,
            fg_fraction=self.ohem.fg_fraction,
            neg_pos_ratio=self.ohem.neg_pos_ratio,
            min_fg_fraction=self.ohem.min_fg_fraction,
            sampling_temperature=self.ohem.sampling_temperature,
        )
        selected, num_after_nms, *weights = OHEM_SELECTION_REGISTRY.get(self.ohem.selection)(inputs)
        weights = weights[0] if weights else None
        if weights is not None and self.ohem.mode == "two_pass" and not self.applies_roi_weights:
            raise OHEMConfigError(
                f"MODEL.OHEM.SELECTION = {self.ohem.selection!r} is invalid: expected a strategy without "
                f"RoI weights for {type(self).__name__} in MODE 'two_pass', whose trainable pass does not "
                "apply them (MODE 'loss_zeroing' does)."
            )
        # Group by image, keeping the strategy's order inside each (a no-op for the built-ins).
        by_image = torch.sort(image_ids[selected], stable=True)[1]
        selected = selected[by_image]
        bounds = group_bounds(image_ids[selected], num_images).tolist()  # host sync: the split sizes
        per_image = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        starts = [sum(lengths[:i]) for i in range(num_images)]
        mined = [
            p[idx - start] for p, idx, start in zip(proposals, selected.split(per_image), starts)
        ]
        if weights is not None:  # carried by the mined RoIs to the trainable losses, as ohem_weight
            for p, w in zip(mined, weights[by_image].float().split(per_image)):
                p.ohem_weight = w
        if self.ohem.log_diagnostics and records_this_iteration():
            record_mining_stats(
                mining_stats(hardness, is_fg, max_iou_with_gt(proposals), selected, num_images, num_after_nms)
            )
        return selected, mined

    def _loss_zeroing(self, features, proposals, stage=0):
        """``loss_zeroing``: one trainable pass of box stage ``stage`` on all RoIs; the losses of
        the RoIs not mined are zeroed. Returns (predictions of every RoI, mined proposals, losses).

        Normalised by the number of mined RoIs, as the two-pass losses are, so both modes give
        the same loss and gradients for the same selection.
        """
        box_predictor = self._box_predictor_at(stage)
        predictions = self._box_predictions(features, proposals, stage)
        cls_loss, box_loss = per_roi_losses(box_predictor, predictions, proposals)
        hardness = self._hardness(box_predictor, predictions, proposals, cls_loss, box_loss)
        selected, mined = self.select(hardness, proposals)
        keep = torch.zeros_like(cls_loss)
        weights = _roi_weights(mined)
        keep[selected] = 1.0 if weights is None else weights
        num_mined = max(len(selected), 1)
        losses = {
            "loss_cls": (cls_loss * keep).sum() / num_mined,
            "loss_box_reg": (box_loss * keep).sum() / num_mined,
        }
        return predictions, mined, losses

    def _box_losses(self, box_predictor, predictions, mined):
        """The trainable pass's box losses on the mined RoIs: the predictor's own (means), or where
        the selection strategy weighted the RoIs, the weighted means (1/M) sum_j w_j l_j of their
        per-RoI losses (M mined RoIs), normalised as :meth:`_loss_zeroing` normalises."""
        weights = _roi_weights(mined)
        if weights is None:
            return box_predictor.losses(predictions, mined)
        _log_classification_stats(predictions[0], torch.cat([p.gt_classes for p in mined]))
        cls_loss, box_loss = per_roi_losses(box_predictor, predictions, mined)
        num_mined = max(len(weights), 1)
        return {
            "loss_cls": (cls_loss * weights).sum() / num_mined,
            "loss_box_reg": (box_loss * weights).sum() / num_mined,
        }


def _roi_weights(mined):
    """The selection strategy's weights of the mined RoIs, flat, or None where it gave none."""
    if not mined[0].has("ohem_weight"):
        return None
    return torch.cat([p.ohem_weight for p in mined])


def _box_targets(targets):
    """The GT of one image as the box losses need it: boxes, classes, and ``gt_index``, which
    labelling copies to each proposal as the index of its matched GT."""
    out = Instances(targets.image_size)
    out.gt_boxes = targets.gt_boxes
    out.gt_classes = targets.gt_classes
    out.gt_index = torch.arange(len(targets), device=targets.gt_classes.device)
    return out


@ROI_HEADS_REGISTRY.register()
class OHEMROIHeads(OHEMMixin, StandardROIHeads):
    """:class:`StandardROIHeads` (FPN; box, mask and keypoint heads) trained with OHEM."""

    applies_roi_weights = True

    def _box_predictions(self, features, proposals, stage):
        boxes = [p.proposal_boxes for p in proposals]
        return self.box_predictor(self.box_head(pool(self.box_pooler, features, boxes)))

    # Constants for TorchScript, as Detectron2's TorchScript patch makes them in StandardROIHeads
    # (class annotations are not inherited), so that scripting compiles only the heads it has.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        if self.training:
            return self._forward_training(features, proposals, targets)
        # StandardROIHeads.forward's inference, written out: TorchScript cannot compile super().
        pred_instances = self._forward_box(features, proposals)
        pred_instances = self.forward_with_given_boxes(features, pred_instances)
        return pred_instances, {}

    @torch.jit.unused
    def _forward_training(self, features, proposals, targets):
        """OHEM's training step: label every proposal, mine, train the heads on the mined RoIs."""
        proposals = self.label_and_sample_proposals(proposals, targets)
        box_features = [features[f] for f in self.box_in_features]
        if self.ohem.mode == "two_pass":
            mined = self.mine(box_features, proposals).mined
            if _roi_weights(mined) is None:
                losses = self._forward_box(features, mined)
            else:
                losses = self._forward_weighted_box(box_features, mined)
        else:
            _, mined, losses = self._loss_zeroing(box_features, proposals)
        # The mask and keypoint heads train on the foreground among the mined RoIs.
        mined = self._with_targets(mined, targets)
        losses.update(self._forward_mask(features, mined))
        losses.update(self._forward_keypoint(features, mined))
        return mined, losses

    def _forward_weighted_box(self, box_features, mined):
        """Detectron2's ``_forward_box`` in training, with the strategy's RoI weights in the losses."""
        predictions = self._box_predictions(box_features, mined, 0)
        losses = self._box_losses(self.box_predictor, predictions, mined)
        if self.train_on_pred_boxes:  # as Detectron2: later heads train on the predicted boxes
            with torch.no_grad():
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, mined)
            for p, boxes in zip(mined, pred_boxes):
                p.proposal_boxes = Boxes(boxes)
        return losses


@ROI_HEADS_REGISTRY.register()
class OHEMRes5ROIHeads(OHEMMixin, Res5ROIHeads):
    """:class:`Res5ROIHeads` (C4; box and mask heads) trained with OHEM."""

    applies_roi_weights = True

    def _box_predictions(self, features, proposals, stage):
        # Res5ROIHeads._shared_roi_transform with the sync-free pooling of ohem_d2.modeling.pooling.
        pooled = pool(self.pooler, features, [p.proposal_boxes for p in proposals])
        if self.ohem.readonly_channels_last and not torch.is_grad_enabled():  # the read-only pass
            pooled = pooled.contiguous(memory_format=torch.channels_last)
        box_features = self.res5(pooled)
        return self.box_predictor(box_features.mean(dim=[2, 3]))

    def _mask_losses(self, features, proposals, box_features=None):
        """Mask loss on the foreground of ``proposals``; reuses their res5 features when given."""
        if not self.mask_on:
            return {}
        fg_proposals, fg_masks = select_foreground_proposals(proposals, self.num_classes)
        if box_features is not None:
            mask_features = box_features[torch.cat(fg_masks, dim=0)]
        else:
            mask_features = self._shared_roi_transform(features, [p.proposal_boxes for p in fg_proposals])
        return self.mask_head(mask_features, fg_proposals)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        if self.training:
            return self._forward_training(features, proposals, targets)
        # Res5ROIHeads.forward's inference, written out: TorchScript cannot compile super().
        box_features = self._shared_roi_transform(
            [features[f] for f in self.in_features], [x.proposal_boxes for x in proposals]
        )
        predictions = self.box_predictor(box_features.mean(dim=[2, 3]))
        pred_instances, _ = self.box_predictor.inference(predictions, proposals)
        pred_instances = self.forward_with_given_boxes(features, pred_instances)
        return pred_instances, {}

    @torch.jit.unused
    def _forward_training(self, features, proposals, targets):
        """OHEM's training step: label every proposal, mine, train res5 and the mask head on the
        mined RoIs."""
        proposals = self.label_and_sample_proposals(proposals, targets)
        features = [features[f] for f in self.in_features]
        if self.ohem.mode == "two_pass":
            mined = self.mine(features, proposals).mined
            mined = self._with_targets(mined, targets)
            # Detectron2's Res5ROIHeads training step, on the mined RoIs only.
            box_features = self._shared_roi_transform(features, [p.proposal_boxes for p in mined])
            predictions = self.box_predictor(box_features.mean(dim=[2, 3]))
            losses = self._box_losses(self.box_predictor, predictions, mined)
            losses.update(self._mask_losses(features, mined, box_features))
        else:
            _, mined, losses = self._loss_zeroing(features, proposals)
            losses.update(self._mask_losses(features, self._with_targets(mined, targets)))
        return [], losses
