"""Read a COCO-format or Pascal-VOC-layout dataset once and record what is wrong with it.

A scan is a plain (JSON) record of facts about the files, the same whichever run asks, so that it
can be cached (``scan_cache``) and judged later against the run's settings (``dataset_checks``):

* ``errors``: messages for defects that make Detectron2's loader fail whatever the settings;
* ``findings``: per kind of defect, how many (``count``), in how many images (``images``) and the
  first few ``examples``;
* ``file_sizes``: the width and height that Detectron2 will read from each image file whose
  annotated size differs (or is absent), keyed by the ``file_name`` of its dataset record;
* ``images`` and ``objects``: how many the dataset has; ``object_names`` (VOC): their counts;
* ``class_names`` (COCO): the category names in the order Detectron2 numbers them;
* ``images_elsewhere`` (COCO): the folder one level below or above the image folder that holds
  image files missing from it, and how many (``_folder_holding``), or None.

Images are read from their headers only (``image_files.read_image_header``).
"""
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

from .image_files import SWAPPING_ORIENTATIONS, read_image_header
from .scan_cache import cached_check

EXAMPLES = 5  # examples kept per finding, so that one bad folder does not flood the log
# Missing image files looked up in each folder next to the image folder, to find the one that
# holds them (all of them are counted there).
_PROBED = 20
# Exports write x + w = 640.0000001 for a box that ends at the border: that is not outside.
_OUTSIDE_TOLERANCE = 0.01


def scan_coco(json_file, image_root):
    """The scan of a COCO instances file and its image folder, and whether it came from the cache."""
    return cached_check("coco", json_file, image_root, lambda stamps: _scan_coco(json_file, image_root, stamps))


def scan_voc(dirname, split):
    """The scan of a Pascal-VOC-layout folder's split, and whether it came from the cache."""
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    return cached_check("voc", split_file, dirname, lambda stamps: _scan_voc(dirname, split_file, stamps))


class Findings:
    """Defects by kind: how many, in how many images, the first ``EXAMPLES`` of them."""

    def __init__(self):
        self._counts, self._images, self._examples = Counter(), defaultdict(set), defaultdict(list)

    def add(self, kind, image, example):
        self._counts[kind] += 1
        self._images[kind].add(image)
        if len(self._examples[kind]) < EXAMPLES:
            self._examples[kind].append(example)

    def to_json(self):
        return {kind: {"count": n, "images": len(self._images[kind]), "examples": self._examples[kind]}
                for kind, n in self._counts.items()}


def _scan(errors, findings=None, images=0, objects=0, file_sizes=None, object_names=None, class_names=None,
          images_elsewhere=None):
    return {"errors": errors, "findings": findings.to_json() if findings else {}, "images": images,
            "objects": objects, "file_sizes": file_sizes or {}, "object_names": object_names or {},
            "class_names": class_names, "images_elsewhere": images_elsewhere}


def _scan_coco(json_file, image_root, stamps):
    errors = [] if os.path.isdir(image_root) else [f"image folder {image_root} does not exist"]
    if not os.path.isfile(json_file):
        return _scan([f"annotation file {json_file} does not exist"] + errors)
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return _scan([f"{json_file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"] + errors)
    except UnicodeDecodeError as e:
        return _scan([f"{json_file} is not UTF-8 text (byte {e.start}): not a COCO JSON file"] + errors)
    data = data if isinstance(data, dict) else {}
    missing = ", ".join(k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list))
    if missing:
        return _scan([f"{json_file} is not a COCO instances file: it lacks the list(s) {missing}"] + errors)
    images = [im if isinstance(im, dict) else {} for im in data["images"]]
    annotations = [a if isinstance(a, dict) else {} for a in data["annotations"]]
    errors += _coco_structure_errors(json_file, images, annotations, data["categories"])

    findings, file_sizes = Findings(), {}
    by_id = {im.get("id"): im for im in images}  # as pycocotools indexes them: the last of an id wins
    sizes, missing = _scan_coco_images(findings, file_sizes, stamps, by_id, image_root)
    _scan_coco_annotations(findings, annotations, by_id, sizes)
    return _scan(errors, findings, len(by_id), len(annotations), file_sizes,
                 class_names=_coco_class_names(data["categories"]),
                 images_elsewhere=_folder_holding(stamps, image_root, missing))


def _coco_class_names(categories):
    """The category names in the order Detectron2's load_coco_json numbers them (by category id:
    its thing_classes), or None where the categories are not all dicts with an id and a name."""
    try:
        return [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]
    except (TypeError, KeyError):
        return None


def _folder_holding(stamps, image_root, missing):
    """The folder one level below ``image_root`` (a subfolder) or above it (its parent) that holds
    the most of the ``missing`` image files (names relative to ``image_root``), and how many of
    them: ``{"folder", "count"}``; None if none holds any. A user who gives the dataset's top
    folder (or one folder too deep) as the image folder is told where the images are."""
    if not missing:
        return None
    folders = sorted(entry.path for entry in os.scandir(image_root) if entry.is_dir())
    folders.append(os.path.dirname(os.path.abspath(image_root)))

    def found(folder, names):
        relative = os.path.relpath(folder, image_root)
        return sum(stamps.stat(os.path.join(relative, name)) is not None for name in names)

    best = max(folders, key=lambda folder: found(folder, missing[:_PROBED]))
    count = found(best, missing)
    return {"folder": os.path.abspath(best), "count": count} if count else None


def _scan_coco_images(findings, file_sizes, stamps, by_id, image_root):
    """Record the image files' defects; return {image id: the size its boxes are clipped to}
    (the file's as Detectron2 reads it, else the annotated one, else None), and the names of the
    image files that are not in ``image_root``."""
    sizes, missing = {}, []
    have_folder = os.path.isdir(image_root)
    for image_id, im in by_id.items():
        name = str(im.get("file_name", ""))
        annotated = sizes[image_id] = _size(im.get("width"), im.get("height"))
        header = _image_header(findings, stamps, name, "image_missing", name, missing) if have_folder else None
        if header:
            sizes[image_id] = (header.width, header.height)
            _compare_sizes(findings, file_sizes, name, os.path.join(image_root, name), annotated, header,
                           missing_example=f"id {image_id} ({name}: the file is {header.width}x{header.height})")
        elif not annotated:
            findings.add("size_missing", name, f"id {image_id} ({name})")
    return sizes, missing


def _scan_coco_annotations(findings, annotations, by_id, sizes):
    """Record the boxes' defects, annotations of unknown images, and images without annotations."""
    annotated_images = Counter()
    for a in annotations:
        image_id = a.get("image_id")
        if image_id not in by_id:
            findings.add("orphan_annotation", image_id, f"annotation {a.get('id')} (image id {image_id!r})")
            continue
        name = str(by_id[image_id].get("file_name", ""))
        if not a.get("iscrowd", 0):
            annotated_images[image_id] += 1
        bbox = a.get("bbox")
        example = f"{name} (annotation {a.get('id')}: {_text(bbox)})"
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            findings.add("box_not_numeric", name, example)
            continue
        x, y, w, h = bbox
        kind = _box_defect(x, y, x + w, y + h, sizes[image_id]) if all(map(math.isfinite, bbox)) else "box_not_finite"
        if kind:
            findings.add(kind, name, example)
    for image_id, im in by_id.items():
        if not annotated_images[image_id]:
            name = str(im.get("file_name", ""))
            findings.add("image_without_annotations", name, name)


def _coco_structure_errors(json_file, images, annotations, categories):
    """What makes pycocotools or Detectron2's load_coco_json fail, or mix up images."""
    errors = []
    if not images:
        errors.append(f"{json_file} lists no images")
    if not categories:
        errors.append(f"{json_file} defines no categories (its 'categories' list is empty): "
                      "Detectron2's load_coco_json needs at least one")
    lacking = [f"#{i}" for i, im in enumerate(images) if "id" not in im or "file_name" not in im]
    if lacking:
        errors.append(f"{len(lacking)} entries of 'images' in {json_file} lack an id or a file_name "
                      f"(counting from #0): {listed(lacking)}; pycocotools and Detectron2 need both")
    lacking = [f"#{i}" for i, a in enumerate(annotations) if "id" not in a or "image_id" not in a]
    if lacking:
        errors.append(f"{len(lacking)} entries of 'annotations' in {json_file} lack an id or an image_id "
                      f"(counting from #0): {listed(lacking)}; pycocotools needs both")

    # Stop: pycocotools indexes images by id, so of each repeated id only the last image is
    # loaded and the annotations of all of them land on it (boxes on the wrong picture).
    names_of = defaultdict(list)
    for im in images:
        names_of[im.get("id")].append(str(im.get("file_name", "")))
    repeated = [f"id {i} ({', '.join(names)})" for i, names in names_of.items() if len(names) > 1]
    if repeated:
        errors.append(
            f"{json_file}: {len(repeated)} image id(s) occur more than once in 'images': {listed(repeated)}; "
            "pycocotools would keep only the last image of each id and give it the annotations of all "
            "of them; give every image its own id (and its annotations that image_id)"
        )
    # Stop: Detectron2's load_coco_json asserts that annotation ids are unique (except for files
    # named *minival*), and pycocotools' evaluation keeps one annotation per id.
    ids = Counter(a.get("id") for a in annotations)
    repeated = [f"id {i} ({n} times)" for i, n in ids.items() if n > 1 and i is not None]
    if repeated:
        errors.append(
            f"{json_file}: {len(repeated)} annotation id(s) occur more than once: {listed(repeated)}; "
            "Detectron2's load_coco_json stops on them ('Annotation ids ... are not unique') and "
            "pycocotools' evaluation would keep one annotation per id; renumber the annotations' ids (1..N)"
        )
    # Stop: load_coco_json raises KeyError at the first such annotation.
    defined = {c.get("id") for c in categories if isinstance(c, dict)}
    undefined = [a for a in annotations if a.get("category_id") not in defined]
    if undefined:
        ids = sorted({a.get("category_id") for a in undefined}, key=str)
        errors.append(
            f"{len(undefined)} annotation(s) of {json_file} have category ids {listed(ids)} that its "
            "'categories' do not define; Detectron2's load_coco_json stops on them (KeyError): add "
            "these categories, or fix or remove the annotations"
        )
    return errors


def _scan_voc(dirname, split_file, stamps):
    layout = {"Annotations/": os.path.join(dirname, "Annotations"),
              "JPEGImages/": os.path.join(dirname, "JPEGImages")}
    if not os.path.isdir(dirname):
        return _scan([f"VOC folder {dirname} does not exist"])
    missing = [k for k, path in layout.items() if not os.path.isdir(path)]
    if not os.path.isfile(split_file):
        missing.append("ImageSets/Main/" + os.path.basename(split_file))
    if missing:
        return _scan([f"VOC folder {dirname} lacks {', '.join(missing)} (expected the Pascal VOC layout)"])
    with open(split_file, encoding="utf-8") as f:
        lines = [line.split() for line in f if line.strip()]
    ids = [words[0] for words in lines]
    if not ids:
        # Stop: Detectron2 would load an empty dataset and stop in get_detection_dataset_dicts.
        return _scan([f"{split_file} lists no image ids (it is empty); a VOC split file names one image "
                      "id per line (the XML file name without .xml)"])
    if len(ids) < 2:
        # load_voc_instances reads the split with numpy.loadtxt, which returns a scalar that
        # cannot be iterated for a one-line file.
        return _scan([f"{split_file} lists {len(ids)} image(s); Detectron2's VOC loader needs at least 2"])
    several = [f"line {i + 1}: {' '.join(words)}" for i, words in enumerate(lines) if len(words) > 1]
    if several:
        # numpy.loadtxt would return rows, not ids: load_voc_instances cannot use such a file.
        return _scan([f"{split_file} has {len(several)} line(s) with more than one word: {listed(several)}; "
                      "Detectron2's VOC loader needs one image id per line (a per-class file such as "
                      "cat_train.txt, with '1'/'-1' columns, is not a split: use train.txt, val.txt, ...)"])

    findings, file_sizes, names = Findings(), {}, Counter()
    objects = 0
    for image_id in ids:
        xml_name, jpeg_name = f"Annotations/{image_id}.xml", f"JPEGImages/{image_id}.jpg"
        header = _image_header(findings, stamps, jpeg_name, "voc_file", f"{jpeg_name}: missing")
        tree = _voc_tree(findings, stamps, dirname, xml_name)
        if tree is None:
            continue
        annotated = _size(tree.findtext("size/width"), tree.findtext("size/height"), integer=True)
        size = (header.width, header.height) if header else annotated
        if header is None and not annotated:
            findings.add("size_missing", xml_name, xml_name)
        elif header:
            _compare_sizes(findings, file_sizes, jpeg_name, os.path.join(dirname, "JPEGImages", image_id + ".jpg"),
                           annotated, header,
                           missing_example=f"{xml_name} ({jpeg_name} is {header.width}x{header.height})")
        objects += _scan_voc_objects(findings, names, tree, xml_name, size)
    return _scan([], findings, len(ids), objects, file_sizes, dict(names))


def _voc_tree(findings, stamps, dirname, xml_name):
    """The parsed XML file, or None (recorded as a ``voc_file`` finding) if the loader cannot read it."""
    if stamps.stat(xml_name) is None:
        findings.add("voc_file", xml_name, f"{xml_name}: missing")
        return None
    try:
        tree = ET.parse(os.path.join(dirname, xml_name))
    except ET.ParseError as e:
        line, column = e.position
        findings.add("voc_file", xml_name, f"{xml_name}: not valid XML (line {line}, column {column})")
        return None
    # load_voc_instances reads every object's name and its four corners as numbers.
    for obj in tree.findall("object"):
        name = obj.findtext("name")
        if not name:
            findings.add("voc_file", xml_name, f"{xml_name}: an <object> without <name>")
            return None
        if not all(_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")):
            findings.add("voc_file", xml_name, f"{xml_name}: object {name!r} lacks bndbox xmin/ymin/xmax/ymax")
            return None
    return tree


def _scan_voc_objects(findings, names, tree, xml_name, size):
    """Record the objects of one XML file; return how many it has."""
    for index, obj in enumerate(tree.findall("object")):
        name = obj.findtext("name")
        names[name] += 1
        corners = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
        example = f"{xml_name} (object {index} {name!r}: bndbox {', '.join(c.strip() for c in corners)})"
        x0, y0, x1, y1 = (float(c) for c in corners)
        # VOC corners are 1-based and inclusive; Detectron2's loader subtracts 1 from xmin and ymin.
        box = (x0 - 1, y0 - 1, x1, y1)
        kind = _box_defect(*box, size) if all(map(math.isfinite, box)) else "box_not_finite"
        if kind:
            findings.add(kind, xml_name, example)
        if _integer(obj.findtext("difficult")):
            findings.add("voc_difficult", xml_name, f"{xml_name} (object {index} {name!r})")
        # PascalVOCDetectionEvaluator reads pose, and truncated, difficult and the corners as integers.
        absent = [k for k in ("pose", "truncated", "difficult") if obj.find(k) is None]
        not_integers = [k for k in ("truncated", "difficult") if k not in absent and _integer(obj.findtext(k)) is None]
        if not all(_integer(c) is not None for c in corners):
            not_integers.append("bndbox")
        if absent or not_integers:
            what = [f"lacks {', '.join(absent)}"] if absent else []
            what += [f"has non-integer {', '.join(not_integers)}"] if not_integers else []
            findings.add("voc_evaluator_fields", xml_name, f"{xml_name}: object {name!r} {' and '.join(what)}")
    if not tree.findall("object"):
        findings.add("image_without_annotations", xml_name, xml_name)
    return len(tree.findall("object"))


def _image_header(findings, stamps, name, missing_kind, missing_example, missing=None):
    """The header of image file ``name``; None if it is missing (recorded as ``missing_kind``, and
    its name appended to the list ``missing`` if given) or unreadable (as ``image_unreadable`` or
    ``image_truncated``)."""
    if stamps.stat(name) is None:
        findings.add(missing_kind, name, missing_example)
        if missing is not None:
            missing.append(name)
        return None
    header = read_image_header(os.path.join(stamps.base, name))
    if header.problem:
        kind, _, why = header.problem.partition(": ")
        findings.add(f"image_{kind}", name, f"{name} ({why})")
        return None
    return header


def _compare_sizes(findings, file_sizes, name, record_file_name, annotated, header, missing_example):
    """Record how the annotated size of an image differs from its file's, and the file's size."""
    seen = (header.width, header.height)
    if annotated == seen:
        return
    file_sizes[record_file_name] = list(seen)
    if not annotated:
        findings.add("size_missing", name, missing_example)
        return
    (aw, ah), (fw, fh) = annotated, seen
    exif = f" after EXIF orientation {header.orientation}" if header.orientation in SWAPPING_ORIENTATIONS else ""
    example = f"{name}: annotated {_int(aw)}x{_int(ah)}, file {fw}x{fh}{exif}"
    if (aw, ah) == (fh, fw):
        kind = "size_swapped_by_exif" if exif else "size_swapped"
    elif abs(aw - fw) <= 2 and abs(ah - fh) <= 2:
        kind = "size_off_by_pixels"
    else:
        kind = "size_other"
    findings.add(kind, name, example)


def _box_defect(x0, y0, x1, y1, size):
    """What Detectron2 does not take as given about the box (x0, y0)-(x1, y1), or None."""
    if x1 < x0 or y1 < y0:
        return "box_negative"
    if x1 == x0 or y1 == y0:
        return "box_zero"
    if size:
        width, height = size
        if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
            return "box_outside"
        tol = _OUTSIDE_TOLERANCE
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            return "box_partly_outside"
    return None


def _size(width, height, integer=False):
    """(width, height) if both are positive numbers (parsed as integers from VOC text, as
    Detectron2's VOC loader does), else None."""
    if integer:
        width, height = _integer(width), _integer(height)
    if all(_is_number(v) and math.isfinite(v) and v > 0 for v in (width, height)):
        return width, height
    return None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(text):
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _integer(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _int(value):
    return int(value) if float(value).is_integer() else value


def _text(bbox):
    return json.dumps(bbox) if isinstance(bbox, list) else repr(bbox)


def listed(items, count=None):
    """The first ``EXAMPLES`` of ``items``, and how many more of ``count`` (default: all items)."""
    items = list(items)
    count = len(items) if count is None else count
    more = f" and {count - EXAMPLES} more" if count > EXAMPLES else ""
    return ", ".join(map(str, items[:EXAMPLES])) + more
