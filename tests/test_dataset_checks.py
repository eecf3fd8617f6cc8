"""The pre-training check on real-world annotation defects, COCO JSON and VOC folders alike: each
defect stops the run or is a warning, with a message that says what, how many, where and how to
go on; DATASETS.SIZES_FROM_IMAGES; the evaluator types train_net can use; the cache.

Every test writes its own small dataset (real image files, a few pixels) under tmp_path and
registers it under a name of its own: DatasetCatalog is global."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.detection_utils import check_image_size, read_image

from conftest import require_coco128
from ohem_d2.data import scan as dataset_scan
from ohem_d2.data import scan_cache
from ohem_d2.data.datasets import (
    EVALUABLE_TYPES,
    DatasetError,
    add_dataset_config,
    check_datasets,
    register_coco,
    register_datasets_from_config,
    register_voc,
    take_sizes_from_image_files,
)


@pytest.fixture(autouse=True)
def check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OHEM_D2_CACHE", str(tmp_path / "check_cache"))
    return tmp_path / "check_cache"


def write_image(path, size=(40, 30), orientation=None, noise=False):
    """A small JPEG or PNG (by the suffix) of ``size`` pixels, with an EXIF orientation if given;
    ``noise``: random pixels, whose compressed data is long enough to be cut into."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exif = Image.Exif()
    if orientation:
        exif[274] = orientation
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("RGB", size, (90, 120, 150))
    image.save(path, exif=exif.tobytes())


def write_coco(root, images, annotations=(), categories=({"id": 1, "name": "thing"},)):
    """``images``: (file_name, annotated (w, h), file (w, h) or None for no file, EXIF orientation);
    ``annotations``: (image index, bbox) or full annotation dicts. Returns (json_file, image_root)."""
    coco = {"images": [], "annotations": [], "categories": list(categories)}
    for index, (file_name, annotated, file_size, orientation) in enumerate(images):
        coco["images"].append({"id": index + 1, "file_name": file_name, "width": annotated[0], "height": annotated[1]})
        if file_size:
            write_image(root / "images" / file_name, file_size, orientation)
    for a in annotations:
        if not isinstance(a, dict):
            a = {"image_id": a[0] + 1, "bbox": a[1], "category_id": 1, "iscrowd": 0}
        coco["annotations"].append({"id": len(coco["annotations"]) + 1, **a})
    os.makedirs(root / "images", exist_ok=True)
    (root / "train.json").write_text(json.dumps(coco))
    return str(root / "train.json"), str(root / "images")


def ok_image(file_name):
    return (file_name, (40, 30), (40, 30), None)


def write_voc(root, images, split="train"):
    """``images``: {id: (xml <size> (w, h) or None, file (w, h) or None, objects)}, each object
    (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixels."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(root / sub, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    for image_id, (xml_size, file_size, objects) in images.items():
        if file_size:
            write_image(root / "JPEGImages" / f"{image_id}.jpg", file_size)
        size = f"<size><width>{xml_size[0]}</width><height>{xml_size[1]}</height></size>" if xml_size else ""
        xml = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object>"
            for name, x0, y0, x1, y1, difficult in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{size}{xml}</annotation>")
    return str(root)


def make_cfg(train=(), test=(), *opts):
    """A config of these datasets, for a model of one class (as the datasets below have) unless
    ``opts`` say otherwise."""
    cfg = get_cfg()
    add_dataset_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 1, *opts])
    return cfg


def unique_name(tmp_path, suffix=""):
    return f"t_checks_{tmp_path.name}{suffix}"


def coco_dataset(tmp_path, images, annotations=(), **kwargs):
    return register_coco(unique_name(tmp_path), *write_coco(tmp_path, images, annotations, **kwargs))


def stop_message(train=(), test=(), *opts):
    cfg = make_cfg(train, test, *opts)
    register_datasets_from_config(cfg)
    with pytest.raises(DatasetError) as error:
        check_datasets(cfg)
    return str(error.value)


def warnings_of(train=(), test=(), *opts):
    cfg = make_cfg(train, test, *opts)
    register_datasets_from_config(cfg)
    return "\n".join(check_datasets(cfg))


def the_line(message, start):
    """The one message line (problem) that contains ``start``."""
    (line,) = [line for line in message.splitlines() if start in line]
    return line


# Row 1: image sizes in the annotations that differ from the image files.

MISMATCHED = [
    ("off.jpg", (40, 30), (41, 30), None),  # an export tool's rounding
    ("exif.jpg", (40, 30), (40, 30), 6),  # Detectron2 rotates it by EXIF: 30x40
    ("swapped.jpg", (30, 40), (40, 30), None),
    ("other.jpg", (80, 60), (40, 30), None),  # boxes of another resolution?
    ok_image("fine.jpg"),
    ("mirrored.jpg", (40, 30), (40, 30), 2),  # EXIF flip: same size
]


def test_image_sizes_that_differ_from_the_files_stop_with_their_kind(tmp_path):
    name = coco_dataset(tmp_path, MISMATCHED, [(i, [2, 2, 10, 10]) for i in range(len(MISMATCHED))])
    line = the_line(stop_message([name]), "have a width/height in the annotations that differs")
    assert f"dataset '{name}': 4 of the 6 images of {tmp_path / 'train.json'} have a width/height" in line
    for part in ("1 off by 1-2 px (off.jpg: annotated 40x30, file 41x30)",
                 "1 with width and height swapped by the file's EXIF orientation "
                 "(exif.jpg: annotated 40x30, file 30x40 after EXIF orientation 6)",
                 "1 with width and height swapped, without EXIF rotation (swapped.jpg: annotated 30x40, file 40x30)",
                 "1 of another size (other.jpg: annotated 80x60, file 40x30)",
                 "Detectron2 would stop at the first of them it loads (SizeMismatchError)",
                 "set DATASETS.SIZES_FROM_IMAGES True", "remove the EXIF orientation tag"):
        assert part in line
    assert "fine.jpg" not in line and "mirrored.jpg" not in line


def test_sizes_from_images_makes_it_a_warning_and_gives_the_records_the_file_sizes(tmp_path):
    name = coco_dataset(tmp_path, MISMATCHED, [(i, [2, 2, 10, 10]) for i in range(len(MISMATCHED))])
    warnings = warnings_of([name], [], "DATASETS.SIZES_FROM_IMAGES", True)
    assert "4 of the 6 images" in warnings and "their sizes are taken from the image files" in warnings
    assert "check a few of those swapped or of another size" in warnings
    records = DatasetCatalog.get(name)
    assert {os.path.basename(r["file_name"]): (r["width"], r["height"]) for r in records} == {
        "off.jpg": (41, 30), "exif.jpg": (30, 40), "swapped.jpg": (40, 30), "other.jpg": (40, 30),
        "fine.jpg": (40, 30), "mirrored.jpg": (40, 30)}
    for record in records:  # what Detectron2's DatasetMapper checks when it loads each image
        check_image_size(record, read_image(record["file_name"]))

    # Switched off again: Detectron2's own loader, the annotated sizes, and a stop.
    assert "SizeMismatchError" in stop_message([name])
    assert (DatasetCatalog.get(name)[2]["width"], DatasetCatalog.get(name)[2]["height"]) == (30, 40)


def test_sizes_from_images_for_a_dataset_that_detectron2_registered(tmp_path, monkeypatch):
    meta = MetadataCatalog.get("coco_2017_val")
    if os.path.isabs(meta.json_file):
        pytest.skip("DETECTRON2_DATASETS is set: the builtin coco_2017_val is not under the working folder")
    monkeypatch.chdir(tmp_path)
    categories = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}], "categories": categories,
            "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0}]}
    os.makedirs(os.path.dirname(meta.json_file))
    with open(meta.json_file, "w") as f:
        json.dump(coco, f)
    write_image(os.path.join(meta.image_root, "a.jpg"), (41, 30))
    builtin_loader = DatasetCatalog["coco_2017_val"]
    try:
        assert "1 off by 1-2 px" in warnings_of(["coco_2017_val"], [], "DATASETS.SIZES_FROM_IMAGES", True,
                                                "MODEL.ROI_HEADS.NUM_CLASSES", 80)
        (record,) = DatasetCatalog.get("coco_2017_val")
        assert (record["width"], record["height"]) == (41, 30) and record["annotations"][0]["category_id"] == 0
    finally:
        take_sizes_from_image_files("coco_2017_val", False)
    assert DatasetCatalog["coco_2017_val"] is builtin_loader


def test_voc_size_that_differs_from_the_jpeg(tmp_path):
    name = register_voc(unique_name(tmp_path), write_voc(tmp_path, {
        "img1": ((40, 30), (41, 30), [("cat", 3, 4, 20, 18, 0)]),
        "img2": ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]),
    }), "train", ["cat"])
    line = the_line(stop_message([name]), "differs from the image file")
    assert "1 of the 2 images of" in line
    assert "1 off by 1-2 px (JPEGImages/img1.jpg: annotated 40x30, file 41x30)" in line
    warnings_of([name], [], "DATASETS.SIZES_FROM_IMAGES", True)
    assert [(r["width"], r["height"]) for r in DatasetCatalog.get(name)] == [(41, 30), (40, 30)]


# Row 2: image files missing, not images, or truncated.


def test_missing_unreadable_and_truncated_image_files_stop(tmp_path):
    files = ("fine.jpg", "text.jpg", "cut.jpg", "cut.png", "trailer.jpg", "no_iend.png")
    name = coco_dataset(tmp_path, [ok_image(f) for f in files] + [("gone.jpg", (40, 30), None, None)],
                        [(0, [2, 2, 10, 10])])
    images = tmp_path / "images"
    (images / "text.jpg").write_text("<html>404 Not Found</html>")
    for cut, nbytes in (("cut.jpg", 100), ("cut.png", 100), ("no_iend.png", 8)):  # copies that stopped short
        write_image(images / cut, noise=True)
        (images / cut).write_bytes((images / cut).read_bytes()[:-nbytes])
    (images / "trailer.jpg").write_bytes((images / "trailer.jpg").read_bytes() + b"camera maker data")
    message = stop_message([name])
    assert the_line(message, "are not in").endswith(
        f"1 of the 7 images of {tmp_path / 'train.json'} are not in {images}: gone.jpg; Detectron2 would stop at "
        "the first it loads: add the files, or remove these images from the annotations")
    assert (f"1 of the 7 image files of {tmp_path / 'train.json'} cannot be read as images: "
            "text.jpg (not an image file that PIL can identify)") in message
    assert (f"2 of the 7 image files of {tmp_path / 'train.json'} are truncated: cut.jpg (it does not end with the "
            "JPEG end marker FF D9), cut.png (it does not end with the PNG IEND chunk); PIL cannot decode them") in message
    # Bytes after the end marker, or a PNG cut after its pixel data: PIL decodes them, and so
    # does Detectron2's read_image.
    assert "trailer.jpg (" not in message and "no_iend.png (" not in message


@pytest.mark.parametrize("layout", ["one folder down", "one folder up"])
def test_image_files_in_the_folder_next_to_the_image_folder_are_found(tmp_path, layout):
    json_file, images = write_coco(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg")], [(0, [2, 2, 10, 10])])
    given = tmp_path if layout == "one folder down" else tmp_path / "images" / "train"  # where they are not
    given.mkdir(exist_ok=True)
    name = register_coco(unique_name(tmp_path), json_file, given)
    assert the_line(stop_message([name]), "are not in").endswith(
        f"2 of the 2 images of {json_file} are not in {given}: a.jpg, b.jpg; Detectron2 would stop at the first it "
        f"loads: all of them are in {images}: use {images} as the image folder (IMAGE_ROOT of --register-coco, the "
        "third item of a DATASETS.REGISTER_COCO entry)")


def test_some_image_files_in_the_folder_next_to_the_image_folder(tmp_path):
    json_file, images = write_coco(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg"), ok_image("c.jpg")],
                                   [(0, [2, 2, 10, 10])])
    os.makedirs(tmp_path / "images" / "more")
    os.rename(tmp_path / "images" / "b.jpg", tmp_path / "images" / "more" / "b.jpg")
    os.remove(tmp_path / "images" / "c.jpg")
    name = register_coco(unique_name(tmp_path), json_file, images)
    assert the_line(stop_message([name]), "are not in").endswith(
        f"2 of the 3 images of {json_file} are not in {images}: b.jpg, c.jpg; Detectron2 would stop at the first it "
        f"loads: 1 of them are in {images}/more: move those into {images}; for the others, add the files, or remove "
        "these images from the annotations")


def test_voc_jpeg_that_is_truncated(tmp_path):
    dirname = write_voc(tmp_path, {i: ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]) for i in ("img1", "img2")})
    jpeg = tmp_path / "JPEGImages" / "img2.jpg"
    write_image(jpeg, noise=True)
    jpeg.write_bytes(jpeg.read_bytes()[:-100])
    name = register_voc(unique_name(tmp_path), dirname, "train", ["cat"])
    assert "are truncated: JPEGImages/img2.jpg (it does not end with the JPEG end marker FF D9)" in stop_message([name])


# Row 3: boxes.

BAD_BOXES = [[float("nan"), 2, 10, 10], [2, 2, float("inf"), 10], ["2", 2, 10, 10], [2, 2, 10], [20, 5, -8, 10]]
SAFE_BOXES = [[5, 5, 0, 10], [50, 5, 5, 5], [35, 5, 10, 10], [2, 2, 10, 10]]  # zero, outside, partly, fine


def test_boxes_that_would_crash_or_train_on_wrong_boxes_stop(tmp_path):
    name = coco_dataset(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg")],
                        [(0, b) for b in BAD_BOXES] + [(1, [2, 2, 10, 10])])
    message = stop_message([name])
    json_file = tmp_path / "train.json"
    assert (f"2 box(es) in 1 image(s) of {json_file} are not 4 numbers [x, y, width, height]: "
            'a.jpg (annotation 3: ["2", 2, 10, 10]), a.jpg (annotation 4: [2, 2, 10]); Detectron2 would stop') \
        in message
    assert (f"2 box(es) in 1 image(s) of {json_file} have a NaN or infinite coordinate: a.jpg (annotation 1: "
            "[NaN, 2, 10, 10]), a.jpg (annotation 2: [2, 2, Infinity, 10]); Detectron2 would train on an infinite "
            "box stretched to the image border, and drop a NaN box in training") in message
    assert (f"1 box(es) in 1 image(s) of {json_file} have a negative width or height: a.jpg (annotation 5: "
            "[20, 5, -8, 10]); Detectron2 would train on the box between their corners") in message


def test_boxes_that_detectron2_drops_or_clips_are_warnings(tmp_path):
    name = coco_dataset(tmp_path, [ok_image("a.jpg")], [(0, b) for b in SAFE_BOXES])
    json_file = tmp_path / "train.json"
    warnings = warnings_of([name])
    assert (f"1 box(es) in 1 image(s) of {json_file} have zero width or height: a.jpg (annotation 1: [5, 5, 0, 10]); "
            "Detectron2 drops them in training") in warnings
    assert (f"1 box(es) in 1 image(s) of {json_file} lie entirely outside their image: a.jpg (annotation 2: "
            "[50, 5, 5, 5]); Detectron2 clips them to empty boxes and drops them in training") in warnings
    assert (f"1 box(es) in 1 image(s) of {json_file} reach outside their image: a.jpg (annotation 3: "
            "[35, 5, 10, 10]); Detectron2 clips them to the image in training") in warnings
    assert "lowers recall and AP" not in warnings
    assert warnings_of([], [name]).count("the evaluator counts them as objects that no detection can match") == 2


def test_detectron2_treats_boxes_as_the_messages_say(tmp_path):
    """The facts behind the stop/continue decisions, on Detectron2's training DatasetMapper."""
    write_image(tmp_path / "a.jpg")
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.RANDOM_FLIP = (60,), "none"  # twice the size, no flip
    boxes = {"nan": [float("nan"), 2, 10, 10], "inf": [2, 2, float("inf"), 10], "negative": [20, 5, -8, 10],
             "zero": [5, 5, 0, 10], "outside": [50, 5, 5, 5], "partly": [35, 5, 10, 10]}
    kept = {}
    for kind, box in boxes.items():
        record = {"file_name": str(tmp_path / "a.jpg"), "height": 30, "width": 40,
                  "annotations": [{"bbox": box, "bbox_mode": 1, "category_id": 0, "iscrowd": 0}]}
        kept[kind] = DatasetMapper(cfg, is_train=True)(record)["instances"].gt_boxes.tensor.tolist()
    assert kept["nan"] == kept["zero"] == kept["outside"] == []  # dropped
    assert kept["inf"] == [[4, 4, 80, 24]]  # stretched to the right border
    assert kept["negative"] == [[24, 10, 40, 30]]  # [12, 20] in x: left of x = 20, not what was drawn
    assert kept["partly"] == [[70, 10, 80, 30]]  # clipped


def test_voc_boxes_with_reversed_corners_or_nan_stop(tmp_path):
    name = register_voc(unique_name(tmp_path), write_voc(tmp_path, {
        "img1": ((40, 30), (40, 30), [("cat", 20, 4, 3, 18, 0), ("cat", "nan", 4, 10, 18, 0)]),
        "img2": ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0), ("cat", 0, 4, 50, 18, 0)]),
    }), "train", ["cat"])
    message = stop_message([name])
    split_file = tmp_path / "ImageSets" / "Main" / "train.txt"
    assert (f"1 box(es) in 1 image(s) of {split_file} have xmax below xmin or ymax below ymin: "
            "Annotations/img1.xml (object 0 'cat': bndbox 20, 4, 3, 18)") in message
    assert "have a NaN or infinite coordinate: Annotations/img1.xml (object 1 'cat': bndbox nan, 4, 10, 18)" in message
    # A warning, listed after the stops:
    assert "reach outside their image: Annotations/img2.xml (object 1 'cat': bndbox 0, 4, 50, 18)" in message


# Row 4: ids.


def test_repeated_image_and_annotation_ids_stop(tmp_path):
    json_file, image_root = write_coco(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg"), ok_image("c.jpg")],
                                       [(0, [2, 2, 10, 10]), (1, [2, 2, 10, 10]), (2, [2, 2, 10, 10])])
    coco = json.loads(open(json_file).read())
    coco["images"][2]["id"] = 2  # b.jpg and c.jpg: id 2
    coco["annotations"][1]["id"] = 1
    with open(json_file, "w") as f:
        json.dump(coco, f)
    message = stop_message([register_coco(unique_name(tmp_path), json_file, image_root)])
    assert (f"{json_file}: 1 image id(s) occur more than once in 'images': id 2 (b.jpg, c.jpg); pycocotools would "
            "keep only the last image of each id") in message
    assert (f"{json_file}: 1 annotation id(s) occur more than once: id 1 (2 times); Detectron2's load_coco_json "
            "stops on them") in message


def test_annotations_of_images_not_in_the_file_are_a_warning(tmp_path):
    name = coco_dataset(tmp_path, [ok_image("a.jpg")], [(0, [2, 2, 10, 10]), (6, [2, 2, 10, 10])])
    assert (f"1 annotation(s) of {tmp_path / 'train.json'} refer to image ids that are not in its 'images': "
            "annotation 2 (image id 7); Detectron2 ignores them") in warnings_of([name])


def test_structure_that_pycocotools_or_detectron2_cannot_load(tmp_path):
    json_file, image_root = write_coco(tmp_path, [ok_image("a.jpg")], [{"image_id": 1, "bbox": [1, 1, 5, 5]}],
                                       categories=())
    coco = json.loads(open(json_file).read())
    del coco["annotations"][0]["id"]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    message = stop_message([register_coco(unique_name(tmp_path), json_file, image_root)])
    assert f"{json_file} defines no categories" in message
    assert f"1 entries of 'annotations' in {json_file} lack an id or an image_id (counting from #0): #0" in message


def test_coco_images_without_a_size_stop_also_with_sizes_from_images(tmp_path):
    json_file, image_root = write_coco(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg")], [(0, [2, 2, 10, 10])])
    coco = json.loads(open(json_file).read())
    del coco["images"][1]["width"]
    with open(json_file, "w") as f:
        json.dump(coco, f)
    name = register_coco(unique_name(tmp_path), json_file, image_root)
    for opts in ((), ("DATASETS.SIZES_FROM_IMAGES", True)):
        assert (f"1 of the 2 images of {json_file} have no width or height (positive numbers): id 2 (b.jpg: the file "
                "is 40x30); Detectron2's load_coco_json reads both for every image and stops without them (also "
                "with DATASETS.SIZES_FROM_IMAGES)") in stop_message([name], [], *opts)


def test_annotation_file_that_is_not_text(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.json").write_bytes(b"\x89PNG\r\n")
    name = register_coco(unique_name(tmp_path), tmp_path / "train.json", tmp_path / "images")
    assert f"{tmp_path / 'train.json'} is not UTF-8 text (byte 0): not a COCO JSON file" in stop_message([name])


# Row 5: Pascal VOC.


def test_voc_xml_without_size_stops_also_with_sizes_from_images(tmp_path):
    name = register_voc(unique_name(tmp_path), write_voc(tmp_path, {
        "img1": (None, (40, 30), [("cat", 3, 4, 20, 18, 0)]),
        "img2": ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]),
    }), "train", ["cat"])
    for opts in ((), ("DATASETS.SIZES_FROM_IMAGES", True)):
        line = the_line(stop_message([name], [], *opts), "have no <size>")
        assert ("1 of the 2 XML files of {} have no <size> with integer <width> and <height>: Annotations/img1.xml "
                "(JPEGImages/img1.jpg is 40x30); Detectron2's VOC loader reads them from every XML file and stops "
                "without them (also with DATASETS.SIZES_FROM_IMAGES): add <size>").format(
                    tmp_path / "ImageSets" / "Main" / "train.txt") in line


def test_voc_difficult_objects_are_counted_with_how_they_are_treated(tmp_path):
    name = register_voc(unique_name(tmp_path), write_voc(tmp_path, {
        "img1": ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 1), ("cat", 1, 1, 8, 9, 0)]),
        "img2": ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]),
    }), "train", ["cat"])
    split_file = tmp_path / "ImageSets" / "Main" / "train.txt"
    assert (f"1 of the 3 objects in 1 XML file(s) of {split_file} are marked difficult: Annotations/img1.xml "
            "(object 0 'cat'); Detectron2's VOC loader trains on them like any other object") in warnings_of([name])
    assert ("PascalVOCDetectionEvaluator ignores them: a detection of one is neither a true nor a false positive, "
            "and they do not count toward recall") in warnings_of([], [name])


def test_voc_split_file_without_ids_or_with_columns(tmp_path):
    dirname = write_voc(tmp_path, {i: ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]) for i in ("img1", "img2")})
    split_file = tmp_path / "ImageSets" / "Main" / "train.txt"
    split_file.write_text("\n")
    name = register_voc(unique_name(tmp_path), dirname, "train", ["cat"])
    assert f"{split_file} lists no image ids (it is empty)" in stop_message([name])
    split_file.write_text("img1  1\nimg2 -1\n")
    assert (f"{split_file} has 2 line(s) with more than one word: line 1: img1 1, line 2: img2 -1; Detectron2's "
            "VOC loader needs one image id per line") in stop_message([name])


# Row 6: images without annotations.


@pytest.mark.parametrize("filter_empty, fate", [
    (True, "Detectron2 leaves them out of training (DATALOADER.FILTER_EMPTY_ANNOTATIONS True)"),
    (False, "Detectron2 trains on them as background only (DATALOADER.FILTER_EMPTY_ANNOTATIONS False)"),
])
def test_images_without_annotations_say_what_filter_empty_annotations_does(tmp_path, filter_empty, fate):
    crowd = {"image_id": 2, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 1}
    name = coco_dataset(tmp_path, [ok_image(f"{i}.jpg") for i in range(8)], [(0, [2, 2, 10, 10]), crowd])
    warnings = warnings_of([name], [], "DATALOADER.FILTER_EMPTY_ANNOTATIONS", filter_empty)
    assert (f"7 of the 8 images of {tmp_path / 'train.json'} have no annotations (or only crowd ones): "
            f"1.jpg, 2.jpg, 3.jpg, 4.jpg, 5.jpg and 2 more; {fate}") in warnings
    assert "evaluation keeps them (every detection on them is a false positive)" in warnings_of([], [name])


def test_training_set_without_any_annotation_stops_when_empty_images_are_filtered(tmp_path):
    name = coco_dataset(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg")])
    assert ("with DATALOADER.FILTER_EMPTY_ANNOTATIONS True, Detectron2 would train on none of them: check that "
            "these are the right annotations, or leave this dataset out of DATASETS.TRAIN") in stop_message([name])
    assert "trains on them as background only" in warnings_of([name], [], "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)
    assert "evaluation keeps them" in warnings_of([], [name])


# Row 7: evaluators.


def test_test_set_whose_evaluator_type_train_net_cannot_evaluate(tmp_path):
    name = unique_name(tmp_path)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).evaluator_type = "lvis"
    assert (f"dataset '{name}': its evaluator_type is 'lvis', which tools/train_net.py cannot evaluate (it evaluates "
            "coco, coco_panoptic_seg, pascal_voc; a dataset without evaluator_type counts as coco): leave it out of "
            "DATASETS.TEST") in stop_message([], [name])
    assert warnings_of([name]) == ""  # training on it is fine
    assert EVALUABLE_TYPES == ("coco", "coco_panoptic_seg", "pascal_voc")


def test_the_evaluable_types_are_those_train_net_builds_an_evaluator_for(tmp_path):
    from ohem_d2.engine import Trainer

    json_file, image_root = write_coco(tmp_path, [ok_image("a.jpg")], [(0, [2, 2, 10, 10])])
    voc_dirname = write_voc(tmp_path / "voc", {i: ((40, 30), (40, 30), [("cat", 3, 4, 20, 18, 0)]) for i in "ab"})
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    for evaluator_type in EVALUABLE_TYPES:  # other types are refused before training (test above)
        name = unique_name(tmp_path, evaluator_type)
        if evaluator_type == "pascal_voc":
            register_voc(name, voc_dirname, "train", ["cat"])
        else:
            DatasetCatalog.register(name, lambda: [])
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type=evaluator_type)
        evaluator = Trainer.build_evaluator(make_cfg(), name, str(tmp_path / "eval"))
        assert isinstance(evaluator, PascalVOCDetectionEvaluator if evaluator_type == "pascal_voc" else COCOEvaluator)


# Row 8: classes, of the datasets against each other and against the model's heads.

KITCHEN = [{"id": 1, "name": "fork"}, {"id": 2, "name": "spoon"}, {"id": 3, "name": "knife"}]
# The same names under other ids: Detectron2 numbers them knife, fork, spoon.
KITCHEN_RENUMBERED = [{"id": 1, "name": "knife"}, {"id": 2, "name": "fork"}, {"id": 3, "name": "spoon"}]


def kitchen_dataset(tmp_path, suffix="", categories=KITCHEN):
    """A one-image COCO dataset of three classes, one box of each."""
    root = tmp_path / (suffix or "kitchen")
    annotations = [{"image_id": 1, "bbox": [2, 2, 10, 10], "category_id": c["id"], "iscrowd": 0} for c in categories]
    return register_coco(unique_name(tmp_path, suffix),
                         *write_coco(root, [ok_image("a.jpg")], annotations, categories=categories))


def test_a_test_set_with_the_classes_under_other_ids_stops_with_both_lists(tmp_path):
    train, test = kitchen_dataset(tmp_path, "_train"), kitchen_dataset(tmp_path, "_val", KITCHEN_RENUMBERED)
    line = the_line(stop_message([train], [test], "MODEL.ROI_HEADS.NUM_CLASSES", 3), "its classes differ")
    assert line == (
        f"- dataset '{test}': its classes differ from those of '{train}' (the first of DATASETS.TRAIN): '{test}' has "
        f"['knife', 'fork', 'spoon'], '{train}' has ['fork', 'spoon', 'knife']; the class ids 0: 'knife' vs 'fork', "
        "1: 'fork' vs 'spoon', 2: 'spoon' vs 'knife' differ. Detectron2 numbers the classes of each dataset by its "
        "own list (a COCO JSON's categories by id), so the evaluator would score the model's class 0 ('fork') as "
        f"class 0 of '{test}' ('knife'): give every dataset of the run the same class names in the same order (in "
        "COCO JSON files, the same category id for each name)")
    # The lists are the thing_classes that Detectron2's loader gives the datasets.
    DatasetCatalog.get(train), DatasetCatalog.get(test)
    assert MetadataCatalog.get(train).thing_classes == ["fork", "spoon", "knife"]
    assert MetadataCatalog.get(test).thing_classes == ["knife", "fork", "spoon"]
    # Same ids and names: nothing to say.
    assert warnings_of([train], [kitchen_dataset(tmp_path, "_same")], "MODEL.ROI_HEADS.NUM_CLASSES", 3) == ""


def test_training_sets_with_different_classes_stop(tmp_path):
    first, second = kitchen_dataset(tmp_path, "_a"), kitchen_dataset(tmp_path, "_b", KITCHEN[:2])
    line = the_line(stop_message([first, second], [], "MODEL.ROI_HEADS.NUM_CLASSES", 3), "its classes differ")
    assert (f"'{second}' has ['fork', 'spoon'], '{first}' has ['fork', 'spoon', 'knife']; the class ids "
            "2: (none) vs 'knife' differ") in line
    assert "so Detectron2 would stop when it merges the training sets: give every dataset" in line


def test_fewer_model_classes_than_the_dataset_has_stop_naming_the_dropped_classes(tmp_path):
    name = kitchen_dataset(tmp_path)
    assert the_line(stop_message([name], [], "MODEL.ROI_HEADS.NUM_CLASSES", 2), "NUM_CLASSES") == (
        f"- dataset '{name}': it has 3 class(es), but MODEL.ROI_HEADS.NUM_CLASSES is 2: the model would have no "
        "output for 'knife' (id 2), which Detectron2 would train as background or stop on; set "
        "MODEL.ROI_HEADS.NUM_CLASSES 3")


def test_num_classes_left_at_the_coco_default_stops_with_the_override(tmp_path):
    name = kitchen_dataset(tmp_path)
    cfg = get_cfg()  # Detectron2's default, as a COCO config leaves it
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert the_line(stop_message([name], [], "MODEL.ROI_HEADS.NUM_CLASSES", 80), "NUM_CLASSES") == (
        f"- dataset '{name}': it has 3 class(es), but MODEL.ROI_HEADS.NUM_CLASSES is 80, its default (Detectron2's, "
        "for COCO), which the config leaves as it is: 77 of the model's output classes (ids 3-79) would never see an "
        "example; set MODEL.ROI_HEADS.NUM_CLASSES 3")


def test_more_model_classes_than_the_dataset_has_are_a_warning(tmp_path):
    name = kitchen_dataset(tmp_path)
    assert warnings_of([name], [], "MODEL.ROI_HEADS.NUM_CLASSES", 5) == (
        f"dataset '{name}': it has 3 class(es), but MODEL.ROI_HEADS.NUM_CLASSES is 5: 2 of the model's output "
        "classes (ids 3-4) never see an example and only learn to say no; set MODEL.ROI_HEADS.NUM_CLASSES 3 unless "
        "that is meant")
    assert warnings_of([], [name], "MODEL.ROI_HEADS.NUM_CLASSES", 2) == ""  # a test set alone trains nothing


def test_the_heads_that_the_meta_architecture_builds_are_checked(tmp_path):
    name = kitchen_dataset(tmp_path)
    retinanet = ("MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.ROI_HEADS.NUM_CLASSES", 2)
    assert ("it has 3 class(es), but MODEL.RETINANET.NUM_CLASSES is 80, its default"
            in stop_message([name], [], *retinanet))
    assert warnings_of([name], [], *retinanet, "MODEL.RETINANET.NUM_CLASSES", 3) == ""
    # A registered subclass (ohem_d2's OHEMRetinaNet) predicts with RetinaNet's head and key.
    ohem_retinanet = ("MODEL.META_ARCHITECTURE", "OHEMRetinaNet", "MODEL.ROI_HEADS.NUM_CLASSES", 80)
    assert warnings_of([name], [], *ohem_retinanet, "MODEL.RETINANET.NUM_CLASSES", 3) == ""
    assert "MODEL.RETINANET.NUM_CLASSES is 80, its default" in stop_message([name], [], *ohem_retinanet)
    # A semantic head predicts the dataset's stuff_classes, and only a semantic segmentor has one.
    semantic = unique_name(tmp_path, "_sem")
    DatasetCatalog.register(semantic, lambda: [])
    MetadataCatalog.get(semantic).stuff_classes = ["things", "sky", "grass"]
    assert (f"dataset '{semantic}': it has 3 class(es), but MODEL.SEM_SEG_HEAD.NUM_CLASSES is 54, its default"
            in stop_message([semantic], [], "MODEL.META_ARCHITECTURE", "SemanticSegmentor"))
    assert warnings_of([semantic]) == ""


def test_the_passing_check_logs_one_line_with_datasets_images_time_and_warnings(tmp_path, caplog):
    train = coco_dataset(tmp_path, [ok_image("a.jpg"), ok_image("b.jpg")], [(0, [2, 2, 10, 10]), (1, [2, 2, 0, 10])])
    test = unique_name(tmp_path, "_custom")
    DatasetCatalog.register(test, lambda: [])
    caplog.set_level("INFO", logger="ohem_d2.data.datasets")
    warnings_of([train], [test])
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert line.startswith("datasets checked in ") and line.endswith(
        f" s: {train} (2 images), {test} (no files to read); no problem stops the run, 1 warning(s)")


# Speed: the cache.


def test_a_second_check_reads_no_header_and_a_changed_file_is_read_again(tmp_path, check_cache, monkeypatch):
    name = coco_dataset(tmp_path, [ok_image("a.jpg"), ("b.jpg", (40, 30), (41, 30), None)],
                        [(0, [2, 2, 10, 10]), (1, [2, 2, 10, 10])])
    assert "1 off by 1-2 px" in stop_message([name])
    assert len(list(check_cache.glob("coco-*.json"))) == 1

    def no_header_reads(path):
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(dataset_scan, "read_image_header", no_header_reads)
    assert "1 off by 1-2 px" in stop_message([name])
    # The settings decide the verdict on the cached scan: a warning now, and corrected records.
    assert "1 off by 1-2 px" in warnings_of([name], [], "DATASETS.SIZES_FROM_IMAGES", True)
    assert [(r["width"], r["height"]) for r in DatasetCatalog.get(name)] == [(40, 30), (41, 30)]

    monkeypatch.undo()
    monkeypatch.setenv("OHEM_D2_CACHE", str(check_cache))
    write_image(tmp_path / "images" / "b.jpg", (40, 30))  # fixed: another size and modification time
    assert "differs" not in warnings_of([name])


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OHEM_D2_CACHE", str(tmp_path / "a"))
    assert scan_cache.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("OHEM_D2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert scan_cache.cache_dir() == str(tmp_path / "xdg" / "ohem_d2")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert scan_cache.cache_dir() == str(tmp_path / "home" / ".cache" / "ohem_d2")


def test_a_cache_that_cannot_be_written_costs_only_speed(tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("OHEM_D2_CACHE", str(tmp_path / "not_a_folder"))
    name = coco_dataset(tmp_path, [ok_image("a.jpg")], [(0, [2, 2, 10, 10])])
    for _ in range(2):
        assert warnings_of([name]) == ""


def test_at_most_five_examples_then_how_many_more(tmp_path):
    name = coco_dataset(tmp_path, [ok_image("a.jpg")], [(0, [2, 2, 0, 10])] * 7)
    assert ("7 box(es) in 1 image(s) of {} have zero width or height: a.jpg (annotation 1: [2, 2, 0, 10]), "
            "a.jpg (annotation 2: [2, 2, 0, 10]), a.jpg (annotation 3: [2, 2, 0, 10]), a.jpg (annotation 4: "
            "[2, 2, 0, 10]), a.jpg (annotation 5: [2, 2, 0, 10]) and 2 more; ").format(tmp_path / "train.json") \
        in warnings_of([name])


def test_every_dataset_is_reported_at_once_with_the_warnings_after_the_stops(tmp_path):
    stopping = coco_dataset(tmp_path / "a", [("a.jpg", (40, 30), None, None)], [(0, [2, 2, 10, 10])])
    warning = register_coco(unique_name(tmp_path, "_b"),
                            *write_coco(tmp_path / "b", [ok_image("a.jpg")], [(0, [2, 2, 0, 10])]))
    message = stop_message([stopping, warning])
    assert message.startswith(f"1 dataset(s) of this run cannot be used:\n- dataset '{stopping}': 1 of the 1 images")
    assert f"\nWarnings (these alone would not stop the run):\n- dataset '{warning}': 1 box(es)" in message


def test_clean_coco128_has_only_its_two_unannotated_images_to_say(tmp_path):
    coco128 = require_coco128()
    name = register_coco(unique_name(tmp_path), coco128 / "annotations" / "instances_train2017.json",
                         coco128 / "train2017")
    warnings = check_datasets(make_cfg([name], [], "MODEL.ROI_HEADS.NUM_CLASSES", 80))
    assert len(warnings) == 1 and "2 of the 128 images" in warnings[0] and "no annotations" in warnings[0]
