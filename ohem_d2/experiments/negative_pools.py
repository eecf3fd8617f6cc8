"""The negative pools of an experiment (issue 20): the pool every arm trains on (and the bootstrap
arm mines), the held-out pool each finished run is scored on, and their synthetic version.

A detector's false alarms on background are what hard-negative mining is for, so the report counts
them where no arm has trained: each run's false positives per image on the held-out pool (every
detection on an image without objects that scores at least the report's threshold).
"""
import json
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..data.datasets import DatasetError
from ..data.negatives import dataset_files, judge_pools, pool_files
from ..data.synthetic import generate_synthetic_dataset
from ..engine.bootstrap import detection_scores, scoring_config
from ..engine.defaults import Trainer, build_config, config_argument_parser
from .report import NEGATIVES_FILE

TRAIN_POOL = "negatives_train"
HELD_OUT_POOL = "negatives_held_out"
FLAGS = {TRAIN_POOL: "--negatives", HELD_OUT_POOL: "--held-out-negatives"}
# The synthetic pools' seed, away from the positives' (0 by default) so that no image repeats.
SYNTHETIC_SEED_OFFSET = 1000


def synthetic_negatives(root, positives_settings, count):
    """``count`` pool and ``count`` held-out images drawn like the embedded dataset's
    (``positives_settings``: its generator settings) without objects: look-alikes and clutter only.
    Returns {TRAIN_POOL: folder, HELD_OUT_POOL: folder}."""
    settings = {k: v for k, v in positives_settings.items() if k not in ("generator_version", "class_names")}
    settings.update(num_train=count, num_val=count, objects_per_image=(0, 0),
                    seed=positives_settings["seed"] + SYNTHETIC_SEED_OFFSET)
    ds = generate_synthetic_dataset(root, **settings)
    return {TRAIN_POOL: ds.train_images, HELD_OUT_POOL: ds.val_images}


def check_pools(train, pools):
    """Stop before any run starts (:class:`DatasetError`, every problem listed) on a registered pool
    of ``pools`` ({name: folder}) that is missing, empty, unreadable, shares images with the
    training sets ``train``, or (the held-out one) with the training pool."""
    stops = judge_pools({name: f"{FLAGS[name]} {folder}" for name, folder in pools.items()}, dataset_files(train),
                        held_out=HELD_OUT_POOL if HELD_OUT_POOL in pools else None,
                        mined=TRAIN_POOL if TRAIN_POOL in pools else None)
    if stops:
        raise DatasetError("the negative pools cannot be used:\n- " + "\n- ".join(stops))


def held_out_false_positives(run_dir, pool, score_threshold):
    """The finished run's false positives on the held-out ``pool`` (a folder or list file): per
    image and how many images fire, in ``run_dir/``:data:`NEGATIVES_FILE` (kept for the same pool
    and threshold). Scored on a GPU if this machine has one, else on the CPU."""
    path = os.path.join(run_dir, NEGATIVES_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            known = json.load(f)
        if known["pool"] == pool and known["score_threshold"] == score_threshold:
            return known
    device = "cpu" if not torch.cuda.is_available() else "cuda"
    cfg = scoring_config(build_config(config_argument_parser().parse_args(
        ["--config-file", os.path.join(run_dir, "config.yaml"), "MODEL.DEVICE", device]), check=False), score_threshold)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    model.eval()
    files = pool_files(pool)
    counts = [sum(s >= score_threshold for s in scores) for scores in detection_scores(model, cfg, files).values()]
    result = {"pool": pool, "score_threshold": score_threshold, "images": len(files),
              "false_positives_per_image": sum(counts) / max(len(files), 1),
              "images_with_false_positives": sum(c > 0 for c in counts)}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result
