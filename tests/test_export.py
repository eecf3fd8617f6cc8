"""Exporting an OHEM model as Detectron2 exports its stock model: TorchScript scripting (saved,
loaded, compared with eager), tracing, and the scriptability test of Detectron2's own
tests/modeling/test_roi_heads.py run on the OHEM heads. At inference the OHEM heads are their
parents, so wherever the stock model scripts or traces, the OHEM model must too, with the same
outputs; where the stock model cannot be scripted (Faster R-CNN C4, Cascade R-CNN), neither can
the OHEM one."""
import pytest
import torch
from torch import Tensor

from detectron2.export import scripting_with_instances
from detectron2.export.flatten import TracingAdapter
from detectron2.export.torchscript_patch import freeze_training_mode, patch_instances
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList
from detectron2.utils.testing import assert_instances_allclose, reload_script_model

from ohem_d2 import OHEMCascadeROIHeads, OHEMRes5ROIHeads, OHEMROIHeads

from conftest import load_cfg, random_proposals

FPN = "COCO-Detection/faster_rcnn_R_50_FPN_1x{}.yaml"
MASK = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x{}.yaml"
C4 = "COCO-Detection/faster_rcnn_R_50_C4_1x{}.yaml"
CASCADE = "COCO-Detection/cascade_mask_rcnn_R_50_FPN_1x{}.yaml"
SCRIPT_FIELDS = {"proposal_boxes": Boxes, "objectness_logits": Tensor, "pred_boxes": Boxes,
                 "scores": Tensor, "pred_classes": Tensor, "pred_masks": Tensor}
# Many detections to compare: none dropped by the score threshold, at most 20 (fewer masks to paste).
KEEP_ALL = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20]


def model(config, arm, opts=()):
    torch.manual_seed(0)
    return build_model(load_cfg(config.format("_ohem" if arm == "ohem" else ""), KEEP_ALL + list(opts))).eval()


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, 96, 128, generator=g) * 255},
            {"image": torch.rand(3, 64, 96, generator=g) * 255}]


@pytest.mark.parametrize("arm", ["stock", "ohem"])
@pytest.mark.parametrize("config, opts", [(FPN, []), (MASK, []), (C4, ["MODEL.MASK_ON", True])],
                         ids=["faster_fpn", "mask_fpn", "mask_c4"])
def test_scripted_saved_and_loaded_model_gives_the_eager_outputs(config, opts, arm):
    eager = model(config, arm, opts)
    assert isinstance(eager.roi_heads, (OHEMROIHeads, OHEMRes5ROIHeads)) == (arm == "ohem")
    scripted = reload_script_model(scripting_with_instances(eager, SCRIPT_FIELDS))  # save, then load
    inputs = images()
    with torch.no_grad():
        expected = eager.inference(inputs, do_postprocess=False)
        actual = scripted.inference(inputs, do_postprocess=False)
    assert len(expected[0]) > 0
    for e, a in zip(expected, actual):
        assert_instances_allclose(e, a)


@pytest.mark.parametrize("config, opts", [(C4, []), (CASCADE, [])], ids=["faster_c4", "cascade"])
def test_what_stock_cannot_script_the_ohem_model_cannot_either(config, opts):
    """Detectron2 itself cannot script these: Res5ROIHeads.mask_on is not a TorchScript constant
    (so Faster R-CNN C4 compiles a mask head it does not have), and CascadeROIHeads' box heads
    are indexed by a loop variable. Tracing is the export route for them."""
    for arm in ("stock", "ohem"):
        with pytest.raises(Exception):
            scripting_with_instances(model(config, arm, opts), SCRIPT_FIELDS)


def traced(eager, image, path):
    """``eager`` traced on ``image`` by Detectron2's TracingAdapter, saved to ``path`` and loaded;
    returns the loaded model's output Instances for ``image``."""
    def inference(m, image):
        return m.inference([{"image": image}], do_postprocess=False)[0]

    adapter = TracingAdapter(eager, (image,), inference)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(adapter, (image,), check_trace=False), str(path))
        return adapter.outputs_schema(torch.jit.load(str(path))(image))


@pytest.mark.parametrize("config", [MASK, C4, CASCADE], ids=["mask_fpn", "faster_c4", "cascade"])
def test_traced_ohem_model_gives_the_traced_stock_models_outputs(config, tmp_path):
    """Tracing (TracingAdapter, as Detectron2's test_export_torchscript.py) works for every head,
    the cascade included, and the saved and loaded trace of an OHEM model is the stock model's.
    (Against eager, the trace of a randomly initialised model differs: for this many boxes
    torchvision's batched_nms runs class by class in eager mode but with offset coordinates under
    tracing, and the two order the many tied scores of random weights differently; eager with
    torchvision._is_tracing patched to True gives the traced outputs.)"""
    stock, ohem = model(config, "stock"), model(config, "ohem")
    ohem.load_state_dict(stock.state_dict())
    assert isinstance(ohem.roi_heads, (OHEMROIHeads, OHEMRes5ROIHeads, OHEMCascadeROIHeads))
    image = images()[0]["image"]
    expected, actual = traced(stock, image, tmp_path / "stock.jit"), traced(ohem, image, tmp_path / "ohem.jit")
    assert len(expected) > 0
    assert_instances_allclose(expected, actual, rtol=0, size_as_tensor=True)


def test_detectron2s_standard_roi_heads_scriptability_test_on_the_ohem_heads():
    """Detectron2's test_StandardROIHeads_scriptability (tests/modeling/test_roi_heads.py): the
    heads alone, scripted in eval mode, give the eager outputs exactly."""
    cfg = load_cfg(FPN.format("_ohem"), ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    shapes = {f"p{level}": ShapeSpec(channels=256, stride=2**level) for level in range(2, 7)}
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, shapes).eval()
    assert isinstance(heads, OHEMROIHeads)
    g = torch.Generator().manual_seed(0)
    features = {f"p{level}": torch.rand(2, 256, 64 // 2**level, 64 // 2**level, generator=g) for level in range(2, 7)}
    image_list = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 64)])
    proposals = random_proposals()
    with torch.no_grad():
        expected, _ = heads(image_list, features, proposals)
    fields = {"proposal_boxes": Boxes, "objectness_logits": Tensor, "pred_boxes": Boxes,
              "scores": Tensor, "pred_classes": Tensor}
    with freeze_training_mode(heads), patch_instances(fields) as new_instances:
        scripted = torch.jit.script(heads)
        scripted_proposals = [new_instances.from_instances(p) for p in proposals]
        with torch.no_grad():
            actual, _ = scripted(image_list, features, scripted_proposals)
    assert len(expected[0]) > 0
    for e, a in zip(expected, actual):
        assert_instances_allclose(e, a, rtol=0)


def test_an_ohem_trained_checkpoint_needs_no_ohem_to_export(tmp_path):
    """The export route for an OHEM-trained model: its weights load into the stock config with no
    missing or unexpected keys (tests/test_inference_and_checkpoints.py), so the stock model,
    which Detectron2's export tools know, exports it."""
    from detectron2.checkpoint import DetectionCheckpointer

    trained = model(MASK, "ohem")
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("ohem_model")
    stock = model(MASK, "stock")
    incompatible = DetectionCheckpointer(stock)._load_model(
        torch.load(tmp_path / "ohem_model.pth", weights_only=False))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    scripted = scripting_with_instances(stock, SCRIPT_FIELDS)
    with torch.no_grad():
        for e, a in zip(trained.inference(images(), do_postprocess=False),
                        scripted.inference(images(), do_postprocess=False)):
            assert_instances_allclose(e, a)
