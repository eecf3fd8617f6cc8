"""How hard a RoI is: the score OHEM ranks RoIs by (``MODEL.OHEM.HARDNESS``).

A hardness is a function ``fn(inputs: HardnessInputs) -> Tensor (R,)``, higher is harder,
registered in :data:`OHEM_HARDNESS_REGISTRY` under its ``__name__``. The built-in definitions and when each may help are listed once, in docs/STRATEGIES.md; each
function's docstring gives its exact definition.

The functions run without autograd and autocast, on detached inputs; they must return a float
tensor of shape (R,) on the device, without a host sync.
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

from detectron2.utils.registry import Registry

OHEM_HARDNESS_REGISTRY = Registry("OHEM_HARDNESS")
OHEM_HARDNESS_REGISTRY.__doc__ = """
Hardness definitions of OHEM, by name (``MODEL.OHEM.HARDNESS``). Each is called as
``fn(inputs: HardnessInputs) -> Tensor (R,)``; see :mod:`ohem_d2.modeling.hardness`.
"""


@dataclass(frozen=True)
class HardnessInputs:
    """What a hardness function sees, for the R RoIs of a batch (flat, in proposal order)."""

    box_predictor: torch.nn.Module  # the FastRCNNOutputLayers (of this stage, in a cascade)
    predictions: Tuple[torch.Tensor, torch.Tensor]  # (scores (R, K+1), proposal deltas), detached
    proposals: List  # the labelled Instances, one per image (proposal_boxes, gt_classes, gt_boxes)
    gt_classes: torch.Tensor  # (R,) int64: class in [0, K), K = background
    cls_loss: torch.Tensor  # (R,) per-RoI classification loss (fp32, predictor's loss weight)
    box_loss: torch.Tensor  # (R,) per-RoI box regression loss (fp32, 0 for background)
    loss: str  # MODEL.OHEM.LOSS: "cls_box" or "cls"


@OHEM_HARDNESS_REGISTRY.register()
def loss(inputs: HardnessInputs):
    """The paper: the RoI's loss, classification + box regression (``LOSS: "cls_box"``) or
    classification only (``LOSS: "cls"``)."""
    if inputs.loss == "cls_box":
        return inputs.cls_loss + inputs.box_loss
    return inputs.cls_loss


def log_prob_of_true_label(scores, gt_classes, use_sigmoid_ce):
    """(R,) log p(true label): log-softmax at the GT class, or for sigmoid CE the log-probability
    of the whole one-hot label vector (all-zero for background) under independent sigmoids."""
    scores = scores.float()
    if not use_sigmoid_ce:
        return F.log_softmax(scores, dim=1).gather(1, gt_classes[:, None])[:, 0]
    num_classes = scores.shape[1] - 1
    logits = scores[:, :num_classes]  # the last column is unused by sigmoid CE
    target = F.one_hot(gt_classes, num_classes + 1)[:, :num_classes].bool()
    return torch.where(target, F.logsigmoid(logits), F.logsigmoid(-logits)).sum(dim=1)


@OHEM_HARDNESS_REGISTRY.register()
def probability(inputs: HardnessInputs):
    """1 - p(true label) in [0, 1]: low confidence in the right answer (or, what is the same,
    confidence in a wrong one). Softmax: 1 - softmax(scores)[gt_class], background included.
    Sigmoid CE (``USE_SIGMOID_CE``, one independent Bernoulli per object class, no background
    logit): p(true label) is the probability of the whole correct label vector,
    sigmoid(s_c) * prod_{j != c} (1 - sigmoid(s_j)) for a RoI of class c and prod_j (1 - sigmoid(s_j))
    for background (no class fires). Both are exp(-unweighted classification loss), so this hardness
    ranks RoIs as ``LOSS: "cls"`` does; it differs in scale: bounded in [0, 1] (it saturates at 1
    for RoIs with p(true) below ~6e-8 in fp32, which then tie), independent of the loss weights
    and of the box term. ``MODEL.OHEM.LOSS`` does not apply to it.
    """
    log_p = log_prob_of_true_label(inputs.predictions[0], inputs.gt_classes,
                                   inputs.box_predictor.use_sigmoid_ce)
    return -torch.expm1(log_p)  # 1 - p, exact for easy RoIs (p near 1)


def top_two_label_log_probs(scores, use_sigmoid_ce):
    """(R,), (R,): log-probabilities of the classifier's most probable and second most probable
    labels. Softmax: the two largest of log-softmax over the K + 1 classes. Sigmoid CE: label
    vectors of independent sigmoids, as :func:`log_prob_of_true_label`: the top one takes each
    class's likelier decision, sum_j log sigmoid(|s_j|); flipping decision j multiplies it by
    exp(-|s_j|), so the runner-up flips the least certain one."""
    scores = scores.float()
    if not use_sigmoid_ce:
        top = F.log_softmax(scores, dim=1).topk(2, dim=1).values
        return top[:, 0], top[:, 1]
    logits = scores[:, :-1]  # the last column is unused by sigmoid CE
    log_top = F.logsigmoid(logits.abs()).sum(dim=1)
    return log_top, log_top - logits.abs().min(dim=1).values


@OHEM_HARDNESS_REGISTRY.register()
def uncertainty(inputs: HardnessInputs):
    """1 - p(the classifier's most probable label) in [0, 1], label-free: how unsure the
    classifier is, whatever the RoI's label ("suspicious" RoIs, those whose top probability is low).
    Softmax: 1 - max softmax(scores), background included. Sigmoid CE: 1 - prod_j max(sigmoid(s_j),
    1 - sigmoid(s_j)), the probability that at least one of the K per-class decisions is wrong, with
    the same label vectors as ``probability``. Where the classifier's top label is the true one it
    equals ``probability``; otherwise it is smaller: a confidently *wrong* RoI (often a missing or
    wrong annotation) is easy here and hard for the loss, a look-alike the classifier hesitates
    over is hard here whatever its label.
    """
    log_top, _ = top_two_label_log_probs(inputs.predictions[0], inputs.box_predictor.use_sigmoid_ce)
    return -torch.expm1(log_top)


@OHEM_HARDNESS_REGISTRY.register()
def margin(inputs: HardnessInputs):
    """1 - (p_top1 - p_top2) in [0, 1], of the two most probable labels' probabilities (sigmoid CE: the
    second is the top label vector with its least certain decision flipped). Also label-free; near
    1 where the top two labels are close (a look-alike split between two classes, or between a
    class and background), however the rest of the probability is spread, where ``uncertainty``
    only says how low the top one is.
    """
    log_top, log_second = top_two_label_log_probs(inputs.predictions[0], inputs.box_predictor.use_sigmoid_ce)
    return 1.0 - torch.exp(log_top) * -torch.expm1(log_second - log_top)  # p1 * (1 - p2 / p1)


def registered_hardness():
    """The names ``MODEL.OHEM.HARDNESS`` accepts now, sorted."""
    return sorted(name for name, _ in OHEM_HARDNESS_REGISTRY)
