"""How many operators and host syncs one training step of each arm dispatches: the ``ops`` suite of
tools/benchmark.py.

A launch-bound GPU step (R50-FPN at 2 images is 55-90 ms on an H100) costs about what it
dispatches: the whole-step ratio of non-view aten ops to stock predicted the H100 time ratios of
OHEM within 0.015 (issue 18). Counting needs no GPU: on the CPU, a ``TorchDispatchMode`` sees
every aten op of the forward, the backward and the optimizer step, and this module counts

* the non-view ops (views launch no kernel);
* the ops that make the host wait for the device on a GPU: a value read by the host
  (``_local_scalar_dense``: ``.item()``, ``bool(t)``), an output size that depends on the data
  (nonzero, masked_select, a boolean-mask index / index_put, unique, bincount, repeat_interleave
  without ``output_size``), torchvision's NMS (its keep mask goes to the host), and the
  Python-level ``Tensor.tolist/.cpu/.numpy``, which dispatch nothing on a CPU tensor and are
  counted by patching those methods while counting;

each sync with the first frame of its stack in ohem_d2, detectron2 or torchvision (file:line).

The model is the real configs' structure at the real RoI counts, slimmed so that it runs on a CPU
in seconds: R-50 with narrow layers, 2 synthetic images of 320x480 with 4 GT boxes each (and their masks for the mask head),
POST_NMS_TOPK_TRAIN from the config (1000 per image for FPN, 2000 for C4), 512 RoIs per image.
The counted step is the second one (iteration 1): the first initialises lazily, and the mining
diagnostics run only on iterations the event writers log (:mod:`ohem_d2.modeling.diagnostics`).
"""
import collections
import json
import os
import sys
import traceback
import warnings
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from .benchmark import HEADS, BenchmarkError, Cycle, build_cfg, calibrate_frozen_bn, head_name

OPS_HEADS = ("fpn", "c4", "mask", "retinanet")

# R-50's structure, narrow: what is counted is how many ops run, not how long each takes.
SLIM_R50 = [
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", 50,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
    "SOLVER.IMS_PER_BATCH", 2,
]

# Ops whose output size the host must know, or whose result the host reads.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
             "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::bincount",
             "torchvision::nms"}
_SOURCE_DIRS = (os.sep + "ohem_d2" + os.sep, os.sep + "detectron2" + os.sep, os.sep + "torchvision" + os.sep)
_PATCHED_METHODS = ("tolist", "cpu", "numpy")


def _is_sync(name, args, kwargs):
    if name in _SYNC_OPS:
        return True
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None)
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype == torch.bool for t in indices)
    return False


def _where():
    """file:line of the innermost frame of the stack in ohem_d2, detectron2 or torchvision."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        for d in _SOURCE_DIRS:
            if d in frame.filename and os.sep + "_python_dispatch" not in frame.filename:
                return frame.filename[frame.filename.rindex(d) + 1:] + f":{frame.lineno}"
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops and the host-syncing ops dispatched while it is active (and
    the Python-level ``Tensor.tolist/.cpu/.numpy`` calls), with where each sync comes from."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.by_op = collections.Counter()
        self.syncs = collections.Counter()  # (op, file:line) -> count
        self._originals = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not func.is_view:
            self.ops += 1
            self.by_op[name] += 1
        if _is_sync(name, args, kwargs):
            self.syncs[(name, _where())] += 1
        return func(*args, **kwargs)

    def _patched(self, method):
        original = self._originals[method]

        def counted(tensor, *args, **kwargs):
            self.syncs[(f"Tensor.{method}", _where())] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def __enter__(self):
        for method in _PATCHED_METHODS:
            self._originals[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._patched(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._originals.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)

    @property
    def num_syncs(self):
        return sum(self.syncs.values())


def synthetic_batch(num_images=2, height=320, width=480, num_gt=4, seed=0, masks=False):
    """Detectron2 training inputs (uint8 image, GT Instances) of a fixed size, deterministic; with
    ``masks``, each GT box is also a full-image bitmask filled inside the box (the mask head's targets)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        xy = torch.rand(num_gt, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 16 + torch.rand(num_gt, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 80, (num_gt,), generator=g)
        if masks:
            ys, xs = torch.arange(height)[None, :, None], torch.arange(width)[None, None, :]
            x0, y0, x1, y1 = (inst.gt_boxes.tensor[:, k, None, None] for k in range(4))
            inst.gt_masks = BitMasks((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": height, "width": width})
    return batch


def count_step(head, arm, overrides=(), batch=None, seed=0, device="cpu"):
    """Counts of the second training step (forward, backward, optimizer) of ``arm`` on ``head``
    (a key of benchmark.HEADS), slim R-50 with ``overrides`` after :data:`SLIM_R50`.

    On CUDA it also counts the syncs the device reports (``torch.cuda.set_sync_debug_mode("warn")``
    during the step): ``cuda_syncs``, beside the dispatch-level count of ``syncs``.
    """
    plan = SimpleNamespace(device=device, overrides=SLIM_R50 + list(overrides))
    cfg, _, _ = build_cfg(plan, head, "fp32", arm)
    batch = batch if batch is not None else synthetic_batch(seed=seed)
    torch.manual_seed(seed)
    model = build_model(cfg)
    calibrate_frozen_bn(model, batch)
    trainer = SimpleTrainer(model, Cycle([batch]), build_optimizer(cfg, model))
    trainer.storage = EventStorage(0)
    counter = OpCounter()
    cuda_syncs = None
    with trainer.storage:
        trainer.iter = trainer.storage.iter = 0
        trainer.run_step()
        trainer.iter = trainer.storage.iter = 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with counter:
                    trainer.run_step()
            finally:
                if device.startswith("cuda"):
                    torch.cuda.set_sync_debug_mode("default")
        if device.startswith("cuda"):
            cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"head": head_name(cfg, head), "head_key": head, "arm": arm, "roi_heads": cfg.MODEL.ROI_HEADS.NAME,
            "device": device, "ops": counter.ops, "syncs": counter.num_syncs, "cuda_syncs": cuda_syncs,
            "sync_sites": [{"op": op, "where": where, "count": n}
                           for (op, where), n in sorted(counter.syncs.items(), key=lambda kv: kv[0][1])],
            "by_op": dict(counter.by_op.most_common())}


def count_arms(heads=OPS_HEADS, arms=None, overrides=(), image_size=(320, 480), device="cpu"):
    """Rows of the op table: each head's arms (those of ``arms`` it takes, its default arms if
    None) with ratios to its stock arm, which is counted first."""
    rows = []
    for head in heads:
        batch = synthetic_batch(height=image_size[0], width=image_size[1], masks=head == "mask")
        spec = HEADS[head]
        head_arms = [a for a in (arms or spec.default_arms) if spec.takes(a) and a != spec.stock_arm]
        stock = None
        for arm in [spec.stock_arm] + head_arms:
            row = count_step(head, arm, overrides, batch=batch, device=device)
            if arm == spec.stock_arm:
                stock = row
            row["op_ratio"] = row["ops"] / stock["ops"] if stock else None
            row["sync_delta"] = row["syncs"] - stock["syncs"] if stock else None
            rows.append(row)
            print(f"[benchmark] {row['arm']}/{row['head']}: {row['ops']} ops, {row['syncs']} syncs",
                  file=sys.stderr, flush=True)
    return rows


def format_ops_table(rows):
    cuda = rows[0]["cuda_syncs"] is not None
    lines = ["| arm | head | non-view aten ops | vs stock | host syncs | vs stock |" + (" CUDA-reported syncs |" if cuda else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for r in rows:
        ratio = "n/a" if r["op_ratio"] is None else f"{r['op_ratio']:.3f}x"
        delta = "n/a" if r["sync_delta"] is None else f"{r['sync_delta']:+d}"
        lines.append(f"| {r['arm']} | {r['head']} | {r['ops']} | {ratio} | {r['syncs']} | {delta} |"
                     + (f" {r['cuda_syncs']} |" if cuda else ""))
    return "\n".join(lines)


def format_sync_sites(rows):
    lines = []
    for r in rows:
        lines.append(f"{r['arm']}/{r['head']}: " + ", ".join(
            f"{s['op']}@{s['where']}" + (f" x{s['count']}" if s["count"] > 1 else "") for s in r["sync_sites"]))
    return "\n".join(lines)


def run_ops_suite(args, argv):
    """tools/benchmark.py --suite ops: count, print the table and the sync sites, write ops.json to --out."""
    from ..arms import ARMS
    try:
        heads = [h.strip() for h in (args.heads or ",".join(OPS_HEADS)).split(",") if h.strip()]
        arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        for name, valid, what in [(h, HEADS, "head") for h in heads] + [(a, ARMS, "arm") for a in arms or ()]:
            if name not in valid:
                raise BenchmarkError(f"unknown {what} {name!r}: expected one of {', '.join(valid)}")
        if arms and not any(HEADS[h].takes(a) for h in heads for a in arms):
            raise BenchmarkError(f"no arm of --arms {args.arms} applies to --heads {','.join(heads)}: RetinaNet "
                                 "arms apply to retinanet, the others to the R-CNN heads")
        if len(args.opts) % 2:
            raise BenchmarkError("config overrides must be KEY VALUE pairs")
        device = args.device or "cpu"
        if device != "cpu" and not torch.cuda.is_available():
            raise BenchmarkError(f"--device {device} needs CUDA; torch.cuda.is_available() is False")
        image_size = tuple(int(v) for v in args.image_size.lower().split("x") if v.isdigit())
        if len(image_size) != 2 or min(image_size) < 32 or args.image_size.count("x") != 1:
            raise BenchmarkError(f"--image-size {args.image_size!r}: expected HxW of at least 32x32, e.g. 320x480")
        torch.set_num_threads(args.threads or 1)
        rows = count_arms(heads, arms, list(args.opts), image_size, device)
    except BenchmarkError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    table = format_ops_table(rows)
    print(table)
    print()
    print(format_sync_sites(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "ops.json")
        with open(path, "w") as f:
            json.dump({"command": "python tools/benchmark.py " + " ".join(argv), "torch": torch.__version__,
                       "device": device, "image_size": image_size, "overrides": SLIM_R50 + list(args.opts),
                       "rows": rows}, f, indent=1)
            f.write("\n")
        print(f"[benchmark] wrote {path}", file=sys.stderr)
    return 0
