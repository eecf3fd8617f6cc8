"""The synthetic dataset: deterministic, valid COCO for Detectron2, distractors left unlabelled,
and never silently overwritten."""
import inspect
import json

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygons_to_bitmask

from ohem_d2.data.datasets import DatasetError
from ohem_d2.data.synthetic import (
    CLASS_NAMES,
    DISTRACTOR_KINDS,
    SyntheticDatasetError,
    generate_synthetic_dataset,
    register_synthetic_dataset,
)

SMALL = {"num_train": 6, "num_val": 3, "image_size": 64}


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = generate_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    c = generate_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    for split in ("train", "val"):
        assert file_bytes(tmp_path / "a" / split) == file_bytes(tmp_path / "b" / split)
        assert file_bytes(tmp_path / "a" / split) != file_bytes(tmp_path / "c" / split)
    assert read(a.train_json) == read(b.train_json) != read(c.train_json)


def test_more_train_images_keep_the_existing_ones_and_the_val_split(tmp_path):
    small = generate_synthetic_dataset(tmp_path / "small", num_train=3, num_val=2, image_size=64)
    large = generate_synthetic_dataset(tmp_path / "large", num_train=5, num_val=2, image_size=64)
    assert read(small.val_json)["annotations"] == read(large.val_json)["annotations"]
    small_train = file_bytes(tmp_path / "small" / "train")
    large_train = file_bytes(tmp_path / "large" / "train")
    assert {k: large_train[k] for k in small_train} == small_train


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_detectron2_reads_the_coco_json_with_correct_boxes_and_masks(tmp_path):
    ds = generate_synthetic_dataset(tmp_path, noise_std=0.0, clutter_per_image=(0, 0),
                                    distractor_prob=0.0, **SMALL)
    coco = read(ds.train_json)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    records = load_coco_json(ds.train_json, ds.train_images, "synthetic_test_read")
    assert MetadataCatalog.get("synthetic_test_read").thing_classes == list(CLASS_NAMES)
    assert len(records) == SMALL["num_train"]
    assert sum(len(r["annotations"]) for r in records) == len(coco["annotations"]) > 0
    for record in records:
        pixels = np.asarray(Image.open(record["file_name"]).convert("HSV"))
        assert pixels.shape[:2] == (record["height"], record["width"]) == (64, 64)
        originals = [a for a in coco["annotations"] if a["image_id"] == record["image_id"]]
        for ann, original in zip(record["annotations"], originals, strict=True):
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["bbox"] == original["bbox"]
            assert ann["category_id"] == original["category_id"] - 1  # contiguous, from 0
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
            polygon = np.array(ann["segmentation"][0]).reshape(-1, 2)
            assert np.allclose(polygon.min(0), [x, y], atol=0.02)
            assert np.allclose(polygon.max(0), [x + w, y + h], atol=0.02)
            # The mask lies on the drawn object: class colours are saturated, the background not.
            mask = polygons_to_bitmask([polygon.ravel()], 64, 64)
            assert (pixels[..., 1][mask] > 115).mean() > 0.95
            assert original["iscrowd"] == 0 and original["area"] == pytest.approx(mask.sum(), rel=0.2)


def test_distractors_are_recorded_and_never_annotated(tmp_path):
    ds = generate_synthetic_dataset(tmp_path / "hard", distractor_prob=1.0, max_distractors=2,
                                    num_train=20, num_val=2, image_size=96)
    coco = read(ds.train_json)
    distractors = [d for image in coco["images"] for d in image["distractors"]]
    assert {d["kind"] for d in distractors} == set(DISTRACTOR_KINDS)
    assert len(distractors) > 30  # two per image unless no free spot was left
    labelled = {(a["image_id"], tuple(a["bbox"])) for a in coco["annotations"]}
    assert not labelled & {(image["id"], tuple(d["bbox"])) for image in coco["images"]
                           for d in image["distractors"]}
    assert all(d["shape"] in CLASS_NAMES for d in distractors if d["kind"] != "other_shape")
    assert all(d["shape"] not in CLASS_NAMES for d in distractors if d["kind"] == "other_shape")

    easy = generate_synthetic_dataset(tmp_path / "easy", distractor_prob=0.0, **SMALL)
    assert all(not image["distractors"] for image in read(easy.train_json)["images"])


def test_settings_json_records_every_generator_setting(tmp_path):
    ds = generate_synthetic_dataset(tmp_path, seed=7, objects_per_image=(2, 3), **SMALL)
    on_disk = read(tmp_path / "settings.json")
    knobs = set(inspect.signature(generate_synthetic_dataset).parameters) - {"root", "overwrite"}
    assert knobs <= set(on_disk)
    assert on_disk == ds.settings and on_disk["seed"] == 7 and on_disk["objects_per_image"] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "settings.json", "train", "val"]


def test_same_settings_reuse_the_files_other_settings_are_refused(tmp_path):
    first = generate_synthetic_dataset(tmp_path, **SMALL)
    png = tmp_path / "train" / "000001.png"
    stamp = png.stat().st_mtime_ns
    assert generate_synthetic_dataset(tmp_path, **SMALL) == first
    assert png.stat().st_mtime_ns == stamp

    with pytest.raises(SyntheticDatasetError, match=r"num_train: 6 on disk, 4 requested.*overwrite=True"):
        generate_synthetic_dataset(tmp_path, **{**SMALL, "num_train": 4})
    assert len(read(first.train_json)["images"]) == 6 and png.stat().st_mtime_ns == stamp

    second = generate_synthetic_dataset(tmp_path, overwrite=True, **{**SMALL, "num_train": 4})
    assert len(read(second.train_json)["images"]) == 4
    assert len(list((tmp_path / "train").iterdir())) == 4
    assert read(tmp_path / "settings.json")["num_train"] == 4


@pytest.mark.parametrize("knob", [
    {"object_size": (0.5, 0.1)}, {"distractor_prob": 1.5}, {"distractor_kinds": ("blurry",)},
    {"objects_per_image": (1,)},
])
def test_invalid_settings_are_refused(tmp_path, knob):
    with pytest.raises(SyntheticDatasetError, match=next(iter(knob))):
        generate_synthetic_dataset(tmp_path, **SMALL, **knob)


def test_register_is_idempotent_and_refuses_a_different_dataset(tmp_path):
    ds = generate_synthetic_dataset(tmp_path / "a", **SMALL)
    names = register_synthetic_dataset(ds, prefix="synthetic_test_register")
    assert names == ("synthetic_test_register_train", "synthetic_test_register_val")
    assert register_synthetic_dataset(ds, prefix="synthetic_test_register") == names
    assert len(DatasetCatalog.get(names[0])) == 6 and len(DatasetCatalog.get(names[1])) == 3
    assert MetadataCatalog.get(names[1]).evaluator_type == "coco"

    other = generate_synthetic_dataset(tmp_path / "b", **SMALL)
    with pytest.raises(DatasetError, match="already registered to a different dataset"):
        register_synthetic_dataset(other, prefix="synthetic_test_register")
