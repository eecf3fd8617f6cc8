"""Hard-negative bootstrapping on Detectron2: the core of tools/bootstrap.py.

The rounds (which negatives train when) follow :mod:`ohem_d2.data.bootstrapping`; this module
trains, scores and keeps the record. By default the rounds share one training run: the config's
schedule (SOLVER.MAX_ITER, its LR steps and warm-up) is cut into ``rounds + 1`` equal segments and
round r fine-tunes from where round r-1 stopped, on its own training set, so that bootstrapping
costs the iterations of one ordinary run (``--from-scratch``: every round trains the whole schedule
anew from MODEL.WEIGHTS, the classic retraining). A round whose set is the last (see ``stop``)
trains to the end of the schedule.

Everything is written under ``OUTPUT_DIR``: ``bootstrap.json`` (settings, and per round its
negatives, the added and removed ones, the scores' summary, the test metrics, where its weights
are, the stop reason) and ``bootstrap/round_R/`` (``negatives.txt``, ``scores.json``, the
weights ``model.pth``).
Killed, it resumes at the round and iteration it reached: the state says which rounds are
trained and scored, and a round's training resumes from OUTPUT_DIR's last checkpoint.
It runs in one process (one GPU, or the CPU).
"""
import json
import logging
import os
import shutil

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.data import detection_utils
from detectron2.engine import default_setup
from detectron2.structures import pairwise_iou
from detectron2.utils.env import seed_all_rng

from ..data.bootstrapping import (
    CHOICES,
    BootstrapError,
    BootstrapSettings,
    Score,
    initial_negatives,
    next_round,
    score_image,
)
from ..data.datasets import DatasetError, register_negatives
from ..data.negatives import dataset_files, is_pool, judge_pools, pool_files, pool_source
from .defaults import USER_ERRORS, Trainer, build_config, training_argument_parser, write_eval_results

logger = logging.getLogger(__name__)

BOOTSTRAP_ERRORS = USER_ERRORS + (BootstrapError,)
STATE_FILE = "bootstrap.json"


def argument_parser(description=None):
    parser = training_argument_parser(description)
    group = parser.add_argument_group("bootstrapping (docs/HARD_IMAGES.md)")
    defaults = BootstrapSettings()
    group.add_argument("--pool", required=True, metavar="NAME",
                       help="the negative pool to mine (registered with --register-negatives NAME DIR)")
    group.add_argument("--held-out-pool", metavar="NAME",
                       help="a second negative pool, never trained on: its false positives per image are reported "
                            "every round")
    group.add_argument("--rounds", type=int, default=defaults.rounds, help="mining rounds after round 0 (default: %(default)s)")
    group.add_argument("--initial-negatives", type=int, default=defaults.initial_negatives,
                       help="random pool images in round 0 (default: %(default)s)")
    group.add_argument("--budget", type=int, default=defaults.budget,
                       help="hard negatives added per round, at most (default: %(default)s)")
    group.add_argument("--max-negatives", type=int, default=defaults.max_negatives,
                       help="cap on the negatives in the training set; 0: none (default: %(default)s)")
    group.add_argument("--score-thresh", type=float, default=defaults.score_thresh,
                       help="a detection this confident on a pool image is a false positive (default: %(default)s)")
    group.add_argument("--drop-thresh", type=float, default=defaults.drop_thresh,
                       help="a training negative whose highest score falls below this is dropped (default: %(default)s)")
    group.add_argument("--hard-positives", action="store_true",
                       help="repeat in the next round the positive images with an object the model misses")
    group.add_argument("--from-scratch", action="store_true",
                       help="every round trains the whole schedule from MODEL.WEIGHTS (default: the rounds share it)")
    group.add_argument("--bootstrap-seed", type=int, default=defaults.seed,
                       help="seed of round 0's random negatives and of --choose random (default: %(default)s)")
    group.add_argument("--choose", choices=CHOICES, default=defaults.choose,
                       help="which pool images a round adds: the hardest, or as many drawn at random (the control "
                            "that separates mining from a growing set of negatives; default: %(default)s)")
    return parser


def settings_of(args):
    return BootstrapSettings(rounds=args.rounds, initial_negatives=args.initial_negatives, budget=args.budget,
                             max_negatives=args.max_negatives, score_thresh=args.score_thresh,
                             drop_thresh=args.drop_thresh, hard_positives=args.hard_positives,
                             from_scratch=args.from_scratch, seed=args.bootstrap_seed, choose=args.choose)


def check(args, cfg, settings):
    """Everything that would stop the loop, before round 0 trains: one line each."""
    if args.num_gpus != 1 or args.num_machines != 1:
        raise BootstrapError(f"--num-gpus {args.num_gpus} --num-machines {args.num_machines}: bootstrapping runs in "
                             "one process (one GPU or the CPU); drop these options")
    if not settings.from_scratch and settings.rounds + 1 > cfg.SOLVER.MAX_ITER:
        raise BootstrapError(f"--rounds {settings.rounds}: the rounds share SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} "
                             "iterations, at least one per round; use fewer rounds or more iterations")
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise BootstrapError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: bootstrapping changes the "
                             "training set every round; it trains with TrainingSampler")
    for option, name in (("--pool", args.pool), ("--held-out-pool", args.held_out_pool)):
        if name is not None and not is_pool(name):
            raise BootstrapError(f"{option} {name!r} is not a registered negative pool; register it with "
                                 f"--register-negatives {name} DIR")
        if name is not None and name in cfg.DATASETS.TRAIN:
            raise BootstrapError(f"{option} {name!r} is in DATASETS.TRAIN: the pool's images train only as the rounds "
                                 "pick them; leave it out of DATASETS.TRAIN")
    if args.held_out_pool == args.pool:
        raise BootstrapError("--held-out-pool is --pool: a held-out pool must be one the rounds never train on")
    labels = {args.pool: f"--pool {args.pool!r}"}
    if args.held_out_pool:
        labels[args.held_out_pool] = f"--held-out-pool {args.held_out_pool!r}"
    stops = judge_pools(labels, dataset_files(cfg.DATASETS.TRAIN), held_out=args.held_out_pool, mined=args.pool)
    if stops:
        raise DatasetError("the negative pool cannot be used:\n- " + "\n- ".join(stops))


class Bootstrap:
    """The rounds of one bootstrapping run, resumable from ``OUTPUT_DIR/bootstrap.json``."""

    def __init__(self, cfg, args, settings):
        self.cfg, self.args, self.settings = cfg, args, settings
        self.path = os.path.join(cfg.OUTPUT_DIR, STATE_FILE)
        self.pool = pool_files(pool_source(args.pool))
        self.state = self._load()

    def _load(self):
        settings = dict(self.settings.as_dict(), pool=self.args.pool, held_out_pool=self.args.held_out_pool,
                        pool_source=pool_source(self.args.pool))
        if os.path.isfile(self.path):
            with open(self.path) as f:
                state = json.load(f)
            # A run started before a setting existed ran as its default does (--choose: hardest).
            state["settings"] = {**BootstrapSettings().as_dict(), **state["settings"]}
            if state["settings"] != settings:
                raise BootstrapError(f"{self.path} holds a bootstrapping run with other settings ({state['settings']}); "
                                     "use another OUTPUT_DIR, or the same settings to resume it")
            return state
        first = {"round": 0, "negatives": initial_negatives(self.pool, self.settings.initial_negatives,
                                                            self.settings.seed),
                 "hard_positives": [], "added": [], "removed": [], "final": self.settings.rounds == 0}
        return {"settings": settings, "rounds": [first], "stop": ""}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)

    def round_dir(self, r):
        path = os.path.join(self.cfg.OUTPUT_DIR, "bootstrap", f"round_{r}")
        os.makedirs(path, exist_ok=True)
        return path

    def end_iter(self, r, final):
        """The iteration round ``r`` trains to: its segment's end, or the schedule's if it is the last."""
        total = self.cfg.SOLVER.MAX_ITER
        if final or self.settings.from_scratch:
            return total
        return max(1, round(total * (r + 1) / (self.settings.rounds + 1)))

    def run(self):
        while True:
            entry = self.state["rounds"][-1]
            r = entry["round"]
            if "model" not in entry:
                self.train(entry)
            if "pool" not in entry:
                self.score(entry)
            if entry["final"]:
                self.state["done"] = True
                self.save()
                return self.state
            self.state["rounds"].append(self.plan_next(entry))
            self.save()
            logger.info("bootstrap round %d -> %d: %d negatives (%d added, %d removed)%s", r, r + 1,
                        len(self.state["rounds"][-1]["negatives"]), len(self.state["rounds"][-1]["added"]),
                        len(self.state["rounds"][-1]["removed"]),
                        f"; the last round: {self.state['stop']}" if self.state["stop"] else "")

    def round_config(self, entry):
        """The config that trains round ``entry``: the positives (and repeated hard positives) plus
        the round's negatives, registered as a pool of their own."""
        r, folder = entry["round"], self.round_dir(entry["round"])
        listing = os.path.join(folder, "negatives.txt")
        with open(listing, "w") as f:
            f.write("".join(p + "\n" for p in entry["negatives"]))
        train = list(self.cfg.DATASETS.TRAIN)
        if entry["negatives"]:
            train.append(register_negatives(f"{self.args.pool}__bootstrap_round{r}", listing))
        if entry["hard_positives"]:
            train.append(self._hard_positive_dataset(r, set(entry["hard_positives"])))
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TRAIN = tuple(train)
        if self.settings.from_scratch:
            cfg.OUTPUT_DIR = os.path.join(folder, "train")
        cfg.freeze()
        return cfg

    def _hard_positive_dataset(self, r, files):
        name = f"bootstrap_hard_positives_round{r}"
        if name not in DatasetCatalog.list():
            positives = list(self.cfg.DATASETS.TRAIN)
            DatasetCatalog.register(name, lambda: [d for n in positives for d in DatasetCatalog.get(n)
                                                   if d["file_name"] in files])
        return name

    def train(self, entry):
        r = entry["round"]
        cfg = self.round_config(entry)
        if cfg.SEED >= 0:
            # The round's sampler seed and initialisation draws, the same in a run resumed here as in
            # one that went on in the same process (where round r-1's training moved the generators).
            seed_all_rng(cfg.SEED + r)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=True)  # the run's last checkpoint; MODEL.WEIGHTS before round 0
        # The schedule (LR steps, warm-up) is the config's SOLVER.MAX_ITER; this round stops at its end.
        trainer.max_iter = self.end_iter(r, entry["final"])
        logger.info("bootstrap round %d: %d negatives, %d repeated positives, iterations %d-%d", r,
                    len(entry["negatives"]), len(entry["hard_positives"]), trainer.start_iter, trainer.max_iter)
        trainer.train()
        model_path = os.path.join(self.round_dir(r), "model.pth")
        # The weights alone (the optimizer's state stays in OUTPUT_DIR's checkpoints, which resume):
        # a round's model is what scores the pool and what a user keeps.
        torch.save({"model": trainer.model.state_dict(), "iteration": trainer.max_iter}, model_path)
        entry["model"] = os.path.relpath(model_path, self.cfg.OUTPUT_DIR)
        entry["metrics"] = getattr(trainer, "_last_eval_results", None) or {}
        entry["end_iter"] = trainer.max_iter
        self.save()

    def model(self, entry):
        model = Trainer.build_model(scoring_config(self.cfg, self.settings.lowest_score_read))
        DetectionCheckpointer(model).load(os.path.join(self.cfg.OUTPUT_DIR, entry["model"]))
        model.eval()
        return model

    def score(self, entry):
        """Score every pool image (and the held-out pool's, and with --hard-positives the positives)
        with the round's model."""
        model = self.model(entry)
        scores = detection_scores(model, self.cfg, self.pool)
        per_image = {f: score_image(s, self.settings.score_thresh) for f, s in scores.items()}
        with open(os.path.join(self.round_dir(entry["round"]), "scores.json"), "w") as f:
            json.dump({p: [s.max_score, s.false_positives] for p, s in per_image.items()}, f)
        entry["pool"] = summary(per_image, set(entry["negatives"]))
        if self.args.held_out_pool:
            held_out = pool_files(pool_source(self.args.held_out_pool))
            held = {f: score_image(s, self.settings.score_thresh)
                    for f, s in detection_scores(model, self.cfg, held_out).items()}
            entry["held_out"] = summary(held, set())
        if self.settings.hard_positives and not entry["final"]:
            entry["missed_positives"] = missed_positives(model, self.cfg, self.settings)
        self.save()

    def plan_next(self, entry):
        scores_path = os.path.join(self.round_dir(entry["round"]), "scores.json")
        with open(scores_path) as f:
            scores = {p: Score(*v) for p, v in json.load(f).items()}
        plan = next_round(entry["negatives"], scores, self.settings, rounds_done=entry["round"])
        if plan.stop:
            self.state["stop"] = plan.stop
        return {"round": entry["round"] + 1, "negatives": plan.negatives,
                "hard_positives": entry.get("missed_positives", []), "added": plan.added,
                "removed": plan.removed, "final": bool(plan.stop)}


def scoring_config(cfg, lowest):
    """``cfg`` for a model that scores pool images: its test score thresholds (RoI heads, RetinaNet)
    at most ``lowest``, the lowest score a rule compares with, so that a detection between that and
    the config's SCORE_THRESH_TEST counts (a negative whose best detection lies there would read as
    0, and be dropped, or a false positive go uncounted). Test metrics keep the config's threshold."""
    scoring = cfg.clone()
    scoring.defrost()
    for head in (scoring.MODEL.ROI_HEADS, scoring.MODEL.RETINANET):
        head.SCORE_THRESH_TEST = min(head.SCORE_THRESH_TEST, lowest)
    scoring.freeze()
    return scoring


def summary(per_image, training):
    """False positives of a scored pool: per image, and how many images fire, outside the
    training set (``training``: its negatives) and inside it."""
    outside = [s for f, s in per_image.items() if f not in training]
    inside = [s for f, s in per_image.items() if f in training]
    return {
        "images": len(per_image),
        "false_positives_per_image": sum(s.false_positives for s in per_image.values()) / max(len(per_image), 1),
        "images_firing_outside_training": sum(s.false_positives > 0 for s in outside),
        "images_firing_in_training": sum(s.false_positives > 0 for s in inside),
    }


@torch.no_grad()
def detection_scores(model, cfg, files):
    """{file: [score of each detection]} of ``model`` on the images ``files`` (Detectron2's test
    mapper and loader; sizes read by the mapper)."""
    records = [{"file_name": f, "image_id": i} for i, f in enumerate(files)]
    loader = build_detection_test_loader(dataset=records, mapper=_SizedMapper(cfg), num_workers=0)
    scores = {}
    for inputs in loader:
        for record, output in zip(inputs, model(inputs)):
            scores[record["file_name"]] = output["instances"].scores.tolist()  # host: the scores go to JSON
    return scores


class _SizedMapper(DatasetMapper):
    """Detectron2's test-time mapper for records without a recorded size (it takes the image's)."""

    def __init__(self, cfg):
        super().__init__(cfg, is_train=False)

    def __call__(self, record):
        image = detection_utils.read_image(record["file_name"], format=self.image_format)
        record = dict(record, height=image.shape[0], width=image.shape[1])
        return super().__call__(record)


@torch.no_grad()
def missed_positives(model, cfg, settings):
    """The positive training images with an object no detection of its class finds (IoU >=
    ``positive_iou``, score >= ``score_thresh``)."""
    records = [d for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    # The test-time resize, with the GT boxes (is_train keeps the annotations).
    mapper = DatasetMapper(is_train=True, augmentations=detection_utils.build_augmentation(cfg, is_train=False),
                           image_format=cfg.INPUT.FORMAT)
    loader = build_detection_test_loader(dataset=records, mapper=mapper, num_workers=0)
    missed = []
    for inputs in loader:
        for record, output in zip(inputs, model(inputs)):
            gt = record["instances"]
            found = output["instances"]
            found = found[found.scores >= settings.score_thresh]
            if len(gt) == 0:
                continue
            # GT boxes are in the input's resolution; detections in the original's.
            scale_x, scale_y = record["width"] / gt.image_size[1], record["height"] / gt.image_size[0]
            gt_boxes = gt.gt_boxes.clone()
            gt_boxes.scale(scale_x, scale_y)
            iou = pairwise_iou(gt_boxes, found.pred_boxes.to(gt_boxes.device)) if len(found) else None
            same_class = gt.gt_classes[:, None] == found.pred_classes[None, :].to(gt.gt_classes.device) \
                if len(found) else None
            hit = ((iou >= settings.positive_iou) & same_class).any(dim=1) if iou is not None \
                else torch.zeros(len(gt), dtype=torch.bool)
            if not bool(hit.all()):  # host: one decision per image
                missed.append(record["file_name"])
    return sorted(missed)


def prepare(args):
    """The run of ``args`` (tools/bootstrap.py's options), its config, pools and state checked:
    raises one of :data:`BOOTSTRAP_ERRORS` before anything trains."""
    settings = settings_of(args)
    cfg = build_config(args)
    check(args, cfg, settings)
    state_file = os.path.join(cfg.OUTPUT_DIR, STATE_FILE)
    if os.path.isfile(state_file) and not args.resume:
        raise BootstrapError(f"{state_file} exists: OUTPUT_DIR holds a bootstrapping run; pass --resume to continue "
                             "it, or give another OUTPUT_DIR")
    if not os.path.isfile(state_file) and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        # Round 0 would resume from it (every round resumes the run's last checkpoint).
        raise BootstrapError(f"OUTPUT_DIR {cfg.OUTPUT_DIR} holds another run's checkpoints (last_checkpoint) and no "
                             f"{STATE_FILE}; give bootstrapping an OUTPUT_DIR of its own")
    boot = Bootstrap(cfg, args, settings)
    default_setup(cfg, args)
    boot.save()  # before round 0 trains: a restart without --resume, or with other settings, is refused
    return boot


def run(boot):
    """The rounds, then the last round's test metrics in OUTPUT_DIR/eval_results.json. Returns the state."""
    state = boot.run()
    if boot.settings.from_scratch:  # each round trained in its own folder; the result is the last round's
        shutil.copyfile(os.path.join(boot.cfg.OUTPUT_DIR, state["rounds"][-1]["model"]),
                        os.path.join(boot.cfg.OUTPUT_DIR, "model_final.pth"))
    write_eval_results(boot.cfg.OUTPUT_DIR, state["rounds"][-1].get("metrics"))
    return state
