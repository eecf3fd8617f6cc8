"""False positives on look-alikes: the error OHEM is meant to reduce, counted directly.

AP mixes every kind of error. The synthetic generator (``ohem_d2/data/synthetic.py``) draws
unlabelled look-alikes ("distractors": outlines of the class shapes, class shapes in a colour
outside every class range, other shapes in a class colour) and records each one, without
annotating it, as ``{"kind", "shape", "bbox": [x, y, w, h]}`` under its image's ``"distractors"``
key in the COCO JSON. Counting the confident detections that land on them measures whether a
detector learned to reject hard negatives, which is what mining hard examples should teach.

A detection is a false positive on a look-alike when all of these hold:

* its score is at least ``score_threshold`` (default ``SCORE_THRESHOLD``);
* its box overlaps the box of a look-alike of its image with IoU >= ``iou_threshold``;
* its box matches no annotated object of its image: IoU < ``iou_threshold`` with every one,
  whatever the class (a detection on an object is not a look-alike error, at worst a class error).

Each such detection counts once, also when several land on the same look-alike (as a duplicate
or with another class): each one is a false positive in the COCO sense too. The rate is per
image of the test JSON, images without look-alikes included.

Everything here works on the JSON structures (the detections of Detectron2's COCOEvaluator,
``coco_instances_results.json``, and the test set's COCO dict); nothing reads files.
"""

# A detection this confident would be shown to a user; 0.5 is the usual operating point and
# far above Detectron2's default test threshold (0.05), so the low-score tail that AP also
# integrates over does not dominate the count.
SCORE_THRESHOLD = 0.5
# The usual overlap for "the same object" (PASCAL VOC and AP50), for look-alikes and objects alike.
IOU_THRESHOLD = 0.5


def iou_xywh(a, b):
    """Intersection over union of two ``[x, y, w, h]`` boxes (COCO's box format)."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    intersection = max(width, 0.0) * max(height, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - intersection
    return intersection / union if union > 0 else 0.0


def records_lookalikes(coco):
    """Whether a COCO dict says where its look-alikes are: some image has a ``"distractors"``
    key (the generator writes one on every image, empty where it drew none)."""
    return any("distractors" in image for image in coco.get("images", []))


def is_lookalike_false_positive(box, object_boxes, lookalike_boxes, iou_threshold=IOU_THRESHOLD):
    """Whether a detection ``box`` lies on a look-alike and on no annotated object (all boxes
    ``[x, y, w, h]``); its score is checked by the caller."""
    if any(iou_xywh(box, other) >= iou_threshold for other in object_boxes):
        return False
    return any(iou_xywh(box, other) >= iou_threshold for other in lookalike_boxes)


def boxes_per_image(coco):
    """``({image id: annotated boxes}, {image id: look-alike boxes})`` of a COCO dict, with an
    entry for every image."""
    objects = {image["id"]: [] for image in coco["images"]}
    lookalikes = {image["id"]: [d["bbox"] for d in image.get("distractors", [])] for image in coco["images"]}
    for annotation in coco.get("annotations", []):
        objects[annotation["image_id"]].append(annotation["bbox"])
    return objects, lookalikes


def lookalike_false_positives(detections, coco, score_threshold=SCORE_THRESHOLD, iou_threshold=IOU_THRESHOLD):
    """Count the false positives on look-alikes of ``detections`` (COCO results: dicts with
    ``image_id``, ``bbox`` [x, y, w, h], ``score``) against the test set ``coco``.

    Returns the counts and the rate per image, with the thresholds they were counted at. A
    detection on an image the test set does not have raises ``ValueError``: the detections were
    made on another dataset (or another version of it), and any count would be meaningless.
    """
    objects, lookalikes = boxes_per_image(coco)
    false_positives = 0
    for detection in detections:
        image_id = detection["image_id"]
        if image_id not in objects:
            raise ValueError(f"a detection is on image id {image_id!r}, which the test set does not have")
        if detection["score"] >= score_threshold and is_lookalike_false_positive(
            detection["bbox"], objects[image_id], lookalikes[image_id], iou_threshold
        ):
            false_positives += 1
    images = len(objects)
    return {
        "false_positives": false_positives,
        "images": images,
        "lookalikes": sum(len(boxes) for boxes in lookalikes.values()),
        "per_image": false_positives / images if images else None,
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
    }
