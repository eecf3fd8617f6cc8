"""The arms of a baseline-versus-OHEM comparison, as config overrides on one base config.

Every arm is the same base config (model, data, schedule, seed, RoI budget) with only the keys
that choose what trains changed (the RoIs; the images too for ``hard_images`` and
``ohem_hard_images``), so that a difference in AP is the sampler's doing. The stock
and OHEM heads of each family are paired here, which lets any Detectron2 config serve as base.

Besides the paper's OHEM and its variants, the peers that answer the same question without it:
``mmdet_ohem`` (mmdetection's OHEMSampler, in OHEM's own settings), ``iou_balanced`` (Libra
R-CNN's sampler, :mod:`ohem_d2.baselines.iou_balanced`) and ``focal`` (the stock sampler with a focal
classification loss, :mod:`ohem_d2.baselines.focal_loss`; the loss is what it changes, through the head).

Anchor-level mining (:mod:`ohem_d2.modeling.anchor_mining`) has arms too: ``ohem_rpn`` (OHEM in the
RPN and the RoI head) among the Faster R-CNN arms, and the RetinaNet arms, which change the
anchor loss of a RetinaNet base config (``MODEL.META_ARCHITECTURE`` RetinaNet or OHEMRetinaNet)
and only that: ``retinanet_focal`` (stock), ``retinanet_ce`` (plain cross-entropy on every anchor,
the imbalance baseline), ``retinanet_ohem`` and ``retinanet_ssd``. One comparison mixes arms of
one meta-architecture: its arms share the base config.
"""
from collections import OrderedDict

STOCK_TO_OHEM_HEAD = {
    "StandardROIHeads": "OHEMROIHeads",
    "Res5ROIHeads": "OHEMRes5ROIHeads",
    "CascadeROIHeads": "OHEMCascadeROIHeads",
}
# Stock CascadeROIHeads cannot ignore proposals below bg_lo; this stock-equivalent head can.
STOCK_TO_HEURISTICS_HEAD = {"CascadeROIHeads": "FastRCNNHeuristicsCascadeROIHeads"}
OHEM_TO_STOCK_HEAD = {v: k for mapping in (STOCK_TO_OHEM_HEAD, STOCK_TO_HEURISTICS_HEAD) for k, v in mapping.items()}
# The peers' heads exist for the FPN and C4 families (no cascade).
STOCK_TO_IOU_BALANCED_HEAD = {"StandardROIHeads": "IoUBalancedROIHeads", "Res5ROIHeads": "IoUBalancedRes5ROIHeads"}
STOCK_TO_FOCAL_HEAD = {"StandardROIHeads": "FocalLossROIHeads", "Res5ROIHeads": "FocalLossRes5ROIHeads"}
# Head kind of an arm -> {stock head of the base config's family: the arm's head}.
HEADS_BY_KIND = {
    "stock": {head: head for head in STOCK_TO_OHEM_HEAD},
    "heuristics": {head: STOCK_TO_HEURISTICS_HEAD.get(head, head) for head in STOCK_TO_OHEM_HEAD},
    "ohem": STOCK_TO_OHEM_HEAD,
    "iou_balanced": STOCK_TO_IOU_BALANCED_HEAD,
    "focal": STOCK_TO_FOCAL_HEAD,
}

# Head kind of a RetinaNet arm -> the arm's MODEL.META_ARCHITECTURE; a base config of either is a
# RetinaNet base.
RETINANET_BY_KIND = {"retinanet": "RetinaNet", "ohem_retinanet": "OHEMRetinaNet"}
# The arms that mine the RPN's anchors -> their proposal generator; the other arms train Detectron2's RPN.
RPN_BY_ARM = {"ohem_rpn": "OHEMRPN"}
RPNS = ("RPN", "OHEMRPN")

# How RoIs are labelled: Detectron2's default (no bg_lo) and Fast R-CNN's (bg_lo = 0.1).
_NO_BG_LO = ["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.5], "MODEL.ROI_HEADS.IOU_LABELS", [0, 1]]
_BG_LO = ["MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.1, 0.5], "MODEL.ROI_HEADS.IOU_LABELS", [-1, 0, 1]]
_QUARTER_FG = ["MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.25]
# Images drawn by how hard the model finds them (ohem_d2.data.hard_images); yacs configs only.
_HARD_IMAGES = ["DATALOADER.SAMPLER_TRAIN", "HardImageTrainingSampler"]
# RetinaNet's anchor loss: Detectron2's focal loss as published, and at gamma 0, alpha -1, which is
# plain sigmoid cross-entropy.
_FOCAL = ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", 2.0, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", 0.25]
_PLAIN_CE = ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", 0.0, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", -1.0]

# name -> (description, head kind: a key of HEADS_BY_KIND, overrides)
ARMS = OrderedDict(
    [
        ("fast_rcnn_heuristics", ("Fast R-CNN sampler: bg_lo 0.1, 1:3 fg:bg", "heuristics",
                                  _BG_LO + _QUARTER_FG)),
        ("stock", ("Detectron2 sampler: bg_lo 0, 1:3 fg:bg (the paper's 'remove bg_lo')", "stock",
                   _NO_BG_LO + _QUARTER_FG)),
        ("ohem", ("OHEM as in the paper: all RoIs, loss cls+box, NMS 0.7", "ohem", _NO_BG_LO)),
        ("ohem_no_nms", ("OHEM without the NMS", "ohem", _NO_BG_LO + ["MODEL.OHEM.NMS_THRESH", 1.0])),
        ("ohem_cls", ("OHEM ranked by the classification loss alone", "ohem",
                      _NO_BG_LO + ["MODEL.OHEM.LOSS", "cls"])),
        ("ohem_loss_zeroing", ("OHEM by zeroing the losses of easy RoIs (one pass)", "ohem",
                               _NO_BG_LO + ["MODEL.OHEM.MODE", "loss_zeroing"])),
        ("ohem_per_batch", ("OHEM keeping the B hardest of the whole batch", "ohem",
                            _NO_BG_LO + ["MODEL.OHEM.SELECTION", "per_batch"])),
        ("ohem_stratified", ("OHEM with fg/bg quotas (S-OHEM style, 25% fg)", "ohem",
                             _NO_BG_LO + ["MODEL.OHEM.SELECTION", "stratified"])),
        ("ohem_probability", ("OHEM ranked by 1 - p(true class)", "ohem",
                              _NO_BG_LO + ["MODEL.OHEM.HARDNESS", "probability"])),
        ("ohem_hard_positive", ("OHEM with the hardest fg guaranteed 25% of the batch", "ohem",
                                _NO_BG_LO + ["MODEL.OHEM.MIN_FG_FRACTION", 0.25])),
        ("ohem_uncertainty", ("OHEM ranked by 1 - p(top class), label-free", "ohem",
                              _NO_BG_LO + ["MODEL.OHEM.HARDNESS", "uncertainty"])),
        ("ohem_margin", ("OHEM ranked by 1 - (p_top1 - p_top2), label-free", "ohem",
                         _NO_BG_LO + ["MODEL.OHEM.HARDNESS", "margin"])),
        ("ohem_importance_sampling", ("B/N RoIs per image drawn in proportion to loss, importance-weighted",
                                      "ohem", _NO_BG_LO + ["MODEL.OHEM.SELECTION", "importance_sampling"])),
        ("mmdet_ohem", ("mmdetection's OHEMSampler: 25% fg quota, ranked by cls loss, no NMS", "ohem",
                        _NO_BG_LO + ["MODEL.OHEM.SELECTION", "stratified", "MODEL.OHEM.LOSS", "cls",
                                     "MODEL.OHEM.NMS_THRESH", 1.0, "MODEL.OHEM.FG_FRACTION", 0.25])),
        ("iou_balanced", ("Libra R-CNN sampler: negatives IoU-balanced over 3 bins, 1:3 fg:bg", "iou_balanced",
                          _NO_BG_LO + _QUARTER_FG)),
        ("focal", ("Detectron2 sampler, focal classification loss (gamma 2)", "focal", _NO_BG_LO + _QUARTER_FG)),
        ("hard_images", ("Detectron2 sampler; images drawn by their recent loss (HardImageTrainingSampler)",
                         "stock", _NO_BG_LO + _QUARTER_FG + _HARD_IMAGES)),
        ("ohem_hard_images", ("OHEM as in the paper; images drawn by their recent loss", "ohem",
                              _NO_BG_LO + _HARD_IMAGES)),
        ("bootstrap", ("Detectron2 sampler; hard-negative bootstrapping of the negative pool in rounds of the same "
                       "schedule (tools/bootstrap.py)", "stock", _NO_BG_LO + _QUARTER_FG)),
        ("bootstrap_random", ("the bootstrap arm's control: each round adds as many pool images as mining would, "
                              "drawn at random (tools/bootstrap.py --choose random)", "stock", _NO_BG_LO + _QUARTER_FG)),
        ("ohem_rpn", ("OHEM in the RPN (B/N hardest anchors per image, NMS on loss) and in the RoI head", "ohem",
                      _NO_BG_LO)),
        ("retinanet_focal", ("RetinaNet as published: focal loss (gamma 2, alpha 0.25) on every anchor", "retinanet",
                             _FOCAL)),
        ("retinanet_ce", ("RetinaNet with plain sigmoid cross-entropy on every anchor, no mining", "retinanet",
                          _PLAIN_CE)),
        ("retinanet_ohem", ("RetinaNet, plain cross-entropy on the B/N hardest anchors per image after NMS on loss",
                            "ohem_retinanet", _PLAIN_CE + ["MODEL.OHEM.ANCHOR_SELECTION", "per_image"])),
        ("retinanet_ssd", ("RetinaNet, plain cross-entropy on every positive and the 3:1 hardest negatives (SSD)",
                           "ohem_retinanet", _PLAIN_CE + ["MODEL.OHEM.ANCHOR_SELECTION", "hard_negative_ratio",
                                                          "MODEL.OHEM.NEG_POS_RATIO", 3.0])),
    ]
)
DEFAULT_ARMS = ("stock", "fast_rcnn_heuristics", "ohem")
# The arms that train with tools/bootstrap.py (rounds over a negative pool) instead of train_net.py:
# {arm: its options of that tool}.
BOOTSTRAP_ARMS = {"bootstrap": [], "bootstrap_random": ["--choose", "random"]}


class UnknownArmError(ValueError):
    pass


def arm_overrides(arm, base_head, meta_architecture="GeneralizedRCNN", proposal_generator="RPN"):
    """Config overrides (a flat KEY, VALUE list) that turn a base config into ``arm``.

    ``base_head`` is the base config's MODEL.ROI_HEADS.NAME, stock or OHEM: the arm keeps its
    family (FPN, C4, cascade) and sets the stock or OHEM member. ``meta_architecture`` and
    ``proposal_generator`` are the base's MODEL.META_ARCHITECTURE and MODEL.PROPOSAL_GENERATOR.NAME:
    a RetinaNet base takes the RetinaNet arms only, any other base the others only; the arm sets
    the RPN (stock or OHEMRPN) where it differs from the base's.
    """
    if arm not in ARMS:
        raise UnknownArmError(f"unknown arm {arm!r}; known arms: {', '.join(ARMS)}")
    _, kind, overrides = ARMS[arm]
    base_is_retinanet = meta_architecture in RETINANET_BY_KIND.values()
    if (kind in RETINANET_BY_KIND) != base_is_retinanet:
        family = [a for a, (_, k, _) in ARMS.items() if (k in RETINANET_BY_KIND) == base_is_retinanet]
        raise UnknownArmError(
            f"arm {arm!r} does not apply to MODEL.META_ARCHITECTURE {meta_architecture!r}: one comparison mixes "
            f"arms of one meta-architecture, and this base config's are {', '.join(family)}")
    if base_is_retinanet:
        return ["MODEL.META_ARCHITECTURE", RETINANET_BY_KIND[kind]] + overrides
    stock_head = OHEM_TO_STOCK_HEAD.get(base_head, base_head)
    if stock_head not in STOCK_TO_OHEM_HEAD:
        raise UnknownArmError(
            f"MODEL.ROI_HEADS.NAME {base_head!r} has no OHEM counterpart; the base config must use one of "
            f"{', '.join(STOCK_TO_OHEM_HEAD)} (or their OHEM heads)"
        )
    heads = HEADS_BY_KIND[kind]
    if stock_head not in heads:
        raise UnknownArmError(f"arm {arm!r} has no head for the {stock_head} family; it runs on "
                              f"{', '.join(heads)} (or their OHEM heads)")
    rpn = RPN_BY_ARM.get(arm, "RPN")
    if rpn != proposal_generator and (arm in RPN_BY_ARM or proposal_generator in RPN_BY_ARM.values()):
        if proposal_generator not in RPNS:
            raise UnknownArmError(f"arm {arm!r} mines the RPN's anchors; the base config's "
                                  f"MODEL.PROPOSAL_GENERATOR.NAME must be one of {', '.join(RPNS)}, "
                                  f"not {proposal_generator!r}")
        overrides = overrides + ["MODEL.PROPOSAL_GENERATOR.NAME", rpn]
    return ["MODEL.ROI_HEADS.NAME", heads[stock_head]] + overrides


def describe(arm):
    return ARMS[arm][0]


# LazyConfig: a yacs arm override -> where it goes in a LazyConfig model's roi_heads.
_LAZY_KEYS = {
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": ("proposal_matcher", "thresholds"),
    "MODEL.ROI_HEADS.IOU_LABELS": ("proposal_matcher", "labels"),
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": ("positive_fraction",),
}


def _head_classes():
    """Registered ROI head name -> class, for a LazyConfig's ``_target_``."""
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    from .baselines import focal_loss, iou_balanced  # noqa: F401 (register the heads)
    from .modeling import roi_heads  # noqa: F401

    return {name: cls for name, cls in ROI_HEADS_REGISTRY}


def apply_arm_to_lazy_model(model, arm):
    """Turn a LazyConfig ``model`` (a GeneralizedRCNN with FPN or C4 RoI heads, stock or OHEM)
    into ``arm``, in place, with the very overrides :func:`arm_overrides` gives a yacs config:
    the RoI head class, its matcher's thresholds and labels, its positive fraction, and the
    ``ohem`` settings (an OHEMSettings node, added for an OHEM arm and removed for the others);
    the ``focal`` arm's box predictor becomes a FocalLossOutputLayers (its default gamma); the
    ``ohem_rpn`` arm's proposal generator becomes an OHEMRPN with the same ``ohem`` settings.
    RetinaNet arms run from yacs configs. Returns ``model``."""
    from detectron2.config import LazyCall

    from detectron2.modeling.proposal_generator import RPN

    from .modeling.rpn import OHEMRPN
    from .modeling.settings import OHEMSettings
    from .baselines.focal_loss import FocalLossOutputLayers

    if arm in BOOTSTRAP_ARMS:
        raise UnknownArmError(f"arm {arm!r} trains with tools/bootstrap.py, from a yacs (.yaml) config")
    if arm in ARMS and ARMS[arm][1] in RETINANET_BY_KIND:
        raise UnknownArmError(f"arm {arm!r} is a RetinaNet arm: LazyConfig arms support GeneralizedRCNN models; "
                              "run the RetinaNet arms from a yacs config (configs/*/retinanet_*.yaml)")
    heads = model.roi_heads
    target = heads._target_
    name = target.rsplit(".", 1)[-1] if isinstance(target, str) else target.__name__
    if "proposal_matcher" not in heads:
        raise UnknownArmError(f"model.roi_heads {name!r} has no proposal_matcher (a cascade?): LazyConfig arms "
                              "support the FPN and C4 heads (StandardROIHeads, Res5ROIHeads and their OHEM heads)")
    rpn_target = model.proposal_generator._target_
    rpn_name = rpn_target.rsplit(".", 1)[-1] if isinstance(rpn_target, str) else rpn_target.__name__
    overrides = arm_overrides(arm, name, proposal_generator=rpn_name)
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    sampler_keys = [key for key in pairs if key.startswith("DATALOADER.")]
    if sampler_keys:
        raise UnknownArmError(f"arm {arm!r} changes the training sampler ({sampler_keys[0]}), which the "
                              "LazyConfig tool does not build; run it from a yacs (.yaml) config")
    rpn = pairs.pop("MODEL.PROPOSAL_GENERATOR.NAME", None)
    heads._target_ = _head_classes()[pairs.pop("MODEL.ROI_HEADS.NAME")]
    if "ohem" in heads:
        del heads["ohem"]
    if ARMS[arm][1] == "ohem":
        heads.ohem = LazyCall(OHEMSettings)()
    if ARMS[arm][1] == "focal":
        heads.box_predictor._target_ = FocalLossOutputLayers
    for key, value in pairs.items():
        if key.startswith("MODEL.OHEM."):
            heads.ohem[key[len("MODEL.OHEM."):].lower()] = value
        else:
            node = heads
            *parents, leaf = _LAZY_KEYS[key]
            for part in parents:
                node = node[part]
            node[leaf] = value
    if rpn == "OHEMRPN":
        model.proposal_generator._target_ = OHEMRPN
        model.proposal_generator.ohem = heads.ohem
    elif rpn == "RPN":
        model.proposal_generator._target_ = RPN
        del model.proposal_generator["ohem"]
    return model
