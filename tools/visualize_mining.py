#!/usr/bin/env python
"""Draw the RoIs that OHEM mines, for a config, a checkpoint and a dataset.

For each image it runs what a training step runs up to the selection (backbone, RPN, labelling
of every proposal, the read-only pass, the selection) and writes OUTPUT/<image id>.png: GT boxes
in white, mined foreground RoIs in green, mined background RoIs in red (orange where their IoU
with every GT is below Fast R-CNN's bg_lo 0.1: RoIs the heuristic sampler would never show),
thicker for harder. OUTPUT/mining.json holds every mined box with its label, IoU and hardness.
For a cascade it draws what stage 0 mines from the proposals.

    python tools/visualize_mining.py --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ohem.yaml \
        --weights output/model_final.pth --num-images 8 --output output/mining_vis
"""
import json
import os
import sys

import cv2
import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ohem_d2 import OHEMMixin
from ohem_d2.diagnostics import BG_LO, max_iou_with_gt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_net import USER_ERRORS, argument_parser, build_config  # noqa: E402

COLOURS = {"gt": (255, 255, 255), "fg": (0, 200, 0), "bg": (0, 0, 230), "bg_below_bg_lo": (0, 140, 255)}  # BGR


def parse_args(argv=None):
    parser = argument_parser()
    parser.description = __doc__
    parser.add_argument("--weights", default=None, help="checkpoint to load (default: MODEL.WEIGHTS)")
    parser.add_argument("--dataset", default=None, help="registered dataset (default: DATASETS.TRAIN[0])")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--output", default="output/mining_vis")
    return parser.parse_args(argv)


@torch.no_grad()
def mine_image(model, data):
    """The mined proposals of one image, with ``hardness`` and ``iou`` fields."""
    heads = model.roi_heads
    images = model.preprocess_image([data])
    targets = [data["instances"].to(model.device)]
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, targets)
    proposals = heads.label_and_sample_proposals(proposals, targets)
    in_features = getattr(heads, "box_in_features", None) or heads.in_features
    _, hardness = heads._readonly_pass([features[f] for f in in_features], proposals, stage=0)
    selected, (mined,) = heads._select(hardness, proposals)
    mined.hardness = hardness[selected]
    mined.iou = max_iou_with_gt([mined])
    return mined


def draw(data, mined, num_classes, input_format):
    """The network's input image (in ``input_format``, e.g. BGR) with GT and mined RoIs on it."""
    image = data["image"].permute(1, 2, 0).numpy()
    image = np.ascontiguousarray(image[:, :, ::-1] if input_format == "RGB" else image)
    for box in data["instances"].gt_boxes.tensor.tolist():
        cv2.rectangle(image, tuple(map(int, box[:2])), tuple(map(int, box[2:])), COLOURS["gt"], 1)
    hardness = mined.hardness
    rank = hardness.argsort().argsort().float() / max(len(mined) - 1, 1)  # 0 easiest .. 1 hardest
    order = hardness.argsort().tolist()  # draw the hardest last, on top
    for i in order:
        box = mined.proposal_boxes.tensor[i].tolist()
        if mined.gt_classes[i] < num_classes:
            colour = COLOURS["fg"]
        else:
            colour = COLOURS["bg_below_bg_lo" if mined.iou[i] < BG_LO else "bg"]
        thickness = 1 + int(round(3 * rank[i].item()))
        cv2.rectangle(image, tuple(map(int, box[:2])), tuple(map(int, box[2:])), colour, thickness)
    return image


def main(argv=None):
    args = parse_args(argv)
    args.opts += ["DATASETS.TEST", "()"]  # nothing is evaluated: do not require the test sets
    try:
        cfg = build_config(args).clone()
        cfg.defrost()
        cfg.INPUT.RANDOM_FLIP = "none"
        if args.weights is not None:
            cfg.MODEL.WEIGHTS = args.weights
        dataset = args.dataset or cfg.DATASETS.TRAIN[0]
        if dataset not in DatasetCatalog.list():
            raise KeyError(f"dataset {dataset!r} is not registered (see --register-coco / --register-voc)")
        model = build_model(cfg)
        if not isinstance(model.roi_heads, OHEMMixin):
            raise ValueError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r} does not mine; use an OHEM config")
        if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise FileNotFoundError(f"checkpoint {cfg.MODEL.WEIGHTS!r} not found")
    except USER_ERRORS as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()  # the heads label and mine only in training mode; nothing is updated
    mapper = DatasetMapper(cfg, is_train=True)
    os.makedirs(args.output, exist_ok=True)
    summary = []
    with EventStorage():
        for record in DatasetCatalog.get(dataset)[: args.num_images]:
            data = mapper(record)
            mined = mine_image(model, data).to("cpu")
            name = f"{record.get('image_id', len(summary))}.png"
            cv2.imwrite(os.path.join(args.output, name), draw(data, mined, model.roi_heads.num_classes, cfg.INPUT.FORMAT))
            is_fg = mined.gt_classes < model.roi_heads.num_classes
            summary.append({
                "image": record["file_name"], "png": name, "size_drawn": list(data["image"].shape[1:]),
                "mined": [{"box": b, "foreground": bool(f), "iou": round(u, 4), "hardness": round(h, 5)}
                          for b, f, u, h in zip(mined.proposal_boxes.tensor.tolist(), is_fg.tolist(),
                                                mined.iou.tolist(), mined.hardness.tolist())],
            })
            print(f"{name}: {len(mined)} mined RoIs, {int(is_fg.sum())} foreground, "
                  f"{int(((mined.iou < BG_LO) & ~is_fg).sum())} background below IoU {BG_LO}")
    with open(os.path.join(args.output, "mining.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {len(summary)} images to {args.output}")


if __name__ == "__main__":
    main()
