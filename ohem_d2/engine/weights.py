"""What a run starts from, checked before any worker is spawned: the weights it loads, and what
training from random weights needs of the backbone.

Detectron2 takes an empty weights path for "from scratch" with no more than a log line ("No
checkpoint found. Initializing model from scratch"), also for an evaluation, which then scores a
random model; and it keeps the first ``FREEZE_AT`` stages of a ResNet frozen, pretrained or not,
so that a run from scratch trains around a random stem. A path that does not exist fails only in
the workers, when the model is built.
"""
import os

# How Detectron2's ResNet names what MODEL.BACKBONE.FREEZE_AT k freezes: the first k of these.
RESNET_STAGES = ("stem", "res2", "res3", "res4", "res5")


class WeightsError(ValueError):
    """Weights that cannot be what the user meant: none to evaluate, or a file that is not there."""


def check_weights(weights, *, key, override, eval_only, resume_from=None):
    """Raise ``WeightsError`` where the run would evaluate a random model (``eval_only`` with no
    ``weights``) or load a local file that does not exist. ``resume_from``: the output folder
    whose last checkpoint the run loads instead where it has one (--resume), else None; Detectron2
    fetches a URL (``detectron2://``, ``https://``) itself. ``key`` and ``override`` (with {} for
    the path) name the setting."""
    if resume_from is not None and os.path.isfile(os.path.join(resume_from, "last_checkpoint")):
        return
    example = override.format("output/model_final.pth")
    if not weights:
        if eval_only:
            nothing_to_resume = f" and {resume_from} has no checkpoint to resume from" if resume_from else ""
            raise WeightsError(f"--eval-only with no weights: {key} is empty{nothing_to_resume}, so Detectron2 would "
                               f"evaluate a randomly initialised model; give the trained model, e.g. {example}")
        return
    if "://" not in weights and not os.path.isfile(weights):
        raise WeightsError(f"{key} {weights} does not exist (relative to {os.getcwd()}); give the path of the "
                           f"checkpoint file, e.g. {example}")


def from_scratch_warnings(cfg):
    """Warnings for a yacs config that trains a ResNet from random weights (MODEL.WEIGHTS empty)
    with frozen stages, or with FrozenBN, whose statistics only pretrained weights set."""
    if cfg.MODEL.WEIGHTS or "resnet" not in cfg.MODEL.BACKBONE.NAME:
        return []
    warnings = []
    frozen = RESNET_STAGES[: cfg.MODEL.BACKBONE.FREEZE_AT]
    if frozen:
        stages = " and ".join([", ".join(frozen[:-1]), frozen[-1]] if len(frozen) > 1 else frozen)
        warnings.append(f"MODEL.WEIGHTS is empty (training from scratch) with MODEL.BACKBONE.FREEZE_AT "
                        f"{cfg.MODEL.BACKBONE.FREEZE_AT}: the randomly initialised {stages} of the "
                        "backbone would stay frozen, never trained; set MODEL.BACKBONE.FREEZE_AT 0")
    if cfg.MODEL.RESNETS.NORM == "FrozenBN":
        warnings.append("MODEL.WEIGHTS is empty (training from scratch) with MODEL.RESNETS.NORM FrozenBN: frozen "
                        "batch norm keeps the statistics of initialisation (mean 0, variance 1), which only "
                        "pretrained weights replace, so the backbone trains unnormalised; use GroupNorm: "
                        "MODEL.RESNETS.NORM GN MODEL.FPN.NORM GN")
    return warnings
