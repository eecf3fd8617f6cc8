"""What the read-only pass must leave alone, for FPN, C4 and cascade heads: autocast's weight-cast
cache (AMP), batch-norm statistics, and memory (mask targets only for the mined RoIs); and a full
AMP step with a gradient scaler.

The torch installed here already fixes the autocast-cache bug (pytorch issues 112583, 142234,
158232: a weight cast under ``no_grad`` cached and reused by the trainable pass, which then has no
gradient), so the AMP tests check the mechanism as well as the gradients: the read-only pass runs
with the cache disabled, the trainable pass with it as AMP set it.
"""
import dataclasses

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import BitMasks
from detectron2.utils.events import EventStorage

from conftest import C4_OHEM, FPN_OHEM, device, instances, load_cfg, random_fpn_features, random_proposals
from test_cascade import CASCADE_OHEM, SMALL_HEADS, cascade_heads, targets_with_masks
from test_mining import fpn_heads

pytestmark = pytest.mark.model

MASK_OHEM = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_ohem.yaml"
C4_MASK_OHEM_OPTS = ["MODEL.MASK_ON", True]
BN_BOX_HEAD = ["MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.NORM", "BN"]


def c4_heads(opts=()):
    cfg = load_cfg(C4_OHEM, list(opts))
    return build_roi_heads(cfg, {"res4": ShapeSpec(channels=256, stride=16)}).to(device()).train()


def c4_features():
    g = torch.Generator().manual_seed(0)
    return {"res4": torch.randn(2, 256, 4, 4, generator=g).to(device())}


def two_image_targets():
    return [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7])] * 2


# name -> (heads, features, targets, modules whose forward is the read-only / trainable box pass)
def fpn_case(opts=()):
    heads = fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.READONLY_CHUNK_SIZE", 16, *opts])
    return heads, random_fpn_features(), two_image_targets(), [heads.box_head]


def c4_case(opts=()):
    heads = c4_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.READONLY_CHUNK_SIZE", 16, *opts])
    return heads, c4_features(), two_image_targets(), [heads.res5]


def cascade_case(opts=()):
    heads = cascade_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 8, "MODEL.OHEM.READONLY_CHUNK_SIZE", 16, *opts])
    return heads, random_fpn_features(), targets_with_masks(), list(heads.box_head)


CASES = {"fpn": fpn_case, "c4": c4_case, "cascade": cascade_case}


def low_precision():
    """The autocast dtype a model-level test uses: bf16 on the CPU (its AMP dtype), fp16 on CUDA."""
    return torch.bfloat16 if device() == "cpu" else torch.float16


@pytest.mark.parametrize("head", list(CASES))
def test_under_amp_the_read_only_pass_runs_without_the_autocast_cache(head):
    heads, features, targets, box_modules = CASES[head]()
    seen = []  # (grad enabled, autocast cache enabled) at each box-pass forward
    for module in box_modules:
        module.register_forward_hook(
            lambda m, i, o: seen.append((torch.is_grad_enabled(), torch.is_autocast_cache_enabled()))
        )
    with EventStorage(), torch.autocast(device(), dtype=low_precision()):
        _, losses = heads(None, features, random_proposals(), targets)
        assert torch.is_autocast_cache_enabled()  # AMP's own setting is back after the read-only pass
    readonly = [cache for grad, cache in seen if not grad]
    trainable = [cache for grad, cache in seen if grad]
    assert len(readonly) >= 2 * len(box_modules) and not any(readonly)  # several chunks, no cache
    assert len(trainable) == len(box_modules) and all(trainable)

    sum(losses.values()).backward()
    for module in box_modules:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("head", list(CASES))
def test_the_opt_in_low_precision_read_only_pass_runs_without_the_autocast_cache(head):
    heads, features, targets, box_modules = CASES[head](["MODEL.OHEM.READONLY_DTYPE", "bfloat16"])
    seen = []
    for module in box_modules:
        module.register_forward_hook(
            lambda m, i, o: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled(device()),
                                         torch.is_autocast_cache_enabled()))
        )
    with EventStorage():
        heads(None, features, random_proposals(), targets)
    assert {(autocast, cache) for grad, autocast, cache in seen if not grad} == {(True, False)}
    assert {autocast for grad, autocast, _ in seen if grad} == {False}


def batch_norm_layers(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("head, opts", [
    ("fpn", BN_BOX_HEAD),
    ("cascade", BN_BOX_HEAD),
    ("c4", ["MODEL.RESNETS.NORM", "BN"]),
])
def test_one_step_updates_batch_norm_statistics_once(head, opts):
    heads, features, targets, box_modules = CASES[head](opts)
    norms = [m for module in box_modules for m in batch_norm_layers(module)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    with EventStorage():
        heads(None, features, random_proposals(), targets)
    # Only the trainable pass (on the mined RoIs) updates them; the read-only pass ran several chunks.
    assert [int(m.num_batches_tracked) for m in norms] == [1] * len(norms)
    assert all(m.training for m in norms)


def test_read_only_pass_scores_with_the_running_statistics_whatever_the_chunking():
    heads, features, targets, _ = fpn_case(BN_BOX_HEAD)
    with torch.no_grad():
        for m in batch_norm_layers(heads.box_head):  # statistics like a trained model's
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    box_features = [features[f] for f in heads.box_in_features]
    with EventStorage():
        labelled = heads.label_and_sample_proposals(random_proposals(), targets)
    with torch.no_grad():
        heads.box_head.eval()
        expected = heads._box_predictions(box_features, labelled, 0)
        heads.box_head.train()
    for chunk in (0, 7):
        heads.ohem = dataclasses.replace(heads.ohem, readonly_chunk_size=chunk)
        with EventStorage():  # mine() records its diagnostics
            predictions = heads.mine(box_features, labelled, stage=0).predictions
        for actual, wanted in zip(predictions, expected):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)


class GatherCounter:
    """Counts the rows each ``BitMasks.__getitem__`` gathers (the mask targets copied to RoIs)."""

    def __init__(self, monkeypatch):
        self.rows = []
        original = BitMasks.__getitem__

        def getitem(masks, item):
            out = original(masks, item)
            self.rows.append(len(out))
            return out

        monkeypatch.setattr(BitMasks, "__getitem__", getitem)


def test_mask_targets_are_gathered_for_the_mined_rois_only(monkeypatch):
    b = 6
    heads = fpn_heads(MASK_OHEM, ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32])
    targets = targets_with_masks()
    counter = GatherCounter(monkeypatch)
    with EventStorage():
        mined, losses = heads(None, random_fpn_features(), random_proposals(), targets)
    num_candidates = 40 + 2  # per image: proposals + the appended GT boxes
    assert counter.rows and max(counter.rows) <= b < num_candidates
    assert torch.isfinite(losses["loss_mask"])
    for m, t in zip(mined, targets):
        # Each mined RoI carries the mask of the GT it was matched to (box-shaped masks here).
        fg = m.gt_classes < 80
        mask_boxes = m.gt_masks.get_bounding_boxes().tensor.to(device())  # Detectron2 returns them on the CPU
        torch.testing.assert_close(mask_boxes[fg], m.gt_boxes.tensor[fg])
        assert torch.equal(m.gt_masks.tensor, t.gt_masks.tensor[m.gt_index])


def test_cascade_gathers_mask_targets_for_the_last_stages_mined_rois_only(monkeypatch):
    b = 6
    heads = cascade_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b])
    counter = GatherCounter(monkeypatch)
    with EventStorage():
        mined, losses = heads(None, random_fpn_features(), random_proposals(), targets_with_masks(no_gt_images=(1,)))
    # The mined RoIs of image 0, then the mask head's foreground among them.
    assert counter.rows[0] == len(mined[0]) == b and max(counter.rows) <= b
    assert mined[0].has("gt_masks") and not mined[1].has("gt_masks")  # image 1 has no GT, as stock
    assert torch.isfinite(losses["loss_mask"])


def test_c4_mask_targets_are_gathered_for_the_mined_rois_only(monkeypatch):
    b = 5
    heads = c4_heads(["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", b, *C4_MASK_OHEM_OPTS,
                      "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 8])
    counter = GatherCounter(monkeypatch)
    with EventStorage():
        _, losses = heads(None, c4_features(), random_proposals(), targets_with_masks())
    assert counter.rows and max(counter.rows) <= b
    assert torch.isfinite(losses["loss_mask"])


@pytest.mark.parametrize("config", [FPN_OHEM, C4_OHEM, CASCADE_OHEM])
def test_amp_step_with_a_gradient_scaler_trains_the_box_head(config):
    """A full model step as Detectron2's AMPTrainer runs it: autocast forward (fp16 on CUDA, as
    AMPTrainer; bf16 on the CPU, where fp16 is emulated and slow), scaled backward, scaler step.
    Every parameter of the box head and predictor gets a gradient and is updated."""
    opts = SMALL_HEADS if config == CASCADE_OHEM else []
    cfg = load_cfg(config, opts + ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", 16, "MODEL.RESNETS.NORM", "GN",
                                   "MODEL.FPN.NORM", "GN", "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "instances": t, "height": 96, "width": 128}
             for t in targets_with_masks(size=(96, 128))]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device(), init_scale=2.0**10)  # no overflow-skipped first step
    before = {n: p.detach().clone() for n, p in model.roi_heads.named_parameters()}
    with EventStorage(), torch.autocast(device(), dtype=low_precision()):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    scaler.scale(sum(losses.values())).backward()
    box_params = {n: p for n, p in model.roi_heads.named_parameters()
                  if n.startswith(("box_head", "box_predictor", "res5"))}
    assert box_params and all(p.grad is not None for p in box_params.values())
    scaler.step(optimizer)
    scaler.update()
    changed = [n for n in box_params if not torch.equal(before[n], box_params[n].detach())]
    assert scaler.get_scale() > 0 and len(changed) == len(box_params)
