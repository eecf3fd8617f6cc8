"""Datasets registered from the config, and the checks that stop a run before training when a
dataset cannot be loaded. Each test registers its own names: DatasetCatalog is global."""
import json
import os

import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from conftest import require_coco128
from ohem_d2.data.datasets import (
    DatasetError,
    add_dataset_config,
    check_datasets,
    register_coco,
    register_datasets_from_config,
    register_voc,
)

VOC_OBJECTS = {  # image id -> [(name, xmin, ymin, xmax, ymax)] in VOC's 1-based pixels
    "img1": [("cat", 3, 4, 20, 18)],
    "img2": [("dog", 10, 2, 30, 22), ("cat", 1, 1, 8, 9)],
}


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch):
    """Each test's dataset checks are cached in its own folder, not in the user's cache."""
    monkeypatch.setenv("OHEM_D2_CACHE", str(tmp_path / "check_cache"))


def make_cfg(train=(), test=(), coco=(), voc=(), num_classes=1):
    cfg = get_cfg()
    add_dataset_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.DATASETS.REGISTER_COCO, cfg.DATASETS.REGISTER_VOC = list(coco), list(voc)
    return cfg


def check_fails(*patterns, **cfg_kwargs):
    """check_datasets raises, and its message contains every pattern."""
    cfg = make_cfg(**cfg_kwargs)
    register_datasets_from_config(cfg)
    with pytest.raises(DatasetError) as error:
        check_datasets(cfg)
    for pattern in patterns:
        assert pattern in str(error.value)
    return str(error.value)


def write_coco(root, images=(("a.jpg", 1), ("b.jpg", 2)), category_ids=(1,), write_images=True):
    os.makedirs(root / "images", exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (file_name, num_boxes) in enumerate(images, start=1):
        coco["images"].append({"id": image_id, "file_name": file_name, "width": 40, "height": 30})
        if write_images:
            Image.new("RGB", (40, 30), (90, 120, 150)).save(root / "images" / file_name)
        for k in range(num_boxes):
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "bbox": [2 + 5 * k, 3, 10, 8],
                "category_id": category_ids[k % len(category_ids)], "area": 80, "iscrowd": 0,
            })
    (root / "train.json").write_text(json.dumps(coco))
    return str(root / "train.json"), str(root / "images")


def write_voc(root, objects=VOC_OBJECTS, split="train", evaluator_fields=True):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(root / sub, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in objects))
    extra = "<pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
    for image_id, boxes in objects.items():
        Image.new("RGB", (40, 30), (200, 100, 50)).save(root / "JPEGImages" / f"{image_id}.jpg")
        xml = "".join(
            f"<object><name>{name}</name>{extra if evaluator_fields else ''}<bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for name, x0, y0, x1, y1 in boxes
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>40</width><height>30</height><depth>3</depth></size>{xml}</annotation>"
        )
    return str(root)


def test_config_keys_default_empty_and_accept_yaml_and_command_line(tmp_path):
    cfg = make_cfg()
    assert get_cfg().DATASETS.get("REGISTER_COCO") is None
    add_dataset_config(cfg)
    assert cfg.DATASETS.REGISTER_COCO == [] and cfg.DATASETS.REGISTER_VOC == []
    cfg.merge_from_list(["DATASETS.REGISTER_COCO", "[['my_train', 'a.json', 'imgs']]"])
    assert cfg.DATASETS.REGISTER_COCO == [["my_train", "a.json", "imgs"]]
    yaml = tmp_path / "c.yaml"
    yaml.write_text("DATASETS:\n  REGISTER_VOC: [[my_voc, /data/voc, trainval, 'cat,dog']]\n")
    cfg.merge_from_file(str(yaml))
    assert cfg.DATASETS.REGISTER_VOC == [["my_voc", "/data/voc", "trainval", "cat,dog"]]


def test_bad_config_entry_names_its_form():
    with pytest.raises(DatasetError, match=r"REGISTER_COCO entry \['x', 'y'\] is not of the form"):
        register_datasets_from_config(make_cfg(coco=[["x", "y"]]))


def test_coco_dataset_from_the_config_loads_and_reregistering_is_a_no_op(tmp_path):
    json_file, image_root = write_coco(tmp_path)
    cfg = make_cfg(train=["t_coco_ok"], test=["t_coco_ok"], coco=[["t_coco_ok", json_file, image_root]])
    assert register_datasets_from_config(cfg) == ["t_coco_ok"]
    assert register_datasets_from_config(cfg) == ["t_coco_ok"]
    check_datasets(cfg)
    records = DatasetCatalog.get("t_coco_ok")
    assert [len(r["annotations"]) for r in records] == [1, 2]
    assert records[1]["annotations"][1]["bbox"] == [7, 3, 10, 8]
    assert records[0]["file_name"] == os.path.join(image_root, "a.jpg")
    with pytest.raises(DatasetError, match="'t_coco_ok' is already registered to a different dataset"):
        register_coco("t_coco_ok", json_file, str(tmp_path))


def test_voc_dataset_with_own_classes_loads_and_evaluates(tmp_path):
    dirname = write_voc(tmp_path)
    cfg = make_cfg(train=["t_voc_ok"], test=["t_voc_ok"], voc=[["t_voc_ok", dirname, "train", "cat, dog"]],
                   num_classes=2)
    register_datasets_from_config(cfg)
    check_datasets(cfg)
    meta = MetadataCatalog.get("t_voc_ok")
    assert meta.thing_classes == ["cat", "dog"] and meta.evaluator_type == "pascal_voc"
    records = DatasetCatalog.get("t_voc_ok")
    assert [a["category_id"] for a in records[1]["annotations"]] == [1, 0]
    assert records[0]["annotations"][0]["bbox"] == [2, 3, 20, 18]  # 1-based corners -> 0-based
    assert records[0]["annotations"][0]["bbox_mode"] == BoxMode.XYXY_ABS

    # Detectron2's VOC evaluator accepts the registration: ground truth as predictions scores 100.
    evaluator = PascalVOCDetectionEvaluator("t_voc_ok")
    evaluator.reset()
    for r in records:
        instances = Instances((r["height"], r["width"]))
        instances.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in r["annotations"]], dtype=torch.float32))
        instances.scores = torch.ones(len(r["annotations"]))
        instances.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
        evaluator.process([{"image_id": r["image_id"]}], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP50"] == pytest.approx(100.0)


def test_coco128_registers_and_loads(tmp_path):
    coco128 = require_coco128()
    register_coco("t_coco128_val", coco128 / "annotations" / "instances_val2017.json", coco128 / "val2017")
    cfg = make_cfg(test=["t_coco128_val"])
    check_datasets(cfg)
    records = DatasetCatalog.get("t_coco128_val")
    assert len(records) > 0 and all(os.path.isfile(r["file_name"]) for r in records[:5])
    assert len(MetadataCatalog.get("t_coco128_val").thing_classes) == 80


def test_unknown_name_lists_close_matches_and_how_to_register():
    message = check_fails("'coco_2017_train'", "--register-coco NAME JSON IMAGE_ROOT",
                          "DATASETS.REGISTER_COCO", train=["coco_2017_trian"])
    assert "no dataset of this name is registered" in message


def test_builtin_dataset_without_files_points_to_detectron2_datasets():
    for name in ("coco_2017_val", "voc_2007_test"):
        meta = MetadataCatalog.get(name)
        if os.path.exists(meta.get("json_file", None) or meta.dirname):
            pytest.skip(f"the builtin {name} is installed here")
    message = check_fails("set DETECTRON2_DATASETS", "instances_val2017.json does not exist",
                          "VOC2007 does not exist", train=["coco_2017_val"], test=["voc_2007_test"])
    assert message.startswith("2 dataset(s)")  # both datasets reported at once


def test_missing_coco_files(tmp_path):
    check_fails(f"annotation file {tmp_path / 'no.json'} does not exist",
                f"image folder {tmp_path / 'no_images'} does not exist",
                coco=[["t_coco_missing", str(tmp_path / "no.json"), str(tmp_path / "no_images")]],
                train=["t_coco_missing"])


def test_invalid_json_reports_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    check_fails("bad.json is not valid JSON", "line 2, column 12",
                coco=[["t_coco_badjson", str(tmp_path / "bad.json"), str(tmp_path)]], train=["t_coco_badjson"])


def test_json_that_is_not_coco_instances(tmp_path):
    (tmp_path / "captions.json").write_text('{"images": [], "captions": []}')
    check_fails("not a COCO instances file: it lacks the list(s) annotations, categories",
                coco=[["t_coco_notcoco", str(tmp_path / "captions.json"), str(tmp_path)]],
                test=["t_coco_notcoco"])


def test_images_missing_from_the_image_root_and_undefined_categories(tmp_path):
    json_file, image_root = write_coco(tmp_path, category_ids=(1, 7), write_images=False)
    check_fails("2 of the 2 images", "a.jpg, b.jpg", "category ids 7 that its 'categories' do not define",
                coco=[["t_coco_noimages", json_file, image_root]], train=["t_coco_noimages"])


def test_voc_folder_without_the_voc_layout(tmp_path):
    os.makedirs(tmp_path / "Annotations")
    check_fails("lacks JPEGImages/, ImageSets/Main/trainval.txt",
                voc=[["t_voc_layout", str(tmp_path), "trainval", "cat"]], train=["t_voc_layout"])


def test_voc_object_names_missing_from_the_class_names_and_class_names_never_used(tmp_path):
    dirname = write_voc(tmp_path)
    check_fails("not among the class names ['cat', 'dgo']: dog", "class names dgo never occur",
                voc=[["t_voc_classes", dirname, "train", "cat,dgo"]], train=["t_voc_classes"])


def test_voc_broken_xml_and_missing_jpeg(tmp_path):
    dirname = write_voc(tmp_path)
    (tmp_path / "Annotations" / "img1.xml").write_text("<annotation><size>\n<width>40</size>")
    os.remove(tmp_path / "JPEGImages" / "img2.jpg")
    check_fails("JPEGImages/img2.jpg: missing", "Annotations/img1.xml: not valid XML (line 2, column",
                voc=[["t_voc_broken", dirname, "train", "cat,dog"]], train=["t_voc_broken"])


def test_voc_split_with_one_image(tmp_path):
    dirname = write_voc(tmp_path, objects={"img1": VOC_OBJECTS["img1"]})
    check_fails("train.txt lists 1 image(s); Detectron2's VOC loader needs at least 2",
                voc=[["t_voc_one", dirname, "train", "cat"]], train=["t_voc_one"])


def test_voc_class_list_with_an_empty_name(tmp_path):
    with pytest.raises(DatasetError, match=r"the class names \['cat', '', 'dog'\] contain an empty"):
        register_voc("t_voc_empty_class", write_voc(tmp_path), "train", "cat,,dog".split(","))


def test_voc_test_set_needs_the_evaluator_fields(tmp_path):
    dirname = write_voc(tmp_path, evaluator_fields=False)
    cfg = make_cfg(train=["t_voc_noeval"], voc=[["t_voc_noeval", dirname, "train", "cat,dog"]], num_classes=2)
    register_datasets_from_config(cfg)
    check_datasets(cfg)  # training reads only names and boxes
    check_fails("lack what the VOC evaluator reads",
                "Annotations/img1.xml: object 'cat' lacks pose, truncated, difficult",
                "leave this dataset out of DATASETS.TEST", test=["t_voc_noeval"])
