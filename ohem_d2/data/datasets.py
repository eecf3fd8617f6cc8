"""User datasets: registered from the config (or the command line), checked before training.

Detectron2 looks datasets up by name and reads their files only when a data loader or an
evaluator is built, so a typo in a name, a wrong ``DETECTRON2_DATASETS``, a VOC class list that
does not match the XML, an image file whose size differs from its annotation or a truncated JPEG
surfaces as an exception deep in a loader, for a test set only when the first evaluation starts,
after hours of training. ``check_datasets`` reads the annotation files and the image headers
(never the pixels) before training and reports every problem at once, each with its fix, with
those of the datasets' classes (``class_checks``); what Detectron2 handles safely comes back as
warnings. Its result is cached (``scan_cache``).

Registration itself is Detectron2's: ``register_coco_instances`` and ``register_pascal_voc``;
with ``DATASETS.SIZES_FROM_IMAGES`` their loaders' records get the image files' sizes. Negative
pools (background images, no objects) are datasets of their own: :mod:`ohem_d2.data.negatives`.
"""
import difflib
import logging
import os
import time

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import register_pascal_voc
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import PanopticFPN, ProposalNetwork, RetinaNet, SemanticSegmentor

from .checks import Source, Use, judge
from .class_checks import ClassOutputs, judge_class_lists, judge_num_classes
from . import negatives
from .scan import scan_coco, scan_voc

logger = logging.getLogger(__name__)

# PascalVOCDetectionEvaluator accepts only 2007 and 2012; 2012 selects the all-point AP of
# VOC2010+, the exact area under the precision/recall curve (2007 is the 11-point approximation).
VOC_YEAR = 2012

# The MetadataCatalog evaluator_type values that tools/train_net.py evaluates: "pascal_voc" with
# PascalVOCDetectionEvaluator, the others with COCOEvaluator. A dataset without one is "coco".
EVALUABLE_TYPES = ("coco", "coco_panoptic_seg", "pascal_voc")
DEFAULT_EVALUATOR_TYPE = "coco"
# Datasets whose json_file is a COCO instances file (LVIS ones have a json_file of their own format).
_COCO_FORMAT_TYPES = ("coco", "coco_panoptic_seg")

REGISTER_HOWTO = (
    "register it with --register-coco NAME JSON IMAGE_ROOT or "
    "DATASETS.REGISTER_COCO \"[['NAME', 'JSON', 'IMAGE_ROOT']]\" (a VOC-layout folder: "
    "DATASETS.REGISTER_VOC \"[['NAME', 'DIR', 'SPLIT', 'class1,class2']]\")"
)


class DatasetError(ValueError):
    """A dataset named by the config that cannot be registered or loaded as given."""


def add_dataset_config(cfg):
    """Add ``DATASETS.REGISTER_COCO``, ``REGISTER_VOC`` and ``SIZES_FROM_IMAGES`` (call before
    merging a file)."""
    # Entries [name, json_file, image_root]: COCO instances JSON and the folder of its images.
    cfg.DATASETS.REGISTER_COCO = []
    # Entries [name, dirname, split, "class1,class2,..."]: a folder with the Pascal VOC layout
    # (Annotations/, ImageSets/Main/<split>.txt, JPEGImages/) and its own class names.
    cfg.DATASETS.REGISTER_VOC = []
    # Entries [name, folder or list file]: a negative pool, background images without objects
    # (ohem_d2.data.negatives), trained on as images without GT whatever
    # DATALOADER.FILTER_EMPTY_ANNOTATIONS says (it applies to the other datasets).
    cfg.DATASETS.REGISTER_NEGATIVES = []
    # True: the datasets of DATASETS.TRAIN and TEST take each image's width and height from the
    # image file (after EXIF orientation) where the annotations say otherwise, and such
    # mismatches are warnings. False by default: a size that differs may mean boxes drawn at
    # another resolution or orientation, and trusting the file silently would train on
    # misplaced boxes, so the check stops and says which kind of mismatch it found.
    cfg.DATASETS.SIZES_FROM_IMAGES = False


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


def register_negatives(name, source):
    """Register a negative pool (a folder of background images, or a text file listing them);
    idempotent like ``register_coco``."""
    wanted = {negatives.SOURCE_KEY: os.path.abspath(source)}
    if not _already_registered(name, wanted):
        negatives.register_pool(name, wanted[negatives.SOURCE_KEY])
    return name


def register_datasets_from_config(cfg):
    """Register every ``DATASETS.REGISTER_COCO``/``REGISTER_VOC``/``REGISTER_NEGATIVES`` entry;
    return their names.

    Also makes the loaders of the datasets in DATASETS.TRAIN and TEST (Detectron2's builtin
    ones too) take image sizes from the image files if ``DATASETS.SIZES_FROM_IMAGES``, and
    gives them back Detectron2's own loaders if not.
    """
    names = []
    for entry in cfg.DATASETS.REGISTER_COCO:
        form = "[name, json_file, image_root]"
        names.append(register_coco(*_entry("REGISTER_COCO", entry, form, 3)))
    for entry in cfg.DATASETS.REGISTER_VOC:
        form = "[name, dirname, split, 'class1,class2,...']"
        name, dirname, split, classes = _entry("REGISTER_VOC", entry, form, 4)
        names.append(register_voc(name, dirname, split, classes.split(",")))
    for entry in cfg.DATASETS.REGISTER_NEGATIVES:
        names.append(register_negatives(*_entry("REGISTER_NEGATIVES", entry, "[name, folder or list file]", 2)))
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        if name in DatasetCatalog.list():
            take_sizes_from_image_files(name, cfg.DATASETS.SIZES_FROM_IMAGES)
    return names


def take_sizes_from_image_files(name, enabled=True):
    """Re-register ``name`` with a loader whose records have the image files' sizes (``enabled``),
    or with the loader it had before (not ``enabled``); a no-op if it already has that loader or
    is not a COCO-format or VOC-layout dataset."""
    loader = DatasetCatalog[name]
    if enabled == isinstance(loader, _SizesFromImageFiles) or (enabled and _source(name) is None):
        return
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _SizesFromImageFiles(name, loader) if enabled else loader.loader)


class _SizesFromImageFiles:
    """A dataset loader: the records of ``loader`` with the width and height that Detectron2
    reads from each image file, where the annotations say otherwise. The sizes come from the
    check's scan, which is cached: in each DDP process this costs a ``stat`` per file."""

    def __init__(self, name, loader):
        self.name, self.loader = name, loader

    def __call__(self):
        records = self.loader()
        file_sizes = _scan(self.name)[0]["file_sizes"]
        for record in records:
            if record["file_name"] in file_sizes:
                record["width"], record["height"] = file_sizes[record["file_name"]]
        return records


def evaluator_type(name):
    """The evaluator_type of dataset ``name``, which tools/train_net.py picks the evaluator by."""
    return MetadataCatalog.get(name).get("evaluator_type", DEFAULT_EVALUATOR_TYPE)


# Detectron2's meta-architectures whose class-predicting heads are not (only) the RoI heads, most
# derived first (PanopticFPN is a GeneralizedRCNN), with the config nodes of those heads.
_HEADS_BY_META_ARCH = ((PanopticFPN, ["ROI_HEADS", "SEM_SEG_HEAD"]), (RetinaNet, ["RETINANET"]),
                       (SemanticSegmentor, ["SEM_SEG_HEAD"]), (ProposalNetwork, []))


def _class_heads(meta_architecture):
    """Config nodes of the heads that predict classes in ``meta_architecture``: those of the
    Detectron2 class it derives from (OHEMRetinaNet: RetinaNet's), else the RoI heads'."""
    try:
        built = META_ARCH_REGISTRY.get(meta_architecture)
    except KeyError:  # Detectron2 reports an unknown name when it builds the model
        return ["ROI_HEADS"]
    return next((heads for base, heads in _HEADS_BY_META_ARCH if issubclass(built, base)), ["ROI_HEADS"])


def class_outputs(cfg):
    """The heads of a yacs config's model that predict classes (those its META_ARCHITECTURE
    builds), each with its NUM_CLASSES key; none for a config without MODEL."""
    if "MODEL" not in cfg:
        return []
    defaults = get_cfg().MODEL
    return [ClassOutputs(f"MODEL.{head}.NUM_CLASSES", cfg.MODEL[head].NUM_CLASSES, defaults[head].NUM_CLASSES,
                         f"MODEL.{head}.NUM_CLASSES {{}}", "stuff_classes" if head == "SEM_SEG_HEAD" else "thing_classes")
            for head in _class_heads(cfg.MODEL.META_ARCHITECTURE)]


def check_datasets(cfg, outputs=None):
    """Check the datasets in DATASETS.TRAIN and TEST before training, and their classes against
    each other and against the model's heads (``outputs``, a list of ``ClassOutputs``; default:
    ``class_outputs(cfg)``); return the warnings.

    Raises ``DatasetError`` listing every problem of every dataset that would stop or corrupt
    the run (with the warnings after them); returns the messages of the problems that Detectron2
    handles safely, each saying what will happen, for the caller to print. A check that stops
    nothing logs one line (INFO): the datasets, their image counts, its time, how many warnings.
    """
    start = time.perf_counter()
    train = list(dict.fromkeys(cfg.DATASETS.TRAIN))
    found, images, classes = {}, {}, {}
    use = {"filter_empty": cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
           "sizes_from_images": cfg.DATASETS.SIZES_FROM_IMAGES}
    pools = [name for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]) if negatives.is_pool(name)]
    for name in dict.fromkeys([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]):
        if name in pools:
            found[name] = _judge_pool(name, cfg, train)
            images[name] = len(negatives.pool_files(negatives.pool_source(name))) \
                if not found[name][0] else None
            continue
        dataset_stops, dataset_warnings, scan = _judge(name, Use(train=name in train, test=name in cfg.DATASETS.TEST,
                                                                **use))
        found[name] = (dataset_stops, dataset_warnings)
        images[name] = None if scan is None else scan["images"]
        if name in DatasetCatalog.list():
            classes[name] = _classes(name, scan)
    for name, message in judge_class_lists({name: c["thing_classes"] for name, c in classes.items()}, train):
        found[name][0].append(message)
    trained = next((name for name in train if name in classes), None)
    if trained is not None:
        class_stops, class_warnings = judge_num_classes(classes[trained], class_outputs(cfg) if outputs is None else outputs)
        found[trained][0].extend(class_stops)
        found[trained][1].extend(class_warnings)

    stops = [f"dataset {name!r}: {message}" for name, (messages, _) in found.items() for message in messages]
    warnings = [f"dataset {name!r}: {message}" for name, (_, messages) in found.items() for message in messages]
    if stops:
        failing = [name for name, (messages, _) in found.items() if messages]
        also = "\nWarnings (these alone would not stop the run):\n- " + "\n- ".join(warnings) if warnings else ""
        raise DatasetError(
            f"{len(failing)} dataset(s) of this run cannot be used:\n- " + "\n- ".join(stops) + also
        )
    counted = [f"{name} ({'no files to read' if n is None else f'{n} images'})" for name, n in images.items()]
    logger.info("datasets checked in %.2f s: %s; no problem stops the run, %d warning(s)",
                time.perf_counter() - start, ", ".join(counted) or "none", len(warnings))
    return warnings


# The training samplers that keep a negative pool's images (ohem_d2.engine.defaults.Trainer builds
# their loader); Detectron2's others would drop them with FILTER_EMPTY_ANNOTATIONS.
POOL_SAMPLERS = ("TrainingSampler", "HardImageTrainingSampler")


def _judge_pool(name, cfg, train):
    """(stops, warnings) of negative pool ``name`` in this run."""
    stops = []
    if name in cfg.DATASETS.TEST:
        stops.append("it is a negative pool, in DATASETS.TEST: it has no objects to measure AP on; leave it out of "
                     "DATASETS.TEST (tools/bootstrap.py --held-out-pool NAME counts false positives per image on one)")
    if name in train and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and cfg.DATALOADER.SAMPLER_TRAIN not in POOL_SAMPLERS:
        stops.append(f"it is a negative pool, and DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN} is built "
                     "by Detectron2, which drops images without annotations (FILTER_EMPTY_ANNOTATIONS True); use one "
                     f"of {', '.join(POOL_SAMPLERS)}, or DATALOADER.FILTER_EMPTY_ANNOTATIONS False")
    positives = negatives.dataset_files([n for n in train if not negatives.is_pool(n)]) if name in train else []
    pool_stops, pool_warnings = negatives.judge_pool(name, positives)
    return stops + pool_stops, pool_warnings


def _classes(name, scan):
    """{"thing_classes", "stuff_classes"} of a registered dataset, each None where unknown before
    loading it: a COCO JSON's categories as Detectron2 will number them, else the metadata's."""
    meta = MetadataCatalog.get(name)
    things = None if scan is None else scan["class_names"]
    return {"thing_classes": things if things is not None else meta.get("thing_classes", None),
            "stuff_classes": meta.get("stuff_classes", None)}


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


def _judge(name, use):
    """(stops, warnings, scan) of one dataset; the scan is None for a dataset whose files are
    not known (a custom loader) or not registered."""
    if name not in DatasetCatalog.list():
        close = difflib.get_close_matches(name, DatasetCatalog.list(), n=5)
        hint = f"did you mean {', '.join(map(repr, close))}? Otherwise " if close else ""
        return [f"no dataset of this name is registered; {hint}{REGISTER_HOWTO}"], [], None
    stops, warnings = [], []
    if use.test and evaluator_type(name) not in EVALUABLE_TYPES:
        # Stop: Trainer.build_evaluator would raise at the first evaluation, after training.
        stops.append(
            f"its evaluator_type is {evaluator_type(name)!r}, which tools/train_net.py cannot evaluate (it "
            f"evaluates {', '.join(EVALUABLE_TYPES)}; a dataset without evaluator_type counts as "
            f"{DEFAULT_EVALUATOR_TYPE}): leave it out of DATASETS.TEST, and evaluate the trained model on it "
            "afterwards with Detectron2's evaluator for that type (detectron2.evaluation)"
        )
    scanned = _scan(name)
    scan = None
    if scanned is not None:  # else registered with a custom loader and no file metadata
        scan, source = scanned
        found = judge(scan, source, use, MetadataCatalog.get(name).get("thing_classes", ()))
        stops, warnings = stops + found[0], found[1]
        if found[0] and _is_builtin_path(source.annotations):
            root = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
            stops.append(
                f"{name!r} is a Detectron2 builtin dataset, looked up under $DETECTRON2_DATASETS "
                f"(now {root}): set DETECTRON2_DATASETS to the folder that holds it (layout: "
                "https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html)"
            )
    return stops, warnings, scan


def _source(name):
    """Where the files of a COCO-format or VOC-layout dataset are; None for any other dataset."""
    meta = MetadataCatalog.get(name)
    json_file, image_root, dirname = (meta.get(k, None) for k in ("json_file", "image_root", "dirname"))
    if json_file is not None and image_root is not None and evaluator_type(name) in _COCO_FORMAT_TYPES:
        return Source(json_file, image_root, voc=False)
    if dirname is not None and meta.get("split", None) is not None:
        return Source(os.path.join(dirname, "ImageSets", "Main", meta.split + ".txt"),
                      os.path.join(dirname, "JPEGImages"), voc=True)
    return None


def _scan(name):
    """(scan, Source) of a COCO-format or VOC-layout dataset, or None for any other."""
    source = _source(name)
    if source is None:
        return None
    meta = MetadataCatalog.get(name)
    start = time.perf_counter()
    if source.voc:
        scan, from_cache = scan_voc(meta.dirname, meta.split)
    else:
        scan, from_cache = scan_coco(source.annotations, source.images)
    seconds = time.perf_counter() - start
    logger.debug(
        "dataset %r: %d images checked in %.3f s (%.3f s per 1000), %s", name, scan["images"], seconds,
        1000 * seconds / max(scan["images"], 1),
        "unchanged since the last check (cached)" if from_cache else "from their headers",
    )
    return scan, source


def _is_builtin_path(path):
    root = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
    return os.path.commonpath([root, os.path.abspath(path)]) == root
