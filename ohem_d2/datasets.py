"""User datasets: registered from the config (or the command line), checked before training.

Detectron2 looks datasets up by name and reads their files only when a data loader or an
evaluator is built, so a typo in a name, a wrong ``DETECTRON2_DATASETS`` or a VOC class list that
does not match the XML surfaces as a ``KeyError`` deep in a loader, and for a test set only when
the first evaluation starts, after hours of training. ``check_datasets`` reads the annotation
files (never the images) before training and reports every problem at once, each with its fix.

Registration itself is Detectron2's: ``register_coco_instances`` and ``register_pascal_voc``.
"""
import difflib
import json
import os
import xml.etree.ElementTree as ET
from collections import Counter

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc

# PascalVOCDetectionEvaluator accepts only 2007 and 2012; 2012 selects the all-point AP of
# VOC2010+, the exact area under the precision/recall curve (2007 is the 11-point approximation).
VOC_YEAR = 2012

REGISTER_HOWTO = (
    "register it with --register-coco NAME JSON IMAGE_ROOT or "
    "DATASETS.REGISTER_COCO \"[['NAME', 'JSON', 'IMAGE_ROOT']]\" (a VOC-layout folder: "
    "DATASETS.REGISTER_VOC \"[['NAME', 'DIR', 'SPLIT', 'class1,class2']]\")"
)
_MAX_LISTED = 5  # examples shown per problem, so that one bad folder does not flood the log


class DatasetError(ValueError):
    """A dataset named by the config that cannot be registered or loaded as given."""


def add_dataset_config(cfg):
    """Add ``DATASETS.REGISTER_COCO`` and ``DATASETS.REGISTER_VOC`` (call before merging a file)."""
    # Entries [name, json_file, image_root]: COCO instances JSON and the folder of its images.
    cfg.DATASETS.REGISTER_COCO = []
    # Entries [name, dirname, split, "class1,class2,..."]: a folder with the Pascal VOC layout
    # (Annotations/, ImageSets/Main/<split>.txt, JPEGImages/) and its own class names.
    cfg.DATASETS.REGISTER_VOC = []


def register_coco(name, json_file, image_root):
    """Register a COCO-format dataset; a no-op if ``name`` already has exactly these files."""
    wanted = {"json_file": os.path.abspath(json_file), "image_root": os.path.abspath(image_root)}
    if not _already_registered(name, wanted):
        register_coco_instances(name, {}, wanted["json_file"], wanted["image_root"])
    return name


def register_voc(name, dirname, split, class_names):
    """Register a Pascal-VOC-layout dataset with its own classes; idempotent like ``register_coco``."""
    class_names = [c.strip() for c in class_names]
    if not class_names or not all(class_names):
        raise DatasetError(f"dataset {name!r}: the class names {class_names} contain an empty name")
    wanted = {"dirname": os.path.abspath(dirname), "split": split, "thing_classes": class_names}
    if not _already_registered(name, wanted):
        register_pascal_voc(name, wanted["dirname"], split, VOC_YEAR, class_names)
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    return name


def register_datasets_from_config(cfg):
    """Register every ``DATASETS.REGISTER_COCO``/``REGISTER_VOC`` entry; return their names."""
    names = []
    for entry in cfg.DATASETS.REGISTER_COCO:
        form = "[name, json_file, image_root]"
        names.append(register_coco(*_entry("REGISTER_COCO", entry, form, 3)))
    for entry in cfg.DATASETS.REGISTER_VOC:
        form = "[name, dirname, split, 'class1,class2,...']"
        name, dirname, split, classes = _entry("REGISTER_VOC", entry, form, 4)
        names.append(register_voc(name, dirname, split, classes.split(",")))
    return names


def check_datasets(cfg):
    """Raise ``DatasetError`` listing every problem of the datasets in DATASETS.TRAIN and TEST."""
    failures = []
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        problems = _problems(name, for_eval=name in cfg.DATASETS.TEST)
        if problems:
            failures.append(f"dataset {name!r}: " + "; ".join(problems))
    if failures:
        raise DatasetError(
            f"{len(failures)} dataset(s) of this run cannot be used:\n- " + "\n- ".join(failures)
        )


def _entry(key, entry, form, length):
    if not isinstance(entry, (list, tuple)) or len(entry) != length:
        raise DatasetError(f"DATASETS.{key} entry {entry!r} is not of the form {form}")
    return [str(x) for x in entry]


def _already_registered(name, wanted):
    """True if ``name`` is registered with the metadata ``wanted``; an error if with other data."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    have = {key: meta.get(key, None) for key in wanted}
    if have == wanted:
        return True
    raise DatasetError(
        f"the dataset name {name!r} is already registered to a different dataset "
        f"({_describe(have)}); choose another name for {_describe(wanted)}"
    )


def _describe(fields):
    return ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None) or "no file metadata"


def _problems(name, for_eval):
    if name not in DatasetCatalog.list():
        close = difflib.get_close_matches(name, DatasetCatalog.list(), n=_MAX_LISTED)
        hint = f"did you mean {', '.join(map(repr, close))}? Otherwise " if close else ""
        return [f"no dataset of this name is registered; {hint}{REGISTER_HOWTO}"]
    meta = MetadataCatalog.get(name)
    json_file, dirname = meta.get("json_file", None), meta.get("dirname", None)
    if json_file is not None:
        problems = _coco_problems(json_file, meta.get("image_root", None))
    elif dirname is not None:
        classes = meta.get("thing_classes", [])
        problems = _voc_problems(dirname, meta.get("split", ""), classes, for_eval)
    else:  # registered with a custom loader and no file metadata: nothing to check
        return []
    if problems and _is_builtin_path(json_file or dirname):
        root = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
        problems.append(
            f"{name!r} is a Detectron2 builtin dataset, looked up under $DETECTRON2_DATASETS "
            f"(now {root}): set DETECTRON2_DATASETS to the folder that holds it (layout: "
            "https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html)"
        )
    return problems


def _is_builtin_path(path):
    root = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _coco_problems(json_file, image_root):
    problems = []
    if image_root is not None and not os.path.isdir(image_root):
        problems.append(f"image folder {image_root} does not exist")
    if not os.path.isfile(json_file):
        return [f"annotation file {json_file} does not exist"] + problems
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        return [f"{json_file} is not valid JSON: {e.msg} at {where}"] + problems
    if not isinstance(data, dict):
        data = {}
    keys = ("images", "annotations", "categories")
    missing = ", ".join(k for k in keys if not isinstance(data.get(k), list))
    if missing:
        return [f"{json_file} is not a COCO instances file: it lacks the list(s) {missing}"] + problems
    if not data["images"]:
        problems.append(f"{json_file} lists no images")
    defined = {c.get("id") for c in data["categories"]}
    undefined = {a.get("category_id") for a in data["annotations"]} - defined
    if undefined:
        problems.append(
            f"{json_file} has annotations with category ids {_listed(sorted(undefined, key=str))} "
            "that its 'categories' do not define"
        )
    if image_root is not None and os.path.isdir(image_root):
        absent = [im.get("file_name", "") for im in data["images"]
                  if not os.path.isfile(os.path.join(image_root, im.get("file_name", "")))]
        if absent:
            problems.append(
                f"{len(absent)} of the {len(data['images'])} images of {json_file} are not in "
                f"{image_root}: {_listed(absent)}"
            )
    return problems


def _voc_problems(dirname, split, class_names, for_eval):
    """What keeps ``load_voc_instances`` (and, for test sets, the VOC evaluator) from working."""
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    layout = {"Annotations/": os.path.join(dirname, "Annotations"),
              "JPEGImages/": os.path.join(dirname, "JPEGImages")}
    if not os.path.isdir(dirname):
        return [f"VOC folder {dirname} does not exist"]
    missing = [k for k, path in layout.items() if not os.path.isdir(path)]
    if not os.path.isfile(split_file):
        missing.append(f"ImageSets/Main/{split}.txt")
    if missing:
        return [f"VOC folder {dirname} lacks {', '.join(missing)} (expected the Pascal VOC layout)"]
    with open(split_file, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if len(ids) < 2:
        # load_voc_instances reads the split with numpy.loadtxt, which returns a scalar that
        # cannot be iterated for a one-line file.
        return [f"{split_file} lists {len(ids)} image(s); Detectron2's VOC loader needs at least 2"]

    problems, bad_files, seen = [], [], Counter()
    for image_id in ids:
        if not os.path.isfile(os.path.join(layout["JPEGImages/"], image_id + ".jpg")):
            bad_files.append(f"JPEGImages/{image_id}.jpg: missing")
        xml_file = os.path.join(layout["Annotations/"], image_id + ".xml")
        error = _voc_xml_error(xml_file, for_eval, seen)
        if error:
            bad_files.append(f"Annotations/{image_id}.xml: {error}")
    if bad_files:
        problems.append(
            f"{len(bad_files)} problem(s) in the files of {split_file}: {_listed(bad_files)}"
        )
    unknown = sorted(set(seen) - set(class_names))
    if unknown:
        problems.append(
            f"the annotations use object names that are not among the class names {class_names}: "
            f"{_listed(unknown)}; add them to the class names or fix the XML"
        )
    absent = [c for c in class_names if c not in seen]
    if absent:
        problems.append(
            f"the class names {_listed(absent)} never occur in the {split} annotations (a typo?); "
            f"the names that occur are {sorted(seen)}"
        )
    return problems


def _voc_xml_error(xml_file, for_eval, seen):
    """Why ``xml_file`` cannot be loaded (None if it can); counts its object names into ``seen``."""
    if not os.path.isfile(xml_file):
        return "missing"
    try:
        tree = ET.parse(xml_file)
    except ET.ParseError as e:
        line, column = e.position
        return f"not valid XML (line {line}, column {column})"
    if not all(_number(tree.findtext(f"size/{k}")) for k in ("width", "height")):
        return "no numeric size/width and size/height"
    # The evaluator also reads pose/truncated/difficult and integer box corners.
    needed = ("pose", "truncated", "difficult") if for_eval else ()
    for obj in tree.findall("object"):
        name = obj.findtext("name")
        if not name:
            return "an <object> without <name>"
        seen[name] += 1
        corners = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        if not all(_number(c, integer=for_eval) for c in corners):
            kind = "integer " if for_eval else ""
            return f"object {name!r} lacks {kind}bndbox xmin/ymin/xmax/ymax"
        absent = [k for k in needed if obj.find(k) is None]
        if absent:
            return f"object {name!r} lacks {', '.join(absent)} (needed by the VOC evaluator)"
    return None


def _number(text, integer=False):
    try:
        (int if integer else float)(text)
    except (TypeError, ValueError):
        return False
    return True


def _listed(items):
    items = list(items)
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(map(str, items[:_MAX_LISTED])) + more
