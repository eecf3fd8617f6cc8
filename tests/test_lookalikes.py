"""False positives on look-alikes, counted on hand-made detections and on a generated test set."""
import json

import pytest

from ohem_d2.experiments.lookalikes import (
    SCORE_THRESHOLD,
    iou_xywh,
    is_lookalike_false_positive,
    lookalike_false_positives,
    records_lookalikes,
)
from ohem_d2.data.synthetic import generate_synthetic_dataset

LOOKALIKE = [0.0, 0.0, 10.0, 20.0]  # x, y, w, h
OBJECT = [50.0, 50.0, 10.0, 10.0]


def make_test_set(lookalikes=(LOOKALIKE,), objects=(OBJECT,), empty_images=1):
    """Image 1 with ``lookalikes`` and ``objects``, then ``empty_images`` images with neither."""
    images = [{"id": 1, "distractors": [{"kind": "outline", "shape": "circle", "bbox": list(b)} for b in lookalikes]}]
    images += [{"id": 2 + i, "distractors": []} for i in range(empty_images)]
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": list(b)} for i, b in enumerate(objects)]
    return {"images": images, "annotations": annotations}


def detection(box, score=0.9, image_id=1):
    return {"image_id": image_id, "category_id": 1, "bbox": list(box), "score": score}


def test_iou_of_xywh_boxes():
    assert iou_xywh([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_xywh([0, 0, 10, 10], [10, 0, 10, 10]) == 0.0  # touching edges share no area
    assert iou_xywh([0, 0, 10, 10], LOOKALIKE) == 0.5  # 100 / (100 + 200 - 100)
    assert iou_xywh([5, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(50 / 150)


def test_a_confident_detection_on_a_lookalike_counts_per_image_of_the_test_set():
    counts = lookalike_false_positives([detection(LOOKALIKE), detection(OBJECT)], make_test_set(empty_images=3))
    assert counts == {"false_positives": 1, "images": 4, "lookalikes": 1, "per_image": 0.25,
                      "score_threshold": SCORE_THRESHOLD, "iou_threshold": 0.5}


def test_only_detections_at_or_above_the_score_threshold_count():
    detections = [detection(LOOKALIKE, 0.49), detection(LOOKALIKE, 0.5)]
    assert lookalike_false_positives(detections, make_test_set())["false_positives"] == 1
    assert lookalike_false_positives(detections, make_test_set(), score_threshold=0.3)["false_positives"] == 2


def test_iou_with_the_lookalike_counts_from_one_half_up():
    assert is_lookalike_false_positive([0, 0, 10, 10], [], [LOOKALIKE])  # IoU exactly 0.5
    assert not is_lookalike_false_positive([0, 0, 10, 9.9], [], [LOOKALIKE])  # IoU 0.495


def test_a_detection_that_matches_an_object_is_not_a_lookalike_error():
    # A look-alike overlapping an object: the detection has IoU >= 0.5 with both.
    overlapping = [0.0, 0.0, 10.0, 10.0]
    test_set = make_test_set(lookalikes=[overlapping], objects=[[0.0, 0.0, 10.0, 20.0]])
    counts = lookalike_false_positives([detection(overlapping)], test_set)
    assert counts["false_positives"] == 0


def test_an_object_overlap_just_below_one_half_does_not_excuse_the_detection():
    box = [0, 0, 10, 10]
    assert not is_lookalike_false_positive(box, [[0, 0, 10, 20]], [box])  # object IoU exactly 0.5: a match
    assert is_lookalike_false_positive(box, [[0, 0, 10, 20.5]], [box])  # object IoU 0.488: no match


def test_every_detection_on_a_lookalike_counts_duplicates_included():
    detections = [detection(LOOKALIKE, 0.9), detection(LOOKALIKE, 0.8), detection([0, 0, 10, 19], 0.7)]
    assert lookalike_false_positives(detections, make_test_set())["false_positives"] == 3


def test_detections_on_an_image_the_test_set_lacks_are_refused():
    with pytest.raises(ValueError, match="image id 99"):
        lookalike_false_positives([detection(LOOKALIKE, image_id=99)], make_test_set())


def test_a_test_set_records_lookalikes_when_its_images_carry_the_key_even_empty():
    assert records_lookalikes(make_test_set(lookalikes=[]))
    assert not records_lookalikes({"images": [{"id": 1}], "annotations": []})


def test_the_generators_lookalikes_are_counted_and_its_objects_are_not(tmp_path):
    ds = generate_synthetic_dataset(tmp_path / "data", num_train=1, num_val=6, image_size=64,
                                    distractor_prob=1.0, max_distractors=2)
    coco = json.loads(open(ds.val_json).read())
    on_lookalikes = [detection(d["bbox"], image_id=im["id"]) for im in coco["images"] for d in im["distractors"]]
    on_objects = [detection(a["bbox"], image_id=a["image_id"]) for a in coco["annotations"]]
    assert on_lookalikes and on_objects
    counts = lookalike_false_positives(on_lookalikes + on_objects, coco)
    assert counts["false_positives"] == counts["lookalikes"] == len(on_lookalikes)
    assert counts["images"] == 6
