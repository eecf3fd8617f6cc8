"""``MODEL.OHEM.*``: the config keys OHEM adds to Detectron2, and their validation.

Validation happens here, when the model is built, so that a bad value stops the
run with a message naming the key and the fix, not with a traceback from deep
inside a training step.
"""
from dataclasses import dataclass

from detectron2.config import CfgNode as CN

from .hardness import OHEM_HARDNESS_REGISTRY, registered_hardness
from .selection import OHEM_SELECTION_REGISTRY, registered_strategies

MODES = ("two_pass", "loss_zeroing")
LOSSES = ("cls_box", "cls")
READONLY_DTYPES = ("float32", "bfloat16", "float16")


class OHEMConfigError(ValueError):
    """A ``MODEL.OHEM.*`` (or related) config value that OHEM cannot run with."""


def add_ohem_config(cfg):
    """Add the ``MODEL.OHEM`` node to ``cfg`` (call before ``merge_from_file``)."""
    cfg.MODEL.OHEM = CN()
    # Hard RoIs kept per image (the paper's B/N). 0: same as MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
    # so that switching a config to OHEM keeps its RoI budget.
    cfg.MODEL.OHEM.BATCH_SIZE_PER_IMAGE = 0
    # IoU of the NMS that removes near-duplicate RoIs before ranking (paper: 0.7); 1.0 disables it.
    cfg.MODEL.OHEM.NMS_THRESH = 0.7
    # Per-RoI loss that ranks RoIs: "cls_box" (paper: classification + box regression) or "cls".
    cfg.MODEL.OHEM.LOSS = "cls_box"
    # "two_pass": read-only pass on all RoIs, trainable pass on the hard ones (the paper's method).
    # "loss_zeroing": one trainable pass on all RoIs, losses of the others zeroed (the naive
    # method the paper argues against; same gradients, more memory and time).
    cfg.MODEL.OHEM.MODE = "two_pass"
    # RoIs per chunk of the read-only pass: bounds its peak memory (nothing of it is kept for the
    # backward pass). 0 runs all RoIs at once.
    cfg.MODEL.OHEM.READONLY_CHUNK_SIZE = 1024
    # Precision of the read-only pass in fp32 training ("bfloat16"/"float16" is opt-in: it changes
    # the ranking only by rounding). Under SOLVER.AMP the pass follows the autocast.
    cfg.MODEL.OHEM.READONLY_DTYPE = "float32"
    # Record mining statistics in the EventStorage (metrics.json, TensorBoard) every iteration.
    cfg.MODEL.OHEM.LOG_DIAGNOSTICS = True
    # How the hard RoIs are chosen after the NMS, a name in ohem_d2.OHEM_SELECTION_REGISTRY:
    # "per_image" (paper: the B/N hardest of each image), "per_batch" (the N * B/N hardest of the
    # batch), "stratified" (per image, foreground / background quotas filled by hardness), or one
    # you registered. See docs/STRATEGIES.md.
    cfg.MODEL.OHEM.SELECTION = "per_image"
    # What "hard" means, a name in ohem_d2.OHEM_HARDNESS_REGISTRY: "loss" (paper: the per-RoI loss
    # per MODEL.OHEM.LOSS) or "probability" (1 - p(true class)), or one you registered.
    cfg.MODEL.OHEM.HARDNESS = "loss"
    # "stratified" only: the foreground share of each image's budget (as POSITIVE_FRACTION).
    cfg.MODEL.OHEM.FG_FRACTION = 0.25
    # Hard positives: each image keeps at least its floor(MIN_FG_FRACTION * B/N) hardest foreground
    # RoIs (all of them if it has fewer), the rest of the budget by hardness. 0.0: off.
    cfg.MODEL.OHEM.MIN_FG_FRACTION = 0.0


@dataclass(frozen=True)
class OHEMSettings:
    """The validated ``MODEL.OHEM`` values a head mines with."""

    batch_size_per_image: int
    nms_thresh: float
    loss: str
    mode: str
    readonly_chunk_size: int
    readonly_dtype: str
    log_diagnostics: bool
    selection: str = "per_image"
    hardness: str = "loss"
    fg_fraction: float = 0.25
    min_fg_fraction: float = 0.0

    @classmethod
    def from_config(cls, cfg):
        if "OHEM" not in cfg.MODEL:
            raise OHEMConfigError(
                "the config has no MODEL.OHEM node: call ohem_d2.add_ohem_config(cfg) "
                "before cfg.merge_from_file(...)"
            )
        validate_ohem_config(cfg)
        o = cfg.MODEL.OHEM
        return cls(
            batch_size_per_image=o.BATCH_SIZE_PER_IMAGE or cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
            nms_thresh=float(o.NMS_THRESH),
            loss=o.LOSS,
            mode=o.MODE,
            readonly_chunk_size=o.READONLY_CHUNK_SIZE,
            readonly_dtype=o.READONLY_DTYPE,
            log_diagnostics=bool(o.LOG_DIAGNOSTICS),
            selection=o.SELECTION,
            hardness=o.HARDNESS,
            fg_fraction=float(o.FG_FRACTION),
            min_fg_fraction=float(o.MIN_FG_FRACTION),
        )


def _check(ok, key, value, expected):
    if not ok:
        raise OHEMConfigError(f"{key} = {value!r} is invalid: expected {expected}.")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_fraction(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def validate_ohem_config(cfg):
    """Raise :class:`OHEMConfigError` naming the first bad ``MODEL.OHEM`` value and its fix."""
    o = cfg.MODEL.OHEM
    _check(_is_int(o.BATCH_SIZE_PER_IMAGE) and o.BATCH_SIZE_PER_IMAGE >= 0,
           "MODEL.OHEM.BATCH_SIZE_PER_IMAGE", o.BATCH_SIZE_PER_IMAGE,
           "an integer >= 1 (hard RoIs kept per image), or 0 for MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    if o.BATCH_SIZE_PER_IMAGE == 0:
        b = cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
        _check(_is_int(b) and b >= 1, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", b,
               "an integer >= 1 (or set MODEL.OHEM.BATCH_SIZE_PER_IMAGE)")
    _check(isinstance(o.NMS_THRESH, (int, float)) and not isinstance(o.NMS_THRESH, bool)
           and 0.0 < o.NMS_THRESH <= 1.0,
           "MODEL.OHEM.NMS_THRESH", o.NMS_THRESH, "an IoU in (0, 1] (paper: 0.7; 1.0 turns the NMS off)")
    _check(o.LOSS in LOSSES, "MODEL.OHEM.LOSS", o.LOSS, f"one of {LOSSES}")
    _check(o.MODE in MODES, "MODEL.OHEM.MODE", o.MODE, f"one of {MODES}")
    _check(_is_int(o.READONLY_CHUNK_SIZE) and o.READONLY_CHUNK_SIZE >= 0,
           "MODEL.OHEM.READONLY_CHUNK_SIZE", o.READONLY_CHUNK_SIZE,
           "an integer >= 1 (RoIs per chunk of the read-only pass), or 0 for no chunking")
    _check(o.READONLY_DTYPE in READONLY_DTYPES, "MODEL.OHEM.READONLY_DTYPE", o.READONLY_DTYPE,
           f"one of {READONLY_DTYPES}")
    _check(isinstance(o.LOG_DIAGNOSTICS, bool), "MODEL.OHEM.LOG_DIAGNOSTICS", o.LOG_DIAGNOSTICS,
           "True or False")
    _check(isinstance(o.SELECTION, str) and o.SELECTION in OHEM_SELECTION_REGISTRY,
           "MODEL.OHEM.SELECTION", o.SELECTION,
           f"one of the registered selection strategies {registered_strategies()} (add your own "
           "with @ohem_d2.OHEM_SELECTION_REGISTRY.register() before building the model)")
    _check(isinstance(o.HARDNESS, str) and o.HARDNESS in OHEM_HARDNESS_REGISTRY,
           "MODEL.OHEM.HARDNESS", o.HARDNESS,
           f"one of the registered hardness definitions {registered_hardness()} (add your own "
           "with @ohem_d2.OHEM_HARDNESS_REGISTRY.register() before building the model)")
    _check(_is_fraction(o.FG_FRACTION), "MODEL.OHEM.FG_FRACTION", o.FG_FRACTION,
           "a fraction in [0, 1] (the foreground share of each image's budget under "
           "SELECTION \"stratified\")")
    _check(_is_fraction(o.MIN_FG_FRACTION), "MODEL.OHEM.MIN_FG_FRACTION", o.MIN_FG_FRACTION,
           "a fraction in [0, 1] (the share of each image's budget reserved for its hardest "
           "foreground RoIs; 0.0 turns it off)")
    _check(not cfg.MODEL.ROI_BOX_HEAD.get("USE_FED_LOSS", False), "MODEL.ROI_BOX_HEAD.USE_FED_LOSS",
           True, "False with OHEM (the federated loss samples classes per batch, so it has no per-RoI "
           "loss to rank by)")
