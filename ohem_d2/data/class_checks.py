"""The classes of a run's datasets, against each other and against the model's number of classes.

Detectron2 numbers the classes of each dataset by that dataset's own list (``thing_classes``; a
COCO JSON's categories in the order of their ids) and compares neither the lists of a run's
datasets nor their length with the model's: a test set with the same names under other ids is
evaluated with its classes scrambled against the model's, and a head with fewer outputs than the
dataset has classes trains the others as background, without a word. These verdicts say so before
training, in the style of ``checks``: what is wrong, and the override or fix.
"""
from dataclasses import dataclass

from .scan import listed


@dataclass(frozen=True)
class ClassOutputs:
    """A head of the model that predicts classes, with its number of classes as the config sets it."""

    key: str  # the config key, e.g. MODEL.ROI_HEADS.NUM_CLASSES
    value: int
    default: int  # the key's default, Detectron2's (COCO's class count)
    override: str  # how to set the key, with {} for the number
    classes: str = "thing_classes"  # the metadata list of the classes it predicts (a semantic head: stuff_classes)


def judge_class_lists(class_lists, train):
    """Stops, as (dataset name, message): the datasets whose ``thing_classes`` (``class_lists``:
    {name: list, or None where unknown}) differ from those of the first training set, or of the
    first dataset where none trains."""
    known = {name: names for name, names in class_lists.items() if names is not None}
    reference = next((name for name in train if name in known), next(iter(known), None))
    which = "the first of DATASETS.TRAIN" if reference in train else "the first dataset of the run"
    stops = []
    for name, names in known.items():
        expected = known[reference]
        ids = [i for i in range(max(len(names), len(expected))) if _at(names, i) != _at(expected, i)]
        if not ids:
            continue
        if name in train:
            # get_detection_dataset_dicts raises on training sets whose thing_classes differ.
            fate = "Detectron2 would stop when it merges the training sets"
        else:
            first = ids[0]
            fate = (f"the evaluator would score the model's class {first} ({_at(expected, first)}) as class {first} "
                    f"of {name!r} ({_at(names, first)})")
        differing = listed(f"{i}: {_at(names, i)} vs {_at(expected, i)}" for i in ids)
        stops.append((name, f"its classes differ from those of {reference!r} ({which}): {name!r} has {names}, "
                            f"{reference!r} has {expected}; the class ids {differing} differ. Detectron2 numbers "
                            "the classes of each dataset by its own list (a COCO JSON's categories by id), so "
                            f"{fate}: give every dataset of the run the same class names in the same order (in "
                            "COCO JSON files, the same category id for each name)"))
    return stops


def judge_num_classes(classes, outputs):
    """(stops, warnings): how the number of classes of each head in ``outputs`` fits ``classes``
    ({"thing_classes": list, "stuff_classes": list} of the training set; a list may be absent)."""
    stops, warnings = [], []
    for head in outputs:
        names = classes.get(head.classes)
        if names is None or head.value == len(names):
            continue
        have, fix = len(names), head.override.format(len(names))
        if head.value < have:
            # The box predictor has no output for these; a class id equal to NUM_CLASSES is the
            # background label, a larger one is out of range in the losses.
            dropped = listed(f"{c!r} (id {i})" for i, c in enumerate(names) if i >= head.value)
            stops.append(f"it has {have} class(es), but {head.key} is {head.value}: the model would have no output "
                         f"for {dropped}, which Detectron2 would train as background or stop on; set {fix}")
            continue
        unseen = head.value - have
        ids = f"id {have}" if unseen == 1 else f"ids {have}-{head.value - 1}"
        if head.value == head.default:
            stops.append(f"it has {have} class(es), but {head.key} is {head.value}, its default (Detectron2's, for "
                         f"COCO), which the config leaves as it is: {unseen} of the model's output classes ({ids}) "
                         f"would never see an example; set {fix}")
        else:
            warnings.append(f"it has {have} class(es), but {head.key} is {head.value}: {unseen} of the model's output "
                            f"classes ({ids}) never see an example and only learn to say no; set {fix} unless "
                            "that is meant")
    return stops, warnings


def _at(names, i):
    return repr(names[i]) if i < len(names) else "(none)"
