"""Side-by-side pictures of what Detectron2's sampler and OHEM would train on, for a config, a
checkpoint and a dataset (tools/visualize_mining.py is the command line; the runner draws them
after a comparison).

For each image it runs what a training step runs up to the choice of RoIs (backbone, RPN, labelling
of every proposal) and writes OUTPUT/<image id>.png: the same image and proposals twice, on the left
the RoIs Detectron2's stock sampler draws (``ROIHeads.label_and_sample_proposals``: the config's
matcher, BATCH_SIZE_PER_IMAGE and POSITIVE_FRACTION), on the right the RoIs OHEM mines
(:meth:`OHEMMixin.mine`), thicker for harder. GT boxes in white, foreground RoIs in green,
background RoIs in red (orange where their IoU with every GT is below Fast R-CNN's bg_lo 0.1: RoIs
the heuristic sampler would never show); a legend under the panels says so. Each panel draws at
most ``MAX_ROIS`` RoIs (0: all): the hardest mined ones, and as many of the sampled ones, in the
sampler's shares of foreground and background; its title gives the totals. At Detectron2's 512
RoIs per image the boxes would cover the whole picture. Small images are scaled up (nearest) to a
short side of 512 px, or 64 boxes on a 128 px image could not be told apart. OUTPUT/mining.json
holds every sampled and mined box (in the network input's pixels) with its label, its IoU and
whether it is drawn, the mined ones with their hardness, and where each panel lies in the PNG. A
config with a stock head is mined with its OHEM counterpart (the checkpoint loads into either).
For a cascade it draws what stage 0 samples and mines from the proposals.
"""
import json
import math
import os

import cv2
import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.utils.events import EventStorage

from ..arms import OHEM_TO_STOCK_HEAD, STOCK_TO_OHEM_HEAD
from ..engine.defaults import build_config, config_argument_parser
from ..modeling import OHEMMixin
from ..modeling.diagnostics import BG_LO, max_iou_with_gt

COLOURS = {"gt": (255, 255, 255), "fg": (0, 200, 0), "bg": (0, 0, 230), "bg_below_bg_lo": (0, 140, 255)}  # BGR
LEGEND = [
    ("gt", "GT box"),
    ("fg", "foreground RoI, sampled / mined"),
    ("bg", "background RoI, sampled / mined"),
    ("bg_below_bg_lo", f"background, IoU < {BG_LO}: Fast R-CNN's bg_lo drops it"),
]
HARDNESS_NOTE = "OHEM: thicker = harder"
BACKDROP = (40, 40, 40)  # BGR, behind titles and legend: white text and the white GT swatch show on it
MIN_SHORT_SIDE = 512  # px of a drawn panel's short side, at least
MAX_ROIS = 32  # RoIs drawn per panel by default: enough to see what each side picks, few enough to see the image
FONT = cv2.FONT_HERSHEY_SIMPLEX
SEED = 0  # of the stock sampler's random draw: the same command draws the same picture


class StockSampler:
    """Detectron2's RoI sampler, ``ROIHeads.label_and_sample_proposals`` itself, with the settings of
    ``heads`` (matcher, BATCH_SIZE_PER_IMAGE, POSITIVE_FRACTION, GT appended): what the stock head
    of the same config trains on. Called on the OHEM head, the stock method would sample nothing:
    it calls ``self._sample_proposals``, which the OHEM head overrides to keep every proposal."""

    label_and_sample_proposals = ROIHeads.label_and_sample_proposals
    _sample_proposals = ROIHeads._sample_proposals

    def __init__(self, heads):
        for name in ("num_classes", "batch_size_per_image", "positive_fraction", "proposal_matcher",
                     "proposal_append_gt"):
            setattr(self, name, getattr(heads, name))


@torch.no_grad()
def sample_and_mine(model, data):
    """What the stock sampler and OHEM choose from the same proposals of one image: (sampled, mined),
    both with an ``iou`` field, the mined ones also with ``hardness``."""
    heads = model.roi_heads
    images = model.preprocess_image([data])
    targets = [data["instances"].to(model.device)]
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, targets)
    (sampled,) = StockSampler(heads).label_and_sample_proposals(proposals, targets)
    sampled.iou = max_iou_with_gt([sampled])
    candidates = heads.label_and_sample_proposals(proposals, targets)
    in_features = getattr(heads, "box_in_features", None) or heads.in_features
    found = heads.mine([features[f] for f in in_features], candidates, stage=0)
    (mined,) = found.mined
    mined.hardness = found.hardness[found.selected]
    mined.iou = max_iou_with_gt([mined])
    return sampled, mined


def kinds(rois, num_classes):
    """The COLOURS key of each RoI: foreground, background, or background below bg_lo."""
    return ["fg" if c < num_classes else "bg_below_bg_lo" if u < BG_LO else "bg"
            for c, u in zip(rois.gt_classes.tolist(), rois.iou.tolist())]


def shown(box_kinds, max_rois, hardness=None):
    """The indices of the RoIs a panel draws, at most ``max_rois`` of them (0: all): the hardest
    (by ``hardness``), or, of the stock sampler's draw (its foreground then its background RoIs,
    each in random order), as many of the first foreground and background ones as keeps their
    shares."""
    total = len(box_kinds)
    if not max_rois or total <= max_rois:
        return list(range(total))
    if hardness is not None:
        return sorted(hardness.argsort(descending=True)[:max_rois].tolist())
    fg = [i for i, kind in enumerate(box_kinds) if kind == "fg"]
    bg = [i for i, kind in enumerate(box_kinds) if kind != "fg"]
    fg_drawn = round(max_rois * len(fg) / total)
    return sorted(fg[:fg_drawn] + bg[: max_rois - fg_drawn])


def upscaled(data, input_format):
    """The network's input image (BGR) scaled up by a whole factor, nearest, to a short side of at
    least MIN_SHORT_SIDE, and the factor: every input pixel stays a sharp square."""
    image = data["image"].permute(1, 2, 0).numpy()
    image = np.ascontiguousarray(image[:, :, ::-1] if input_format == "RGB" else image)
    scale = max(1, math.ceil(MIN_SHORT_SIDE / min(image.shape[:2])))
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST), scale


def line_unit(image):
    """The thinnest line, in px, for an image of this size: 2 px at 512 px."""
    return max(1, round(min(image.shape[:2]) / 256))


def draw_boxes(image, scale, gt_boxes, rois, box_kinds, hardness=None):
    """GT and RoI boxes (input pixels, times ``scale``) on a faded copy of ``image``; with
    ``hardness``, harder RoIs are thicker and drawn last, on top."""
    out = (image.astype(np.float32) * 0.6 + 50).astype(np.uint8)  # faded: the boxes stand out
    unit = line_unit(out)

    def rectangle(box, colour, thickness):
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thickness)

    boxes = rois.proposal_boxes.tensor.tolist()
    order = range(len(boxes)) if hardness is None else hardness.argsort().tolist()
    rank = None if hardness is None else hardness.argsort().argsort().float() / max(len(boxes) - 1, 1)
    for i in order:
        thickness = unit if rank is None else int(round(unit * (1 + rank[i].item())))
        rectangle(boxes[i], COLOURS[box_kinds[i]], thickness)
    for box in gt_boxes.tensor.tolist():  # last, outlined in black: the reference, seen through the RoIs
        rectangle(box, (0, 0, 0), 4 * unit)
        rectangle(box, COLOURS["gt"], 2 * unit)
    return out


def text_strip(text, width, height, text_height):
    """A BACKDROP strip with ``text`` centred in white, ``text_height`` px tall, or smaller if it
    would not fit ``width``."""
    strip = np.full((height, width, 3), BACKDROP, np.uint8)
    font_scale, thickness = font(text_height)
    w = cv2.getTextSize(text, FONT, font_scale, thickness)[0][0]
    font_scale *= min(1.0, (width - 2 * text_height) / w)
    (w, h), _ = cv2.getTextSize(text, FONT, font_scale, thickness)
    cv2.putText(strip, text, ((width - w) // 2, (height + h) // 2), FONT, font_scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
    return strip


def font(text_height):
    """(font scale, stroke) of capitals ``text_height`` px tall."""
    return text_height / cv2.getTextSize("X", FONT, 1.0, 1)[0][1], max(1, round(text_height / 12))


def legend(width, unit, text_height):
    """A BACKDROP strip: a swatch and its meaning for each colour, then a thin and a thick grey box
    for HARDNESS_NOTE; the entries flow into as many rows as ``width`` needs."""
    font_scale, thickness = font(text_height)
    swatch = 2 * text_height
    pad = text_height
    entries = [(COLOURS[k], meaning) for k, meaning in LEGEND] + [(None, HARDNESS_NOTE)]
    sizes = [cv2.getTextSize(meaning, FONT, font_scale, thickness)[0][0] + swatch + pad // 2
             for _, meaning in entries]
    rows, x = [[]], pad
    for entry, size in zip(entries, sizes):
        if x + size > width - pad and rows[-1]:
            rows, x = rows + [[]], pad
        rows[-1].append((entry, x))
        x += size + 2 * pad
    row_height = 2 * text_height
    strip = np.full((len(rows) * row_height + pad, width, 3), BACKDROP, np.uint8)
    for r, row in enumerate(rows):
        middle = pad // 2 + r * row_height + row_height // 2
        top, bottom = middle - text_height // 2, middle + text_height // 2
        for (colour, meaning), x in row:
            if colour is not None:
                cv2.rectangle(strip, (x, top), (x + swatch, bottom), colour, 2 * unit)
            else:
                half = swatch // 2 - unit
                cv2.rectangle(strip, (x, top), (x + half, bottom), (200, 200, 200), unit)
                cv2.rectangle(strip, (x + swatch - half, top), (x + swatch, bottom), (200, 200, 200), 2 * unit)
            cv2.putText(strip, meaning, (x + swatch + pad // 2, middle + text_height // 2), FONT, font_scale,
                        (255, 255, 255), thickness, cv2.LINE_AA)
    return strip


def title(name, noun, rois, num_classes, drawn=None):
    """A panel's title, e.g. "Detectron2 sampler: 512 RoIs, 25% fg (32 drawn)"; ``drawn`` (a
    phrase) where the panel draws fewer than all."""
    fg = (rois.gt_classes < num_classes).float().mean().item() if len(rois) else 0.0
    return f"{name}: {len(rois)} {noun}, {fg:.0%} fg" + (f" ({drawn} drawn)" if drawn else "")


def side_by_side(data, sampled, mined, num_classes, input_format, max_rois=MAX_ROIS):
    """The picture: titled stock and OHEM panels over a legend, and the layout,
    {"scale", "panels": {"stock": [x0, y0, x1, y1], "ohem": [...]}, "legend": [...]} in PNG pixels,
    so that a box of mining.json lies at a panel's (x0, y0) + scale * box, and "drawn":
    {"sampled": [...], "mined": [...]}, the indices of the RoIs drawn (``shown``, ``max_rois``)."""
    image, scale = upscaled(data, input_format)
    gt_boxes = data["instances"].gt_boxes
    drawn = {"sampled": shown(kinds(sampled, num_classes), max_rois),
             "mined": shown(kinds(mined, num_classes), max_rois, mined.hardness)}
    stock, ohem = sampled[drawn["sampled"]], mined[drawn["mined"]]
    panels = {
        "stock": (title("Detectron2 sampler", "RoIs", sampled, num_classes,
                        len(stock) if len(stock) < len(sampled) else None),
                  draw_boxes(image, scale, gt_boxes, stock, kinds(stock, num_classes))),
        "ohem": (title("OHEM", "mined", mined, num_classes,
                       f"hardest {len(ohem)}" if len(ohem) < len(mined) else None),
                 draw_boxes(image, scale, gt_boxes, ohem, kinds(ohem, num_classes), ohem.hardness)),
    }
    height, width = image.shape[:2]
    unit = line_unit(image)
    text_height = max(10, min(height, width) // 32)  # 16 px at 512 px
    gap = np.full((height + 3 * text_height, 4 * unit, 3), BACKDROP, np.uint8)
    columns = [np.vstack([text_strip(text, width, 3 * text_height, 3 * text_height // 2), panel])
               for text, panel in panels.values()]
    top = np.hstack([columns[0], gap, columns[1]])
    picture = np.vstack([top, legend(top.shape[1], unit, text_height)])
    y0 = 3 * text_height
    layout = {
        "scale": scale,
        "panels": {"stock": [0, y0, width, y0 + height],
                   "ohem": [width + gap.shape[1], y0, 2 * width + gap.shape[1], y0 + height]},
        "legend": [0, top.shape[0], top.shape[1], picture.shape[0]],
        "drawn": drawn,
    }
    return picture, layout


def boxes_summary(rois, num_classes, hardness=False):
    """The boxes of mining.json: box (input pixels), foreground, IoU, and with ``hardness`` the hardness."""
    rows = []
    for i, (box, kind) in enumerate(zip(rois.proposal_boxes.tensor.tolist(), kinds(rois, num_classes))):
        row = {"box": [round(v, 2) for v in box], "foreground": kind == "fg", "iou": round(rois.iou[i].item(), 4)}
        if hardness:
            row["hardness"] = round(rois.hardness[i].item(), 5)
        rows.append(row)
    return rows


def mining_model(cfg, weights=None, dataset=None, device=None):
    """(cfg, model, dataset) ready to draw: ``cfg`` with an OHEM head (the OHEM counterpart of a
    stock one: same parameters, so the checkpoint loads), no flip (the picture shows what the head
    saw), ``weights`` (default MODEL.WEIGHTS) loaded, on ``device`` (default MODEL.DEVICE), the
    model in training mode (the heads label and mine only then; nothing is updated).

    Raises one of ``ohem_d2.engine.USER_ERRORS`` with a message that says what to fix.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.RANDOM_FLIP = "none"
    head = cfg.MODEL.ROI_HEADS.NAME
    cfg.MODEL.ROI_HEADS.NAME = STOCK_TO_OHEM_HEAD.get(OHEM_TO_STOCK_HEAD.get(head, head), head)
    if weights is not None:
        cfg.MODEL.WEIGHTS = str(weights)
    if device is not None:
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    dataset = dataset or cfg.DATASETS.TRAIN[0]
    if dataset not in DatasetCatalog.list():
        raise KeyError(f"dataset {dataset!r} is not registered (see --register-coco / --register-voc)")
    if cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"checkpoint {cfg.MODEL.WEIGHTS!r} not found")
    model = build_model(cfg)
    if not isinstance(model.roi_heads, OHEMMixin):
        raise ValueError(f"MODEL.ROI_HEADS.NAME {head!r} has no OHEM counterpart; use one of "
                         f"{', '.join(STOCK_TO_OHEM_HEAD)} or their OHEM heads")
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return cfg, model.train(), dataset


def write_pictures(cfg, model, dataset, output_dir, num_images, max_rois=MAX_ROIS):
    """OUTPUT_DIR/<image id>.png for the first ``num_images`` images of ``dataset``, each panel
    with at most ``max_rois`` RoIs (0: all), and OUTPUT_DIR/mining.json; returns the PNG paths."""
    num_classes = model.roi_heads.num_classes
    mapper = DatasetMapper(cfg, is_train=True)
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(SEED)
    summary, paths = [], []
    with EventStorage():
        for record in DatasetCatalog.get(dataset)[:num_images]:
            data = mapper(record)
            sampled, mined = (rois.to("cpu") for rois in sample_and_mine(model, data))
            picture, layout = side_by_side(data, sampled, mined, num_classes, cfg.INPUT.FORMAT, max_rois)
            name = f"{record.get('image_id', len(summary))}.png"
            paths.append(os.path.join(output_dir, name))
            cv2.imwrite(paths[-1], picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])  # a quarter of the default's size
            summary.append({
                "image": record["file_name"], "png": name, "input_size": list(data["image"].shape[1:]), **layout,
                "sampled": boxes_summary(sampled, num_classes),
                "mined": boxes_summary(mined, num_classes, hardness=True),
            })
            below = sum(k == "bg_below_bg_lo" for k in kinds(mined, num_classes))
            print(f"{name}: {title('Detectron2 sampler', 'RoIs', sampled, num_classes)}; "
                  f"{title('OHEM', 'mined', mined, num_classes)}, {below} background below IoU {BG_LO}")
    with open(os.path.join(output_dir, "mining.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return paths


def write_mining_pictures(config, weights, output_dir, num_images=3, *, dataset=None, device="cpu",
                          max_rois=MAX_ROIS):
    """Side-by-side pictures of the first ``num_images`` images of ``dataset`` (default
    DATASETS.TRAIN[0]) for a finished run, e.g. ``config`` its config.yaml (a path: its datasets are
    registered from DATASETS.REGISTER_*; or a CfgNode whose datasets are registered) and ``weights``
    its model_final.pth, at most ``max_rois`` RoIs per panel (0: all). Runs on ``device``, the CPU by
    default: the pictures need no GPU. Returns the PNG paths."""
    if not isinstance(config, CfgNode):
        config = build_config(config_argument_parser().parse_args(["--config-file", str(config)]), check=False)
    return write_pictures(*mining_model(config, weights, dataset, device), output_dir, num_images, max_rois)


