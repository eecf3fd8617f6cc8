"""What the defects of a scanned dataset (``dataset_scan``) will do in this run: stop it, or not.

A defect stops the run when Detectron2 would crash on it (mid-run, or at the first evaluation
after hours of training) or would silently train or evaluate on wrong boxes. A defect that
Detectron2 handles safely (clips, drops, ignores) is a warning saying what will happen. Every
message says what is wrong, how many, where (at most ``EXAMPLES`` examples) and how to go on.
"""
import os
from dataclasses import dataclass

from .scan import listed

_SIZE_KINDS = {  # finding -> how the message names it
    "size_off_by_pixels": "off by 1-2 px",
    "size_swapped_by_exif": "with width and height swapped by the file's EXIF orientation",
    "size_swapped": "with width and height swapped, without EXIF rotation",
    "size_other": "of another size",
}


@dataclass(frozen=True)
class Use:
    """How this run uses a dataset, and the settings that decide what its defects do."""

    train: bool  # in DATASETS.TRAIN
    test: bool  # in DATASETS.TEST
    filter_empty: bool  # DATALOADER.FILTER_EMPTY_ANNOTATIONS
    sizes_from_images: bool  # DATASETS.SIZES_FROM_IMAGES


@dataclass(frozen=True)
class Source:
    """Where a dataset's files are, as its messages name them."""

    annotations: str  # the COCO JSON file, or the VOC split file
    images: str  # the folder of the image files
    voc: bool


class _Found:
    """The findings of a scan, as the messages quote them."""

    def __init__(self, findings):
        self._findings = findings

    def count(self, kind):
        return self._findings.get(kind, {}).get("count", 0)

    def images(self, kind):
        return self._findings[kind]["images"]

    def examples(self, kind):
        return listed(self._findings[kind]["examples"], self.count(kind))


def judge(scan, source, use, class_names=()):
    """(stops, warnings): the messages of the defects in ``scan`` that stop this run, and of the
    defects it goes on with."""
    found = _Found(scan["findings"])
    count, examples = found.count, found.examples
    stops, warnings = list(scan["errors"]), []
    ann, total = source.annotations, scan["images"]
    # Stop: missing, unreadable or truncated image files, and XML files that the VOC loader
    # cannot parse, make Detectron2 raise at the first it loads, mid-run.
    if count("image_missing"):
        stops.append(f"{count('image_missing')} of the {total} images of {ann} are not in {source.images}: "
                     f"{examples('image_missing')}; Detectron2 would stop at the first it loads: "
                     + _where_missing_images_are(scan.get("images_elsewhere"), count("image_missing"), total, source))
    if count("voc_file"):
        stops.append(f"{count('voc_file')} problem(s) in the files of {ann}: {examples('voc_file')}; "
                     "Detectron2's VOC loader would stop on them: fix these files, or take their ids out of the "
                     "split file")
    if count("image_unreadable"):
        stops.append(f"{count('image_unreadable')} of the {total} image files of {ann} cannot be read as images: "
                     f"{examples('image_unreadable')}; Detectron2 would stop at the first it loads: replace "
                     "these files, or remove the images from the annotations")
    if count("image_truncated"):
        stops.append(f"{count('image_truncated')} of the {total} image files of {ann} are truncated: "
                     f"{examples('image_truncated')}; PIL cannot decode them, so Detectron2 would stop at "
                     "the first it loads ('image file is truncated'): copy or download them again")
    if count("size_missing"):
        # Stop also with SIZES_FROM_IMAGES: Detectron2's loaders (load_coco_json,
        # load_voc_instances) read the size of every image from the annotations and fail on the
        # first without one, before any record could be given the file's size.
        if source.voc:
            stops.append(f"{count('size_missing')} of the {total} XML files of {ann} have no <size> with integer "
                         f"<width> and <height>: {examples('size_missing')}; Detectron2's VOC loader reads them "
                         "from every XML file and stops without them (also with DATASETS.SIZES_FROM_IMAGES): "
                         "add <size><width>W</width><height>H</height></size> with the image file's size")
        else:
            stops.append(f"{count('size_missing')} of the {total} images of {ann} have no width or height "
                         f"(positive numbers): {examples('size_missing')}; Detectron2's load_coco_json reads both "
                         "for every image and stops without them (also with DATASETS.SIZES_FROM_IMAGES): add "
                         "them, with the image file's size")
    _judge_sizes(found, source, use, total, stops, warnings)
    _judge_boxes(found, source, use, stops, warnings)

    if count("orphan_annotation"):
        # Continue: load_coco_json drops annotations of unknown images (with a warning of its own).
        warnings.append(f"{count('orphan_annotation')} annotation(s) of {ann} refer to image ids that are not in "
                        f"its 'images': {examples('orphan_annotation')}; Detectron2 ignores them")
    if count("image_without_annotations"):
        n = count("image_without_annotations")
        what = f"{n} of the {total} images of {ann} have no annotations{'' if source.voc else ' (or only crowd ones)'}"
        if use.train and use.filter_empty and n == total:
            # Stop: nothing of this dataset would be trained on (and a training set of only such
            # datasets makes Detectron2 stop with "No valid data found"): almost surely wrong files.
            stops.append(f"{what}: with DATALOADER.FILTER_EMPTY_ANNOTATIONS True, Detectron2 would train on none "
                         "of them: check that these are the right annotations, or leave this dataset out of "
                         "DATASETS.TRAIN")
        else:
            # Continue: get_detection_dataset_dicts drops them from training when
            # FILTER_EMPTY_ANNOTATIONS is True (else they are background-only images);
            # the test loader keeps them.
            fate = []
            if use.train:
                fate.append("Detectron2 leaves them out of training (DATALOADER.FILTER_EMPTY_ANNOTATIONS True)"
                            if use.filter_empty else
                            "Detectron2 trains on them as background only (DATALOADER.FILTER_EMPTY_ANNOTATIONS False)")
            if use.test:
                fate.append("evaluation keeps them (every detection on them is a false positive)")
            warnings.append(f"{what}: {examples('image_without_annotations')}; {'; '.join(fate)}")
    if source.voc:
        _judge_voc(scan, found, source, use, class_names, stops, warnings)
    return stops, warnings


def _where_missing_images_are(elsewhere, missing, total, source):
    """The advice for image files that are not in the image folder: the folder next to it that
    holds them (an image folder given one level too high or too deep), else add or remove them."""
    add_or_remove = "add the files, or remove these images from the annotations"
    if elsewhere is None:
        return add_or_remove
    folder, held = elsewhere["folder"], elsewhere["count"]
    if held == missing == total:
        return (f"all of them are in {folder}: use {folder} as the image folder (IMAGE_ROOT of --register-coco, "
                "the third item of a DATASETS.REGISTER_COCO entry)")
    if held == missing:
        return f"they are in {folder}: move them into {source.images}"
    return f"{held} of them are in {folder}: move those into {source.images}; for the others, {add_or_remove}"


def _judge_sizes(found, source, use, total, stops, warnings):
    """Annotated sizes that differ from the image files: Detectron2's DatasetMapper stops with
    SizeMismatchError at the first it loads, hours into a run; all of them are reported now."""
    kinds = [k for k in _SIZE_KINDS if found.count(k)]
    if not kinds:
        return
    mismatched = sum(found.count(k) for k in kinds)
    parts = [f"{found.count(k)} {_SIZE_KINDS[k]} ({found.examples(k)})" for k in kinds]
    what = (f"{mismatched} of the {total} images of {source.annotations} have a width/height in the annotations "
            "that differs from the image file as Detectron2 reads it (after EXIF orientation): " + "; ".join(parts))
    if use.sizes_from_images:
        risky = [k for k in ("size_swapped_by_exif", "size_swapped", "size_other") if k in kinds]
        check = ("; check a few of those swapped or of another size: if their boxes were drawn for the other "
                 "orientation or resolution they are now misplaced") if risky else ""
        warnings.append(f"{what}; their sizes are taken from the image files (DATASETS.SIZES_FROM_IMAGES True){check}")
        return
    # Stop by default, even for sizes off by a pixel: a size that differs may mean that the boxes
    # were drawn at another resolution or orientation, and trusting the file silently would
    # train on misplaced boxes. DATASETS.SIZES_FROM_IMAGES True is the user's word that they fit.
    how = []
    if "size_off_by_pixels" in kinds:
        how.append("sizes off by 1-2 px come from export rounding: set DATASETS.SIZES_FROM_IMAGES True to take "
                   "the sizes from the image files")
    if "size_swapped_by_exif" in kinds:
        how.append("for the EXIF-rotated ones, look at one: if its boxes fit the unrotated picture (the "
                   "annotation tool ignored EXIF), remove the EXIF orientation tag from these files (e.g. "
                   "exiftool -Orientation= FILE); if they fit the rotated picture, set DATASETS.SIZES_FROM_IMAGES True")
    if "size_swapped" in kinds:
        how.append("for the swapped ones without EXIF rotation, width and height were probably exchanged in "
                   "the export: if the boxes fit the image files, set DATASETS.SIZES_FROM_IMAGES True, else fix "
                   "the annotations")
    if "size_other" in kinds:
        how.append("for those of another size, the boxes may be for another resolution: annotate these "
                   "files again or put back the images they were made for (DATASETS.SIZES_FROM_IMAGES True would "
                   "train on boxes of the wrong scale)")
    stops.append(f"{what}; Detectron2 would stop at the first of them it loads (SizeMismatchError): "
                 + "; ".join(how))


def _judge_boxes(found, source, use, stops, warnings):
    """Boxes as Detectron2's DatasetMapper treats them: transform_instance_annotations turns a
    box into the one between its transformed corners and clips it to the image,
    filter_empty_instances drops those without width or height (a NaN one too: its NaN width
    fails the test). The evaluators compare the boxes of the annotation files as they are."""
    ann, count, examples = source.annotations, found.count, found.examples
    unmatched = ("; the evaluator counts them as objects that no detection can match, which lowers "
                 "recall and AP" if use.test else "")

    def where(kind):
        return f"{count(kind)} box(es) in {found.images(kind)} image(s) of {ann}"

    if count("box_not_numeric"):
        # Stop: BoxMode.convert (and pycocotools) fail on a box that is not 4 numbers.
        stops.append(f"{where('box_not_numeric')} are not 4 numbers [x, y, width, height]: "
                     f"{examples('box_not_numeric')}; Detectron2 would stop at the first: fix or remove these "
                     "annotations")
    if count("box_not_finite"):
        # Stop: an infinite corner is clipped to the border and trained on as a real object; a
        # NaN box is dropped in training only by accident, the evaluators count it as ground
        # truth, and either means that the export is broken.
        stops.append(f"{where('box_not_finite')} have a NaN or infinite coordinate: {examples('box_not_finite')}; "
                     "Detectron2 would train on an infinite box stretched to the image border, and drop a NaN "
                     "box in training while the evaluator counts it as an object: fix or remove them")
    if count("box_negative"):
        # Stop: the transforms make such a box the one between its corners (a COCO box with
        # width -w becomes [x - w, x]), a box that the annotator did not draw, and the
        # evaluators can never match it.
        shape = ("xmax below xmin or ymax below ymin" if source.voc else "a negative width or height")
        stops.append(f"{where('box_negative')} have {shape}: {examples('box_negative')}; Detectron2 would "
                     "train on the box between their corners, which is not what was drawn, and the evaluator "
                     "can never match them: fix them")
    if count("box_zero"):
        # Continue: filter_empty_instances drops them in training.
        warnings.append(f"{where('box_zero')} have zero width or height: {examples('box_zero')}; Detectron2 drops "
                        f"them in training{unmatched}")
    if count("box_outside"):
        # Continue: clipped to empty boxes and dropped in training.
        warnings.append(f"{where('box_outside')} lie entirely outside their image: {examples('box_outside')}; "
                        f"Detectron2 clips them to empty boxes and drops them in training{unmatched}; many such "
                        "boxes would mean annotations made for other images or sizes")
    if count("box_partly_outside"):
        # Continue: clipped to the image in training, which keeps the visible part.
        warnings.append(f"{where('box_partly_outside')} reach outside their image: {examples('box_partly_outside')}; "
                        "Detectron2 clips them to the image in training")


def _judge_voc(scan, found, source, use, class_names, stops, warnings):
    ann, count, examples, images = source.annotations, found.count, found.examples, found.images
    seen = scan["object_names"]
    unknown = sorted(set(seen) - set(class_names))
    if unknown:
        # Stop: load_voc_instances raises ValueError at the first (class_names.index).
        stops.append(f"the annotations use object names that are not among the class names {list(class_names)}: "
                     f"{listed(unknown)}; add them to the class names or fix the XML")
    absent = [c for c in class_names if c not in seen]
    if absent and not scan["errors"]:
        # Stop: a class name that no object has is nearly always a typo, and a class without
        # ground truth gets no AP from the VOC evaluator.
        split = os.path.splitext(os.path.basename(ann))[0]
        stops.append(f"the class names {listed(absent)} never occur in the {split} annotations (a typo?); "
                     f"the names that occur are {sorted(seen)}")
    if count("voc_evaluator_fields") and use.test:
        # Stop for test sets only: training reads names and boxes; PascalVOCDetectionEvaluator
        # reads pose, truncated, difficult and integer corners, after hours of training.
        stops.append(f"{count('voc_evaluator_fields')} object(s) in {images('voc_evaluator_fields')} XML file(s) of "
                     f"{ann} lack what the VOC evaluator reads: {examples('voc_evaluator_fields')}; "
                     "PascalVOCDetectionEvaluator would stop at the first evaluation, after training: give every "
                     "object <pose>, integer <truncated> and <difficult> and integer bndbox corners, or leave this "
                     "dataset out of DATASETS.TEST")
    if count("voc_difficult"):
        # Continue: load_voc_instances keeps difficult objects (Detectron2 trains on them on
        # purpose); PascalVOCDetectionEvaluator ignores them, as the VOC benchmark does.
        fate = []
        if use.train:
            fate.append("Detectron2's VOC loader trains on them like any other object")
        if use.test:
            fate.append("PascalVOCDetectionEvaluator ignores them: a detection of one is neither a true nor a "
                        "false positive, and they do not count toward recall")
        warnings.append(f"{count('voc_difficult')} of the {scan['objects']} objects in {images('voc_difficult')} "
                        f"XML file(s) of {ann} are marked difficult: {examples('voc_difficult')}; {'; '.join(fate)}")
