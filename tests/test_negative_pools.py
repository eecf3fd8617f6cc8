"""Negative pools (issue 20): registration, the training loader keeping their images while
FILTER_EMPTY_ANNOTATIONS filters the others, the checks before training, and the tools' option."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from conftest import CONFIGS, REPO
from ohem_d2.data.datasets import (
    DatasetError,
    add_dataset_config,
    check_datasets,
    register_coco,
    register_datasets_from_config,
    register_negatives,
)
from ohem_d2.data.hard_images import add_hard_image_config
from ohem_d2.data.negatives import POOL_KEY, filter_except_pools


def image(path, size=(40, 30), colour=(90, 120, 150)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def pool_folder(tmp_path, count=3):
    for i in range(count):
        image(tmp_path / "pool" / f"bg_{i}.jpg", size=(40 + i, 30), colour=(10 * i, 20, 30))
    return str(tmp_path / "pool")


def positives(tmp_path):
    """A COCO dataset of two images, the second without annotations."""
    root = tmp_path / "pos"
    for name in ("a.jpg", "b.jpg"):
        image(root / "images" / name, colour=(200, 0, 0) if name == "a.jpg" else (0, 200, 0))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "train.json").write_text(json.dumps(coco))
    return register_coco(f"t_neg_pos_{tmp_path.name}", str(root / "train.json"), str(root / "images"))


def config(train, test=(), *opts):
    cfg = get_cfg()
    add_dataset_config(cfg)
    add_hard_image_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 1, *opts])
    return cfg


def stops(cfg):
    register_datasets_from_config(cfg)
    with pytest.raises(DatasetError) as error:
        check_datasets(cfg)
    stopping = str(error.value).split("\nWarnings")[0]
    return [line for line in stopping.splitlines() if line.startswith("- ")]


def test_a_folder_registers_as_records_without_annotations_with_the_files_sizes(tmp_path):
    name = register_negatives(f"t_neg_{tmp_path.name}", pool_folder(tmp_path))
    records = DatasetCatalog.get(name)
    assert [os.path.basename(r["file_name"]) for r in records] == ["bg_0.jpg", "bg_1.jpg", "bg_2.jpg"]
    assert [(r["width"], r["height"]) for r in records] == [(40, 30), (41, 30), (42, 30)]
    assert all(r["annotations"] == [] and r[POOL_KEY] == name for r in records)
    # A list file names the pool's images relative to its folder.
    (tmp_path / "pool" / "list.txt").write_text("# hard ones\nbg_2.jpg\n\nbg_0.jpg\nbg_2.jpg\n")  # bg_2 twice: once
    listed = register_negatives(f"t_neg_list_{tmp_path.name}", str(tmp_path / "pool" / "list.txt"))
    assert [os.path.basename(r["file_name"]) for r in DatasetCatalog.get(listed)] == ["bg_0.jpg", "bg_2.jpg"]


def test_filter_empty_drops_the_positives_empty_images_and_keeps_the_pool(tmp_path):
    pos = positives(tmp_path)
    pool = register_negatives(f"t_neg_{tmp_path.name}", pool_folder(tmp_path))
    dicts = get_detection_dataset_dicts([pos, pool], filter_empty=False)
    kept = filter_except_pools(dicts)
    assert [os.path.basename(d["file_name"]) for d in kept] == ["a.jpg", "bg_0.jpg", "bg_1.jpg", "bg_2.jpg"]
    # Without a pool, the same filter as Detectron2's.
    assert filter_except_pools(get_detection_dataset_dicts([pos], filter_empty=False)) == \
        get_detection_dataset_dicts([pos], filter_empty=True)


def test_the_trainer_trains_on_the_pool_images_with_filter_empty_on(tmp_path):
    from ohem_d2.engine.defaults import Trainer

    pos = positives(tmp_path)
    pool = register_negatives(f"t_neg_{tmp_path.name}", pool_folder(tmp_path))
    cfg = config([pos, pool], (), "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 4,
                 "DATALOADER.ASPECT_RATIO_GROUPING", False, "INPUT.MIN_SIZE_TRAIN", (30,))
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    loader = Trainer.build_train_loader(cfg)
    assert loader.sampler._size == 4  # a.jpg and the 3 pool images; b.jpg (no annotations) filtered
    batch = next(iter(loader))
    assert sorted(len(d["instances"]) for d in batch) in ([0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1])


def keypoint_positives(tmp_path):
    """A COCO person-keypoint dataset of three images: 2 visible keypoints, 1, none annotated."""
    root = tmp_path / "kp"
    names = ("a.jpg", "b.jpg", "c.jpg")
    for name in names:
        image(root / "images" / name)
    points = {1: [5, 5, 2, 8, 8, 2], 2: [5, 5, 2, 8, 8, 0], 3: [0, 0, 0, 0, 0, 0]}
    coco = {"images": [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(names, 1)],
            "annotations": [{"id": i, "image_id": i, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0,
                             "keypoints": points[i], "num_keypoints": sum(v > 0 for v in points[i][2::3])}
                            for i in points],
            "categories": [{"id": 1, "name": "person", "keypoints": ["left", "right"]}]}
    (root / "train.json").write_text(json.dumps(coco))
    name = register_coco(f"t_neg_kp_{tmp_path.name}", str(root / "train.json"), str(root / "images"))
    MetadataCatalog.get(name).set(keypoint_names=("left", "right"), keypoint_flip_map=(("left", "right"),))
    return name


def test_a_keypoint_model_keeps_the_pool_and_filters_the_positives_by_keypoints(tmp_path):
    """MIN_KEYPOINTS_PER_IMAGE filtered the pool away (it has no keypoints), and Detectron2's keypoint
    mapper stopped on the pool's missing keypoint names."""
    from ohem_d2.engine.defaults import Trainer

    pos = keypoint_positives(tmp_path)
    pool = register_negatives(f"t_neg_{tmp_path.name}", pool_folder(tmp_path))
    cfg = config([pos, pool], (), "MODEL.KEYPOINT_ON", True, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 2,
                 "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE", 2, "DATALOADER.NUM_WORKERS", 0,
                 "SOLVER.IMS_PER_BATCH", 4, "DATALOADER.ASPECT_RATIO_GROUPING", False, "INPUT.MIN_SIZE_TRAIN", (30,))
    loader = Trainer.build_train_loader(cfg)
    assert loader.sampler._size == 4  # a.jpg (2 visible keypoints) and the 3 pool images
    batch = next(iter(loader))
    assert sorted(len(d["instances"]) for d in batch) in ([0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1])
    assert all(d["instances"].has("gt_keypoints") for d in batch if len(d["instances"]))
    dicts = get_detection_dataset_dicts([pos, pool], filter_empty=False)
    assert [os.path.basename(d["file_name"]) for d in filter_except_pools(dicts, min_keypoints=1)] == \
        ["a.jpg", "b.jpg", "bg_0.jpg", "bg_1.jpg", "bg_2.jpg"]


def test_the_runner_stops_on_a_held_out_pool_sharing_images_with_the_training_pool(tmp_path):
    from ohem_d2.experiments.negative_pools import HELD_OUT_POOL, TRAIN_POOL, check_pools

    pos = positives(tmp_path)
    mined = pool_folder(tmp_path)
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    shutil.copy(os.path.join(mined, "bg_1.jpg"), held_out / "copy.jpg")  # the same bytes under another name
    image(held_out / "other.jpg", colour=(1, 2, 3))
    register_negatives(TRAIN_POOL, mined)
    register_negatives(HELD_OUT_POOL, str(held_out))
    with pytest.raises(DatasetError) as error:
        check_pools([pos], {TRAIN_POOL: mined, HELD_OUT_POOL: str(held_out)})
    assert str(error.value).splitlines()[1] == (
        f"- --held-out-negatives {held_out}: 1 of its images are also in --negatives {mined} ({held_out}/copy.jpg): "
        "a held-out pool must hold images nothing trains on; remove them")


def test_checks_stop_on_an_empty_pool_an_unreadable_image_and_a_missing_folder(tmp_path):
    pos = positives(tmp_path)
    empty = register_negatives(f"t_neg_empty_{tmp_path.name}", str((tmp_path / "empty").mkdir() or tmp_path / "empty"))
    (line,) = stops(config([pos, empty]))
    assert f"dataset '{empty}'" in line and "holds no image files" in line
    folder = pool_folder(tmp_path)
    (tmp_path / "pool" / "broken.jpg").write_bytes(b"not a jpeg")
    broken = register_negatives(f"t_neg_broken_{tmp_path.name}", folder)
    (line,) = stops(config([pos, broken]))
    assert "1 of its 4 images cannot be read by Detectron2 (broken.jpg: unreadable" in line
    gone = register_negatives(f"t_neg_gone_{tmp_path.name}", str(tmp_path / "nowhere"))
    (line,) = stops(config([pos, gone]))
    assert "does not exist" in line


def test_checks_stop_on_pool_images_that_are_training_positives(tmp_path):
    pos = positives(tmp_path)
    folder = pool_folder(tmp_path)
    shutil.copy(tmp_path / "pos" / "images" / "a.jpg", tmp_path / "pool" / "copy_of_a.jpg")
    pool = register_negatives(f"t_neg_{tmp_path.name}", folder)
    (line,) = stops(config([pos, pool]))
    assert "1 of its 4 images are also training positives" in line and "copy_of_a.jpg" in line


def test_a_pool_in_the_test_set_or_with_another_sampler_stops(tmp_path):
    pos = positives(tmp_path)
    pool = register_negatives(f"t_neg_{tmp_path.name}", pool_folder(tmp_path))
    (line,) = stops(config([pos], [pool]))
    assert "no objects to measure AP on" in line
    (line,) = stops(config([pos, pool], (), "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"))
    assert "drops images without annotations" in line
    # Detectron2's own samplers keep them where nothing filters empty images.
    assert all(pool not in w for w in check_datasets(config([pos, pool], (), "DATALOADER.SAMPLER_TRAIN",
                                                            "RepeatFactorTrainingSampler",
                                                            "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)))
    # A valid pool beside valid positives passes, and its class list (none) does not clash.
    assert all(pool not in warning for warning in check_datasets(config([pos, pool])))


def test_train_net_takes_register_negatives_and_stops_on_a_bad_pool_before_training(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
         str(CONFIGS / "Synthetic-Detection" / "faster_rcnn_R_18_FPN_scratch.yaml"),
         "--register-negatives", "bad_pool", str(tmp_path / "missing"),
         "DATASETS.TRAIN", "('bad_pool',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in done.stderr and any("bad_pool" in line and "does not exist" in line
                                                  for line in (done.stderr + done.stdout).splitlines()), errors
    assert not out.exists() or not any(out.glob("model_*.pth"))
