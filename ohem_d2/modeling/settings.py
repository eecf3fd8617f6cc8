"""The settings of an OHEM head, their defaults and their validation, for both config systems.

:class:`OHEMSettings` is the one definition: its fields are the ``MODEL.OHEM.*`` keys of a yacs
config in lower case (``add_ohem_config`` adds them, with these defaults), and a LazyConfig uses
it directly: ``L(OHEMROIHeads)(..., ohem=L(OHEMSettings)(nms_thresh=0.5))``, or no ``ohem`` at
all for the paper's settings. It validates itself when made, so a bad value stops the run with
one line naming the key and the fix, when the model is built, not with a traceback from deep
inside a training step.
"""
import math
from dataclasses import dataclass, fields

from .hardness import OHEM_HARDNESS_REGISTRY, registered_hardness
from .selection import OHEM_SELECTION_REGISTRY, registered_strategies

MODES = ("two_pass", "loss_zeroing")
LOSSES = ("cls_box", "cls")
READONLY_DTYPES = ("float32", "bfloat16", "float16")


class OHEMConfigError(ValueError):
    """A ``MODEL.OHEM.*`` (or related) config value that OHEM cannot run with."""


@dataclass(frozen=True)
class OHEMSettings:
    """How an OHEM head mines; the defaults are the paper's (Shrivastava et al., 2016, Sec. 4)."""

    # Hard RoIs kept per image (the paper's B/N). 0: the head's own batch_size_per_image
    # (MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE), so that switching a config to OHEM keeps its budget.
    batch_size_per_image: int = 0
    # IoU of the NMS that removes near-duplicate RoIs before ranking (paper: 0.7); 1.0 disables it.
    nms_thresh: float = 0.7
    # Per-RoI loss that ranks RoIs: "cls_box" (paper: classification + box regression) or "cls".
    loss: str = "cls_box"
    # "two_pass": read-only pass on all RoIs, trainable pass on the hard ones (the paper's method).
    # "loss_zeroing": one trainable pass on all RoIs, losses of the others zeroed (the naive
    # method the paper argues against; same gradients, more memory and time).
    mode: str = "two_pass"
    # RoIs per chunk of the read-only pass: bounds its peak memory (nothing of it is kept for the
    # backward pass). 0 runs all RoIs at once.
    readonly_chunk_size: int = 1024
    # Precision of the read-only pass in fp32 training ("bfloat16"/"float16" is opt-in: it changes
    # the ranking only by rounding). Under AMP the pass follows the autocast.
    readonly_dtype: str = "float32"
    # Fixed shapes for the read-only pass (opt-in, for C4 on GPUs): each image's last chunk is padded
    # to READONLY_CHUNK_SIZE RoIs, so every call of the box head has one input shape and cuDNN's
    # autotuner (CUDNN_BENCHMARK) tunes once, and C4's res5 runs in channels_last, the layout of
    # cuDNN's tensor-core kernels (with READONLY_DTYPE "bfloat16"). Changes the ranking only by
    # rounding (docs/PERFORMANCE.md measures how often the selection differs).
    readonly_channels_last: bool = False
    # Record mining statistics in the EventStorage (metrics.json, TensorBoard) every 20th iteration
    # (ohem_d2.modeling.diagnostics.LOG_PERIOD).
    log_diagnostics: bool = True
    # How the hard RoIs are chosen after the NMS: a name in ohem_d2.OHEM_SELECTION_REGISTRY
    # (the built-ins are listed in docs/STRATEGIES.md); "per_image" is the paper's B/N per image.
    selection: str = "per_image"
    # What "hard" means: a name in ohem_d2.OHEM_HARDNESS_REGISTRY (docs/STRATEGIES.md); "loss" is
    # the paper's (the per-RoI loss per LOSS).
    hardness: str = "loss"
    # "stratified" only: the foreground share of each image's budget (as POSITIVE_FRACTION).
    fg_fraction: float = 0.25
    # Hard positives: each image keeps at least its floor(MIN_FG_FRACTION * B/N) hardest foreground
    # RoIs (all of them if it has fewer), the rest of the budget by hardness. 0.0: off.
    min_fg_fraction: float = 0.0
    # "importance_sampling" only: RoIs are drawn with probability proportional to
    # hardness ** (1 / SAMPLING_TEMPERATURE): 1.0 in proportion to hardness, larger flattens towards
    # uniform, smaller concentrates on the hardest.
    sampling_temperature: float = 1.0
    # Anchor-level mining (OHEMRetinaNet, OHEMRPN; docs/OHEM_HEADS.md "Mining anchors"): hard
    # anchors kept per image (B/N of the "per_image" selection; the RPN's sampler keeps 256).
    anchor_batch_size_per_image: int = 256
    # How the hard anchors are chosen: a name in ohem_d2.OHEM_SELECTION_REGISTRY; "per_image" is
    # the paper's, "hard_negative_ratio" SSD's (every positive, the hardest negatives up to
    # NEG_POS_RATIO per positive).
    anchor_selection: str = "per_image"
    # IoU of the NMS on loss among the candidate anchors (as NMS_THRESH for RoIs); 1.0 disables it.
    anchor_nms_thresh: float = 0.7
    # "hard_negative_ratio" only: negatives kept per positive (SSD: 3).
    neg_pos_ratio: float = 3.0

    def __post_init__(self):
        _validate(self)
        # 1 -> 1.0, as yacs may give
        for name in ("nms_thresh", "fg_fraction", "min_fg_fraction", "sampling_temperature",
                     "anchor_nms_thresh", "neg_pos_ratio"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_config(cls, cfg):
        """The settings of a yacs config's ``MODEL.OHEM`` node (validated)."""
        if "OHEM" not in cfg.MODEL:
            raise OHEMConfigError(
                "the config has no MODEL.OHEM node: call ohem_d2.add_ohem_config(cfg) "
                "before cfg.merge_from_file(...)"
            )
        return cls(**{f.name: cfg.MODEL.OHEM[f.name.upper()] for f in fields(cls)})

    def resolved(self, head_batch_size_per_image):
        """These settings with ``batch_size_per_image`` 0 replaced by the head's own."""
        if self.batch_size_per_image:
            return self
        _check(_is_int(head_batch_size_per_image) and head_batch_size_per_image >= 1,
               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", head_batch_size_per_image,
               "an integer >= 1 (or set MODEL.OHEM.BATCH_SIZE_PER_IMAGE)")
        return OHEMSettings(**{**self.__dict__, "batch_size_per_image": head_batch_size_per_image})


def check_box_predictor_for_ohem(use_fed_loss):
    """The box predictor settings OHEM cannot rank RoIs with."""
    _check(not use_fed_loss, "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True,
           "False with OHEM (the federated loss samples classes per batch, so it has no per-RoI "
           "loss to rank by)")


def _check(ok, key, value, expected):
    if not ok:
        raise OHEMConfigError(f"{key} = {value!r} is invalid: expected {expected}.")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_fraction(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _validate(s):
    """Raise :class:`OHEMConfigError` naming the first bad value of ``s`` and its fix."""
    _check(_is_int(s.batch_size_per_image) and s.batch_size_per_image >= 0,
           "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", s.batch_size_per_image,
           "an integer >= 1 (hard RoIs kept per image), or 0 for MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    _check(isinstance(s.nms_thresh, (int, float)) and not isinstance(s.nms_thresh, bool)
           and 0.0 < s.nms_thresh <= 1.0,
           "MODEL.OHEM.NMS_THRESH", s.nms_thresh, "an IoU in (0, 1] (paper: 0.7; 1.0 turns the NMS off)")
    _check(s.loss in LOSSES, "MODEL.OHEM.LOSS", s.loss, f"one of {LOSSES}")
    _check(s.mode in MODES, "MODEL.OHEM.MODE", s.mode, f"one of {MODES}")
    _check(_is_int(s.readonly_chunk_size) and s.readonly_chunk_size >= 0,
           "MODEL.OHEM.READONLY_CHUNK_SIZE", s.readonly_chunk_size,
           "an integer >= 1 (RoIs per chunk of the read-only pass), or 0 for no chunking")
    _check(s.readonly_dtype in READONLY_DTYPES, "MODEL.OHEM.READONLY_DTYPE", s.readonly_dtype,
           f"one of {READONLY_DTYPES}")
    _check(isinstance(s.readonly_channels_last, bool), "MODEL.OHEM.READONLY_CHANNELS_LAST",
           s.readonly_channels_last, "True or False")
    _check(not s.readonly_channels_last or s.readonly_chunk_size > 0, "MODEL.OHEM.READONLY_CHANNELS_LAST",
           s.readonly_channels_last, "False with READONLY_CHUNK_SIZE 0 (its fixed shapes are those of the chunks)")
    _check(isinstance(s.log_diagnostics, bool), "MODEL.OHEM.LOG_DIAGNOSTICS", s.log_diagnostics,
           "True or False")
    _check(isinstance(s.selection, str) and s.selection in OHEM_SELECTION_REGISTRY,
           "MODEL.OHEM.SELECTION", s.selection,
           f"one of the registered selection strategies {registered_strategies()} (add your own "
           "with @ohem_d2.OHEM_SELECTION_REGISTRY.register() before building the model)")
    _check(isinstance(s.hardness, str) and s.hardness in OHEM_HARDNESS_REGISTRY,
           "MODEL.OHEM.HARDNESS", s.hardness,
           f"one of the registered hardness definitions {registered_hardness()} (add your own "
           "with @ohem_d2.OHEM_HARDNESS_REGISTRY.register() before building the model)")
    _check(_is_fraction(s.fg_fraction), "MODEL.OHEM.FG_FRACTION", s.fg_fraction,
           "a fraction in [0, 1] (the foreground share of each image's budget under "
           "SELECTION \"stratified\")")
    _check(_is_fraction(s.min_fg_fraction), "MODEL.OHEM.MIN_FG_FRACTION", s.min_fg_fraction,
           "a fraction in [0, 1] (the share of each image's budget reserved for its hardest "
           "foreground RoIs; 0.0 turns it off)")
    _check(isinstance(s.sampling_temperature, (int, float)) and not isinstance(s.sampling_temperature, bool)
           and 0.0 < s.sampling_temperature < math.inf,
           "MODEL.OHEM.SAMPLING_TEMPERATURE", s.sampling_temperature,
           "a number > 0 (SELECTION \"importance_sampling\" draws RoIs with probability proportional to "
           "hardness ** (1 / SAMPLING_TEMPERATURE); 1.0: proportional)")
    _check(_is_int(s.anchor_batch_size_per_image) and s.anchor_batch_size_per_image >= 1,
           "MODEL.OHEM.ANCHOR_BATCH_SIZE_PER_IMAGE", s.anchor_batch_size_per_image,
           "an integer >= 1 (hard anchors kept per image)")
    _check(isinstance(s.anchor_selection, str) and s.anchor_selection in OHEM_SELECTION_REGISTRY,
           "MODEL.OHEM.ANCHOR_SELECTION", s.anchor_selection,
           f"one of the registered selection strategies {registered_strategies()} that return no "
           "weights (anchor losses are Detectron2's, unweighted)")
    _check(_is_number(s.anchor_nms_thresh) and 0.0 < s.anchor_nms_thresh <= 1.0,
           "MODEL.OHEM.ANCHOR_NMS_THRESH", s.anchor_nms_thresh, "an IoU in (0, 1] (1.0 turns the NMS off)")
    _check(_is_number(s.neg_pos_ratio) and 0.0 < s.neg_pos_ratio < math.inf,
           "MODEL.OHEM.NEG_POS_RATIO", s.neg_pos_ratio,
           "a number > 0 (negatives kept per positive anchor by \"hard_negative_ratio\"; SSD: 3)")
