"""Training-step speed and memory of each comparison arm against Detectron2's stock sampler: the
core of tools/benchmark.py. How it measures (interleaved blocks, data-dependent FrozenBN init,
per-arm peak memory) is explained in docs/BENCHMARK.md."""
import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Deprecation chatter from torch / Detectron2 imports (torch.jit.script, torch.cuda.amp) would
# bury the table; the measurement does not depend on it.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*torch.cuda.amp.*")
warnings.filterwarnings("ignore", message="torch.meshgrid")
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
logging.getLogger("detectron2.data.datasets.coco").setLevel(logging.ERROR)  # "category ids ... mapping"

import numpy as np
import torch

import detectron2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from .. import model_zoo
from ..arms import ARMS, RETINANET_BY_KIND, UnknownArmError, arm_overrides
from ..config import add_ohem_config, validate_ohem_config
from ..modeling.settings import OHEMConfigError

# A checkout's neighbour folder of shared data (the benchmark's default images).
DEFAULT_IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128" / "train2017"

def has_readonly_pass(arm):
    """Whether ``arm`` trains with OHEM's two-pass mode, the only one with a read-only pass."""
    _, kind, overrides = ARMS[arm]
    return kind == "ohem" and "loss_zeroing" not in overrides


def is_retinanet_arm(arm):
    return ARMS[arm][1] in RETINANET_BY_KIND


# Any arm of ohem_d2.arms can be measured on the models of its meta-architecture (a RetinaNet arm on
# the RetinaNet, the others on the R-CNNs); a model's default arms run unless --arms says otherwise.
RCNN_ARMS = ("stock", "ohem", "ohem_loss_zeroing")
RETINANET_ARMS = ("retinanet_focal", "retinanet_ohem", "retinanet_ssd")


@dataclass(frozen=True)
class Head:
    label: str  # the model's name in the table, after "R<depth>-"
    config: str  # the stock model-zoo config (ohem_d2.model_zoo); each arm's overrides turn it into the arm
    overrides: tuple = ()
    annotations: str = "instances_{folder}.json"  # default annotations file name, beside the images
    default_arms: tuple = RCNN_ARMS  # the first is the stock arm, every ratio's reference

    @property
    def stock_arm(self):
        return self.default_arms[0]

    def takes(self, arm):
        """Whether ``arm`` applies to this model (the same meta-architecture)."""
        return is_retinanet_arm(arm) == is_retinanet_arm(self.stock_arm)


HEADS = {
    "fpn": Head("FPN", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"),
    "c4": Head("C4", "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"),
    # Mask R-CNN with bitmask targets: what the RoI head gathers per RoI is a full-image mask, so
    # this is where gathering targets for all candidates rather than the mined RoIs would show.
    "mask": Head("FPN-Mask (bitmask)", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
                 ("INPUT.MASK_FORMAT", "bitmask"), "instances_{folder}_segm.json"),
    # Anchor-level mining: what the RetinaNet arms add is per-anchor losses on outputs the stock
    # loss computes anyway, a top-k and an NMS over a bounded candidate set.
    "retinanet": Head("RetinaNet", "COCO-Detection/retinanet_R_50_FPN_1x.yaml", default_arms=RETINANET_ARMS),
}


@dataclass(frozen=True)
class Precision:
    label: str
    amp_dtype: object = None  # torch dtype of SOLVER.AMP's autocast, None for fp32
    readonly_dtype: str = "float32"  # MODEL.OHEM.READONLY_DTYPE
    readonly_channels_last: bool = False  # MODEL.OHEM.READONLY_CHANNELS_LAST
    reference: str = ""  # precision whose stock arm is the baseline ("" = itself)
    readonly_only: bool = False  # applies only to arms with a read-only pass (has_readonly_pass)


PRECISIONS = {
    "fp32": Precision("fp32"),
    # SOLVER.AMP.ENABLED: Detectron2's AMPTrainer, whose default autocast dtype is fp16.
    "amp": Precision("AMP fp16", amp_dtype=torch.float16),
    "amp_bf16": Precision("AMP bf16", amp_dtype=torch.bfloat16),
    # fp32 training, OHEM's read-only pass in bf16: only two-pass arms have a read-only pass.
    "fp32_bf16ro": Precision("fp32 + bf16 read-only", readonly_dtype="bfloat16", reference="fp32",
                             readonly_only=True),
    # ... and in fixed shapes, C4's res5 in channels_last (MODEL.OHEM.READONLY_CHANNELS_LAST).
    "fp32_bf16ro_cl": Precision("fp32 + bf16 channels_last read-only", readonly_dtype="bfloat16",
                                readonly_channels_last=True, reference="fp32", readonly_only=True),
}

SUITES = {
    "gpu": dict(
        device="cuda", warmup=10, iters=30, block=5, threads=None,
        heads=["fpn", "c4"], precisions=["fp32", "amp", "fp32_bf16ro", "fp32_bf16ro_cl"],
        # channels_last only changes C4's res5 (the FPN heads' box head has no convolution).
        skip_by_default=[("fpn", "fp32_bf16ro_cl"), ("mask", "fp32_bf16ro_cl")],
        overrides=[
            "MODEL.WEIGHTS", "",
            "SOLVER.IMS_PER_BATCH", 2,
            "INPUT.MIN_SIZE_TRAIN", (800,),
            "INPUT.MAX_SIZE_TRAIN", 1333,
        ],
    ),
    "cpu": dict(
        # One intra-op thread: on a small shared machine, OpenMP threads spinning at barriers while
        # other processes hold the cores made steps 10x slower and erratic with 2 threads.
        device="cpu", warmup=1, iters=3, block=1, threads=1,
        heads=["fpn", "c4"], precisions=["fp32", "fp32_bf16ro", "fp32_bf16ro_cl"],
        # bf16 convolutions on a CPU without bf16 units are ~10x slower than fp32: C4's res5
        # read-only pass in bf16 would dominate the run, so it runs only when asked for.
        skip_by_default=[("c4", "fp32_bf16ro"), ("fpn", "fp32_bf16ro_cl"), ("c4", "fp32_bf16ro_cl")],
        overrides=[
            "MODEL.WEIGHTS", "",
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.RESNETS.WIDTH_PER_GROUP", 16,  # C4's res5 head: 128 bottleneck channels
            "MODEL.FPN.OUT_CHANNELS", 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
            "SOLVER.IMS_PER_BATCH", 2,
            "INPUT.MIN_SIZE_TRAIN", (128,),
            "INPUT.MAX_SIZE_TRAIN", 192,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 256,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
        ],
    ),
}


class BenchmarkError(Exception):
    """Bad input: reported as one line, no traceback."""


def log(msg):
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Command line


def argument_parser(description=None):
    """The options of a benchmark (tools/benchmark.py's command line)."""
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "arms: " + ", ".join(ARMS) + "; heads: " + ", ".join(HEADS) + "; precisions: "
            + ", ".join(PRECISIONS) + " (fp32_bf16ro: fp32 training with MODEL.OHEM.READONLY_DTYPE "
            "bfloat16, two-pass OHEM arms only; amp/amp_bf16 need CUDA).\n\nexamples:\n"
            "  python tools/benchmark.py --suite gpu --out results/benchmark_gpu\n"
            "  python tools/benchmark.py --suite cpu --out /tmp/bench_cpu\n"
            "  python tools/benchmark.py --suite ops --out /tmp/ops\n"
            "  python tools/benchmark.py --suite gpu --heads fpn --precisions amp_bf16 "
            "MODEL.OHEM.READONLY_CHUNK_SIZE 0"
        ),
    )
    parser.add_argument("--suite", choices=sorted(SUITES) + ["ops", "readonly"], default="cpu",
                        help="preset sizes and defaults: gpu = the real R50 measurement (CUDA), "
                             "cpu = smoke-size run, ops = count one step's aten ops and host syncs "
                             "on the CPU (ohem_d2.experiments.op_count; --out gets ops.json), readonly = how "
                             "often a bf16 / fixed-shape read-only pass selects other RoIs than fp32, on "
                             "--iters random batches (ohem_d2.experiments.readonly_agreement) (default: cpu)")
    parser.add_argument("--arms", help="comma-separated arms among " + ",".join(ARMS)
                        + "; each model runs those of its meta-architecture, and its stock arm, every "
                        "ratio's reference (default: " + ",".join(RCNN_ARMS) + " on the R-CNNs, "
                        + ",".join(RETINANET_ARMS) + " on retinanet)")
    parser.add_argument("--heads", help="comma-separated heads among " + ",".join(HEADS)
                        + " (default: the suite's; mask needs mask annotations, so it runs alone)")
    parser.add_argument("--precisions", help="comma-separated precisions among " + ",".join(PRECISIONS)
                        + " (default: suite's)")
    parser.add_argument("--iters", type=int, help="timed iterations per arm (default: suite's)")
    parser.add_argument("--warmup", type=int, help="untimed iterations per arm first (default: suite's)")
    parser.add_argument("--block", type=int,
                        help="iterations an arm runs before the next arm's turn (default: suite's)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: suite's)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op CPU threads (default: 1 for --suite cpu, torch's default for gpu)")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES),
                        help="folder of COCO-style training images (default: %(default)s)")
    parser.add_argument("--annotations",
                        help="COCO instances JSON of --images (default: "
                             "IMAGES/../annotations/instances_<folder name>.json; with --heads mask, "
                             "instances_<folder name>_segm.json)")
    parser.add_argument("--image-size", default="320x480",
                        help="HxW of the synthetic images of --suite ops and readonly (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default: 0)")
    parser.add_argument("--out", help="folder to write benchmark.md and benchmark.json to")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides applied to every arm, after the suite's (Detectron2 style)")
    return parser


def _pick(value, valid, what):
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise BenchmarkError(f"unknown {what} {unknown[0]!r}: expected one of {', '.join(valid)}")
    if not names:
        raise BenchmarkError(f"no {what} given")
    return list(dict.fromkeys(names))


@dataclass
class Plan:
    suite: str
    device: str
    warmup: int
    iters: int
    block: int
    combos: list  # (head, precision, arm)
    images: Path
    annotations: Path
    overrides: list
    seed: int
    out: object
    threads: object = None


def make_plan(args):
    suite = SUITES[args.suite]
    if len(args.opts) % 2:
        raise BenchmarkError(f"config overrides must be KEY VALUE pairs, got {len(args.opts)} items: "
                             f"{' '.join(args.opts)}")
    arms = _pick(args.arms, ARMS, "arm") if args.arms is not None else None
    heads = _pick(args.heads, HEADS, "head") if args.heads is not None else list(suite["heads"])
    precisions = (_pick(args.precisions, PRECISIONS, "precision") if args.precisions is not None
                  else list(suite["precisions"]))
    warmup = suite["warmup"] if args.warmup is None else args.warmup
    iters = suite["iters"] if args.iters is None else args.iters
    block = suite["block"] if args.block is None else args.block
    threads = suite["threads"] if args.threads is None else args.threads
    if iters < 1 or warmup < 0 or block < 1 or (threads is not None and threads < 1):
        raise BenchmarkError("--iters, --block and --threads must be >= 1 and --warmup >= 0")

    device = args.device or suite["device"]
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise BenchmarkError(f"unknown --device {device!r}: expected cpu, cuda or cuda:N")
    if args.suite == "gpu" and device == "cpu":
        raise BenchmarkError("--suite gpu measures on CUDA; use --suite cpu to run on the CPU")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchmarkError(
                f"--suite {args.suite} --device {device} needs CUDA, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); on a machine without a GPU use --suite cpu"
            )
        if device[5:] and int(device[5:]) >= torch.cuda.device_count():
            raise BenchmarkError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    else:
        amp = [p for p in precisions if PRECISIONS[p].amp_dtype is not None]
        if amp:
            raise BenchmarkError(
                f"precision {amp[0]!r} needs CUDA (Detectron2's AMPTrainer is CUDA-only); "
                "on the CPU use --precisions fp32,fp32_bf16ro"
            )

    skip = set() if args.precisions is not None else set(suite.get("skip_by_default", ()))
    combos = []
    for head in heads:
        stock = HEADS[head].stock_arm  # always measured: every ratio's reference
        chosen = [a for a in (arms or HEADS[head].default_arms) if HEADS[head].takes(a)]
        if not chosen:
            raise BenchmarkError(f"no arm of --arms {','.join(arms)} applies to head {head!r}: RetinaNet arms "
                                 "apply to --heads retinanet, the others to the R-CNN heads (fpn, c4, mask)")
        head_arms = [stock] + [a for a in chosen if a != stock]
        for prec in precisions:
            if (head, prec) in skip:
                continue
            p = PRECISIONS[prec]
            measured = [(head, prec, arm) for arm in head_arms
                        if not (arm == stock and p.reference)  # the baseline of fp32_bf16ro is stock fp32
                        and (has_readonly_pass(arm) or not p.readonly_only)]
            combos += measured
            if measured and p.reference and (head, p.reference, stock) not in combos:
                combos.insert(0, (head, p.reference, stock))
    if not combos:
        raise BenchmarkError(f"no arm applies to --precisions {','.join(precisions)} "
                             "(fp32_bf16ro only applies to two-pass OHEM arms)")
    combos.sort(key=lambda c: (list(HEADS).index(c[0]), list(PRECISIONS).index(c[1]), list(ARMS).index(c[2])))

    images = Path(args.images)
    if not images.is_dir():
        raise BenchmarkError(f"images folder not found: {images} (give one with --images DIR)")
    annotation_names = {HEADS[h].annotations for h in heads}
    if len(annotation_names) > 1:
        raise BenchmarkError(f"--heads {','.join(heads)}: the mask head trains on mask annotations and "
                             "bitmask inputs, the others do not; run it on its own (--heads mask)")
    annotations = (Path(args.annotations) if args.annotations
                   else images.parent / "annotations" / annotation_names.pop().format(folder=images.name))
    if not annotations.is_file():
        raise BenchmarkError(f"annotations file not found: {annotations} (give one with --annotations FILE)")
    out = Path(args.out) if args.out else None
    if out is not None:  # fail now, not after the measurement
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".benchmark_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise BenchmarkError(f"cannot write to --out {out}: {e.strerror or e}") from None
    overrides = list(suite["overrides"]) + list(args.opts)
    return Plan(args.suite, device, warmup, iters, block, combos, images, annotations, overrides,
                args.seed, out, threads)


# ----------------------------------------------------------------------------------------------
# Config, data, models


def build_cfg(plan, head, prec, arm):
    """The arm's config: the head's stock model-zoo YAML turned into the arm (ohem_d2.arms), then
    the precision, then the suite's and the user's overrides."""
    path = Path(model_zoo.get_config_file(HEADS[head].config))
    p = PRECISIONS[prec]
    cfg = get_cfg()
    add_ohem_config(cfg)
    cfg.merge_from_file(str(path))
    try:
        applied = arm_overrides(arm, cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.META_ARCHITECTURE,
                                cfg.MODEL.PROPOSAL_GENERATOR.NAME)
    except UnknownArmError as e:
        raise BenchmarkError(f"{e} (the benchmark's models: {', '.join(HEADS)})") from None
    applied += ["MODEL.DEVICE", plan.device, "SOLVER.AMP.ENABLED", p.amp_dtype is not None,
                "DATALOADER.NUM_WORKERS", 0, *HEADS[head].overrides]
    if ARMS[arm][1] == "ohem":
        applied += ["MODEL.OHEM.READONLY_DTYPE", p.readonly_dtype,
                    "MODEL.OHEM.READONLY_CHANNELS_LAST", p.readonly_channels_last]
    applied += plan.overrides
    try:
        cfg.merge_from_list(applied)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise BenchmarkError(f"bad config override for {arm} {head}: {e}".replace("\n", " ")) from None
    if cfg.MODEL.DEVICE != plan.device:
        raise BenchmarkError("set the device with --device, not MODEL.DEVICE")
    if cfg.SOLVER.AMP.ENABLED != (p.amp_dtype is not None):
        raise BenchmarkError("set AMP with --precisions amp|amp_bf16, not SOLVER.AMP.ENABLED")
    if ARMS[arm][1] == "ohem":
        try:
            validate_ohem_config(cfg)
        except OHEMConfigError as e:
            raise BenchmarkError(str(e)) from None
    cfg.freeze()
    return cfg, path, _pairs(applied)


def _pairs(flat):
    """[k1, v1, k2, v2, ...] -> [[k1, v1], ...], values made JSON-friendly."""
    return [[k, v if isinstance(v, (str, int, float, bool)) else list(v)] for k, v in zip(flat[::2], flat[1::2])]


def head_name(cfg, head):
    return f"R{cfg.MODEL.RESNETS.DEPTH}-{HEADS[head].label}"


def load_batches(cfg, plan, count):
    """``count`` training batches from Detectron2's own mapper and loader, loaded once."""
    key = hashlib.sha1(f"{plan.images.resolve()}|{plan.annotations.resolve()}".encode()).hexdigest()[:10]
    name = f"ohem_benchmark_{key}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(plan.annotations), str(plan.images))
    try:
        dicts = get_detection_dataset_dicts([name], filter_empty=True)
    except Exception as e:  # unreadable / malformed JSON
        raise BenchmarkError(f"cannot read {plan.annotations}: {e}".replace("\n", " ")) from None
    ims = cfg.SOLVER.IMS_PER_BATCH
    if len(dicts) < ims:
        raise BenchmarkError(f"{plan.images} has {len(dicts)} annotated images, fewer than "
                             f"SOLVER.IMS_PER_BATCH = {ims}")
    count = max(1, min(count, len(dicts) // ims))
    random.seed(plan.seed)
    np.random.seed(plan.seed)
    torch.manual_seed(plan.seed)
    loader = build_detection_train_loader(
        dicts, mapper=DatasetMapper(cfg, is_train=True),
        sampler=TrainingSampler(len(dicts), shuffle=True, seed=plan.seed),
        total_batch_size=ims, aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, num_workers=0,
    )
    it = iter(loader)
    try:
        batches = [next(it) for _ in range(count)]
    except FileNotFoundError as e:
        raise BenchmarkError(f"image listed in {plan.annotations} not found: {e.filename}") from None
    del it, loader
    return batches


class Cycle:
    """A data loader over pre-loaded batches: batch k of every arm is the same."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        k = 0
        while True:
            yield self.batches[k % len(self.batches)]
            k += 1


@torch.no_grad()
def calibrate_frozen_bn(model, batch):
    """Set every FrozenBN's statistics to those of its input on ``batch`` (docs/BENCHMARK.md: a
    random ResNet with identity FrozenBN statistics overflows fp16 and is not what a real run computes)."""
    def pre_hook(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if not hooks:
        return 0
    try:
        with EventStorage():
            model(batch)  # training mode: the C4 head's res5 sees RoIs, as in training
    finally:
        for h in hooks:
            h.remove()
    return len(hooks)


@dataclass
class Arm:
    head: str
    prec: str
    arm: str
    cfg: object
    config_path: Path
    overrides: list
    trainer: object = None
    storage: object = None
    step: int = 0
    warmup_times: list = field(default_factory=list)
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # process CPU time of each timed iteration
    grad_scales: list = field(default_factory=list)  # AMP: GradScaler scale after each timed iteration
    batch_ids: list = field(default_factory=list)
    peak_bytes: int = 0
    peak_detail: dict = field(default_factory=dict)

    @property
    def key(self):
        return f"{self.arm}/{self.head}/{self.prec}"


def resident_bytes(arm):
    """Bytes of the arm's tensors living across steps: parameters, buffers, grads, optimizer state."""
    model, optimizer = arm.trainer.model, arm.trainer.optimizer
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    scaler = getattr(arm.trainer, "grad_scaler", None)
    if scaler is not None:
        tensors += [v for v in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None))
                    if torch.is_tensor(v)]
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "cuda":
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def build_arms(plan):
    arms = [Arm(h, p, a, *build_cfg(plan, h, p, a)) for h, p, a in plan.combos]
    # Every arm must see the same inputs: one set of batches per input config.
    data_key = {a.key: (a.cfg.INPUT.dump(), a.cfg.SOLVER.IMS_PER_BATCH) for a in arms}
    if len(set(data_key.values())) != 1:
        raise BenchmarkError("the arms' INPUT / SOLVER.IMS_PER_BATCH configs differ; their inputs would too")
    batches = load_batches(arms[0].cfg, plan, plan.warmup + plan.iters)
    sizes = [[list(d["image"].shape[-2:]) for d in b] for b in batches]
    log(f"{len(batches)} batches of {arms[0].cfg.SOLVER.IMS_PER_BATCH} images loaded from {plan.images} "
        f"(first: {sizes[0]})")

    weights = {}
    for a in arms:
        if a.head in weights:
            continue
        torch.manual_seed(plan.seed)
        ref = build_model(a.cfg)
        if a.cfg.MODEL.WEIGHTS:
            try:
                DetectionCheckpointer(ref).load(a.cfg.MODEL.WEIGHTS)
            except Exception as e:  # missing file, no network for a URL, wrong format
                raise BenchmarkError(f"cannot load MODEL.WEIGHTS {a.cfg.MODEL.WEIGHTS}: {e}".replace("\n", " ")) \
                    from None
            n = 0
        else:
            n = calibrate_frozen_bn(ref, batches[0])
        weights[a.head] = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        log(f"{head_name(a.cfg, a.head)}: initial weights ready ({n} FrozenBN calibrated)")
        del ref

    for a in arms:
        model = build_model(a.cfg)
        model.load_state_dict(weights[a.head])
        optimizer = build_optimizer(a.cfg, model)
        for group in optimizer.param_groups:  # LR of a real run's first (warmup) iteration
            group["lr"] *= a.cfg.SOLVER.WARMUP_FACTOR
        amp_dtype = PRECISIONS[a.prec].amp_dtype
        if amp_dtype is not None:
            a.trainer = AMPTrainer(model, Cycle(batches), optimizer, precision=amp_dtype)
        else:
            a.trainer = SimpleTrainer(model, Cycle(batches), optimizer)
        a.storage = a.trainer.storage = EventStorage(0)
    if plan.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = bool(arms[0].cfg.CUDNN_BENCHMARK)
    return arms, batches, sizes


# ----------------------------------------------------------------------------------------------
# Measurement


def run_iterations(arm, n, timed, cuda):
    times = arm.times if timed else arm.warmup_times
    with arm.storage:
        for _ in range(n):
            arm.trainer.iter = arm.storage.iter = arm.step
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            arm.trainer.run_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if timed:
                arm.cpu_times.append(time.process_time() - c0)
                arm.batch_ids.append(arm.step % len(arm.trainer.data_loader.batches))
                if hasattr(arm.trainer, "grad_scaler"):  # a drop means a skipped (inf/nan) step
                    arm.grad_scales.append(arm.trainer.grad_scaler.get_scale())
            arm.step += 1


def run_block(arm, n, timed, cuda):
    try:
        if not (cuda and timed):
            return run_iterations(arm, n, timed, cuda)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        own = resident_bytes(arm)
        run_iterations(arm, n, timed, cuda)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base + own
        if peak > arm.peak_bytes:
            arm.peak_bytes = peak
            arm.peak_detail = {"max_allocated": torch.cuda.max_memory_allocated(),
                               "allocated_at_block_start": base, "arm_resident_at_block_start": own}
    except torch.cuda.OutOfMemoryError:
        raise BenchmarkError(f"CUDA out of memory in arm {arm.key}; run fewer arms at once "
                             "(--heads / --precisions / --arms)") from None
    except FloatingPointError as e:
        raise BenchmarkError(f"arm {arm.key}: {e}".replace("\n", " ")) from None


def measure(plan, arms):
    cuda = plan.device.startswith("cuda")
    if cuda and ":" in plan.device:
        torch.cuda.set_device(torch.device(plan.device))
    if plan.warmup:
        log(f"warmup: {plan.warmup} iteration(s) per arm, {len(arms)} arms")
        for a in arms:
            run_block(a, plan.warmup, False, cuda)
    rounds = math.ceil(plan.iters / plan.block)
    schedule = []
    for r in range(rounds):
        n = min(plan.block, plan.iters - r * plan.block)
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        log(f"round {r + 1}/{rounds}: {n} timed iteration(s) per arm")
        for a in order:
            run_block(a, n, True, cuda)
        schedule.append({"iterations": n, "order": [a.key for a in order]})
    for a in arms:
        a.trainer.after_train()
    return schedule


# ----------------------------------------------------------------------------------------------
# Report


def summarize(arms, cuda):
    """Rows of the table, as dicts; ratios against the stock arm (Head.stock_arm) of the same head
    and precision."""
    by_key = {(a.head, a.prec, a.arm): a for a in arms}
    rows = []
    for a in arms:
        ref_prec = PRECISIONS[a.prec].reference or a.prec
        stock = HEADS[a.head].stock_arm
        ref = by_key.get((a.head, ref_prec, stock))
        median = statistics.median(a.times)
        row = {
            "arm": a.arm, "head": head_name(a.cfg, a.head), "head_key": a.head, "precision": a.prec,
            "precision_label": PRECISIONS[a.prec].label, "images_per_batch": a.cfg.SOLVER.IMS_PER_BATCH,
            "median_s": median, "min_s": min(a.times), "max_s": max(a.times),
            "time_ratio": statistics.median(a.times) / statistics.median(ref.times) if ref else None,
            "peak_mem_mib": a.peak_bytes / 2**20 if cuda else None,
            "mem_ratio": (a.peak_bytes / ref.peak_bytes) if (cuda and ref and ref.peak_bytes) else None,
            "reference": f"{stock}/{a.head}/{ref_prec}" if ref else None,
        }
        rows.append(row)
    return rows


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def format_table(rows):
    lines = [
        "| arm | head | precision | images/batch | median s/iter (min-max) | time vs stock "
        "| peak memory (MiB) | memory vs stock |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {r['arm']} | {r['head']} | {r['precision_label']} | {r['images_per_batch']} "
            f"| {r['median_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | {fmt_ratio(r['time_ratio'])} "
            f"| {mem} | {fmt_ratio(r['mem_ratio'])} |"
        )
    return "\n".join(lines)


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(plan):
    env = {
        "device": plan.device, "device_name": device_name(plan.device),
        "torch": torch.__version__, "detectron2": detectron2.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch_num_threads": torch.get_num_threads(),
    }
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if plan.device.startswith("cuda"):
        env.update({
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    return env


def notes(plan, env, n_batches):
    mem = ("peak memory: max_memory_allocated during the arm's blocks, other arms' resident tensors "
           "subtracted (docs/BENCHMARK.md)" if plan.device.startswith("cuda")
           else "peak memory: n/a on CPU")
    return (
        f"device: {env['device_name']}; torch {env['torch']}, detectron2 {env['detectron2']}.\n"
        f"{plan.iters} timed training iterations per arm after {plan.warmup} warmup, in blocks of "
        f"{plan.block} interleaved across arms; {n_batches} distinct batches, the same for every arm. "
        f"'vs stock': ratio to the stock sampler's arm of the same head and training precision "
        f"(medians for time). {mem}."
    )


def write_outputs(plan, argv, arms, rows, schedule, env, sizes, table, note):
    plan.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/benchmark.py " + shlex.join(argv)
    (plan.out / "benchmark.md").write_text(
        f"# OHEM training-step benchmark\n\n`{command}`\n\n{table}\n\n{note}\n"
    )
    raw = {
        "command": command, "argv": list(argv), "cwd": os.getcwd(), "suite": plan.suite,
        "environment": env, "seed": plan.seed, "warmup": plan.warmup, "iters": plan.iters,
        "block": plan.block, "schedule": schedule,
        "images": str(plan.images), "annotations": str(plan.annotations), "batch_image_sizes": sizes,
        "overrides": _pairs(plan.overrides),
        "rows": rows,
        "arms": [],
    }
    for a in arms:
        hist = a.storage.histories()
        ohem = {k: statistics.mean(v for v, it in hist[k].values() if it >= plan.warmup)
                for k in hist if k.startswith("ohem/")}
        raw["arms"].append({
            "key": a.key, "arm": a.arm, "head": head_name(a.cfg, a.head), "head_key": a.head,
            "precision": a.prec, "config_file": str(a.config_path.relative_to(model_zoo.CONFIGS)),
            "config_overrides": a.overrides, "roi_heads": a.cfg.MODEL.ROI_HEADS.NAME,
            "images_per_batch": a.cfg.SOLVER.IMS_PER_BATCH,
            "times_s": a.times, "warmup_times_s": a.warmup_times, "batch_ids": a.batch_ids,
            "process_cpu_times_s": a.cpu_times,
            "grad_scaler_scales": a.grad_scales or None,
            "peak_mem_bytes": a.peak_bytes if plan.device.startswith("cuda") else None,
            "peak_mem_detail": a.peak_detail or None,
            "ohem_stats_mean": ohem or None,
        })
    (plan.out / "benchmark.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


def run_benchmark(args, argv):
    """Measure the plan of ``args`` (tools/benchmark.py's options; ``argv`` is recorded as the
    command), print the table and, with ``--out``, write benchmark.md and benchmark.json.
    Returns the exit status: 2 with one line on bad input."""
    if args.suite == "ops":
        from .op_count import run_ops_suite  # op_count builds on this module

        return run_ops_suite(args, argv)
    if args.suite == "readonly":
        from .readonly_agreement import run_readonly_suite  # builds on this module too

        return run_readonly_suite(args, argv)
    try:
        plan = make_plan(args)
        if plan.threads:
            torch.set_num_threads(plan.threads)
        t0 = time.time()
        arms, batches, sizes = build_arms(plan)
        log(f"{len(arms)} arms built in {time.time() - t0:.1f} s: " + ", ".join(a.key for a in arms))
        schedule = measure(plan, arms)
    except BenchmarkError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    env = environment(plan)
    rows = summarize(arms, plan.device.startswith("cuda"))
    table = format_table(rows)
    note = notes(plan, env, len(batches))
    print(table)
    print()
    print(note)
    if plan.out:
        write_outputs(plan, argv, arms, rows, schedule, env, sizes, table, note)
        log(f"wrote {plan.out / 'benchmark.md'} and {plan.out / 'benchmark.json'}")
    return 0
