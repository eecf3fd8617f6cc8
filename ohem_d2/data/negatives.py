"""Negative pools: background images without objects, trained on as images with no GT.

A deployed detector that fires on background is taught otherwise by showing it background: a
folder (or a list file) of images that contain none of the classes. Detectron2 has no notion of
them: a COCO JSON without annotations would do, but ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``
(True by default) drops every image without annotations from training, the pool with it. Here a
pool is a dataset of its own (``--register-negatives NAME DIR``) whose records carry
:data:`POOL_KEY`; the training loader keeps them whatever that setting (or a keypoint model's
``MIN_KEYPOINTS_PER_IMAGE``) says and filters the other datasets as Detectron2 would
(:func:`filter_except_pools`).

A pool has no ``thing_classes`` (it has no classes): Detectron2 then skips the class histogram and
the class consistency check of the training sets it merges (for all of them), and ``class_checks``
compares the other datasets only.
"""
import hashlib
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_few_keypoints, filter_images_with_only_crowd_annotations

from .image_files import read_image_header
from .scan import listed

# The record key naming the pool a record comes from; such records are never filtered as empty.
POOL_KEY = "negative_pool"
# MetadataCatalog key of a pool: its folder or list file (absolute).
SOURCE_KEY = "negatives_source"
# A pool is not evaluable (no objects): its evaluator_type, which the checks refuse in DATASETS.TEST.
EVALUATOR_TYPE = "negative_pool"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_pool(name):
    return name in DatasetCatalog.list() and MetadataCatalog.get(name).get(SOURCE_KEY, None) is not None


def pool_source(name):
    """The folder or list file of the registered pool ``name``."""
    return MetadataCatalog.get(name).get(SOURCE_KEY)


def dataset_files(names):
    """The image files of the registered datasets ``names`` (those that load; the others' checks
    say why they do not): the positives a pool must not share images with."""
    files = []
    for name in names:
        try:
            files += [d["file_name"] for d in DatasetCatalog.get(name)]
        except Exception:  # noqa: BLE001 - a dataset that does not load is reported by its own check
            pass
    return files


def pool_files(source):
    """The image files of a pool, absolute and sorted: every file with an image extension under a
    folder (recursively), or each non-empty line of a list file (relative to the list's folder)."""
    if os.path.isdir(source):
        found = [os.path.join(root, f) for root, _, files in os.walk(source) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        with open(source) as f:
            lines = [line.strip() for line in f]
        found = [os.path.join(os.path.dirname(source), line) for line in lines if line and not line.startswith("#")]
    return sorted({os.path.abspath(p) for p in found})  # a file listed twice is one image


def pool_records(name, source):
    """Detectron2 records of the pool's images: no annotations, the size Detectron2 will read."""
    records = []
    for i, path in enumerate(pool_files(source)):
        header = read_image_header(path) if os.path.isfile(path) else None
        records.append({"file_name": path, "image_id": f"{name}/{i}", "annotations": [], POOL_KEY: name,
                        "width": header.width if header else 0, "height": header.height if header else 0})
    return records


def register_pool(name, source):
    """Register the pool at ``source`` (a folder or a list file) as dataset ``name``."""
    source = os.path.abspath(source)
    DatasetCatalog.register(name, lambda: pool_records(name, source))
    MetadataCatalog.get(name).set(**{SOURCE_KEY: source}, evaluator_type=EVALUATOR_TYPE)


def filter_except_pools(dicts, filter_empty=True, min_keypoints=0):
    """Detectron2's training filters, of images without (non-crowd) annotations and of images with
    fewer than ``min_keypoints`` visible keypoints, applied to the records of every dataset but the
    pools, whose records are all kept; the order is unchanged."""
    others = [d for d in dicts if POOL_KEY not in d]
    if filter_empty:
        others = filter_images_with_only_crowd_annotations(others)
    if min_keypoints > 0:
        others = filter_images_with_few_keypoints(others, min_keypoints)
    kept = {id(d) for d in others}
    return [d for d in dicts if POOL_KEY in d or id(d) in kept]


def lend_keypoint_metadata(train):
    """Give each pool among the training datasets ``train`` the keypoint names and flip map of the
    first other training dataset that has them: Detectron2's keypoint mapper reads them from every
    training dataset, and a pool, having no objects, has none of its own."""
    donors = [MetadataCatalog.get(n) for n in train if not is_pool(n)]
    donor = next((m for m in donors if hasattr(m, "keypoint_names") and hasattr(m, "keypoint_flip_map")), None)
    if donor is None:
        return
    for name in train:
        meta = MetadataCatalog.get(name)
        if is_pool(name) and not hasattr(meta, "keypoint_names"):
            meta.set(keypoint_names=donor.keypoint_names, keypoint_flip_map=donor.keypoint_flip_map)


def judge_pool(name, positives=()):
    """(stops, warnings) of pool ``name``: a missing folder or list, no images, files Detectron2
    cannot read, and images that are also training positives (``positives``: their file paths)."""
    source = pool_source(name)
    if not os.path.exists(source):
        return [f"its folder or list file {source} does not exist; give --register-negatives NAME DIR an existing "
                "folder of background images (or a text file listing them)"], []
    files = pool_files(source)
    if not files:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        return [f"{source} holds no image files ({kinds}): a negative pool needs background images "
                "without objects of the model's classes"], []
    stops = []
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        stops.append(f"{len(missing)} of its {len(files)} listed images do not exist ({listed(missing)}); "
                     f"fix the list {source}")
    problems = [(p, read_image_header(p).problem) for p in files if os.path.isfile(p)]
    base = source if os.path.isdir(source) else os.path.dirname(source)
    bad = [f"{os.path.relpath(p, base)}: {problem}" for p, problem in problems if problem]
    if bad:
        stops.append(f"{len(bad)} of its {len(files)} images cannot be read by Detectron2 ({listed(bad)}); "
                     "remove or re-export them")
    overlap = shared_images(files, positives)
    if overlap:
        stops.append(f"{len(overlap)} of its {len(files)} images are also training positives ({listed(overlap)}): "
                     "a negative pool holds images without objects, and training on one image as both would "
                     f"teach the model to miss its objects; remove them from {source}")
    return stops, []


def judge_pools(labels, positives, held_out=None, mined=None):
    """The stops of the pools ``labels`` ({pool name: how a message names it}): each pool's own
    (:func:`judge_pool` against the training ``positives``), and the held-out pool ``held_out``
    sharing images with the pool ``mined`` (the false positives it reports would be on images
    something trained on)."""
    stops = [f"{labels[name]}: {message}" for name in labels for message in judge_pool(name, positives)[0]]
    if not stops and held_out and mined:
        shared = shared_images(pool_files(pool_source(held_out)), pool_files(pool_source(mined)))
        if shared:
            stops.append(f"{labels[held_out]}: {len(shared)} of its images are also in {labels[mined]} "
                         f"({listed(shared)}): a held-out pool must hold images nothing trains on; remove them")
    return stops


def shared_images(files, positives):
    """The files of ``files`` that are also in ``positives``: the same path, or the same bytes."""
    positives = {os.path.realpath(p) for p in positives}
    same_path = [p for p in files if os.path.realpath(p) in positives]
    by_size = {}
    for p in positives:
        if os.path.isfile(p):
            by_size.setdefault(os.path.getsize(p), []).append(p)
    same_bytes = [p for p in files if p not in same_path and os.path.isfile(p)
                  and any(_digest(p) == _digest(q) for q in by_size.get(os.path.getsize(p), ()))]
    return same_path + same_bytes


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()
