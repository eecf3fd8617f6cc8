"""Low-precision read-only pass (opt-in) and AMP: rankings in fp32, selection as fp32 up to ties."""
import contextlib
import dataclasses

import pytest
import torch

from detectron2.utils.events import EventStorage

from conftest import device, instances, random_fpn_features, random_proposals
from test_mining import fpn_heads

pytestmark = pytest.mark.model

B = 12


@contextlib.contextmanager
def capturing_selection(heads):
    """While in it, the hardness the heads' ``select`` sees and the indices it returns, in the dict yielded."""
    captured, select = {}, heads.select

    def capture(hardness, proposals):
        captured["hardness"] = hardness
        out = select(hardness, proposals)
        captured["selected"] = out[0]
        return out

    heads.select = capture
    try:
        yield captured
    finally:
        heads.select = select


def mine(heads, autocast_dtype=None):
    """Run the heads' training step; return (hardness, selected indices, read-only output dtypes)."""
    dtypes = []
    hook = heads.box_head.register_forward_hook(
        lambda m, i, out: dtypes.append(out.dtype) if not torch.is_grad_enabled() else None
    )
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7])] * 2
    context = torch.autocast(device(), dtype=autocast_dtype) if autocast_dtype else torch.autocast(device(), enabled=False)
    with capturing_selection(heads) as captured, EventStorage(), context:
        _, losses = heads(None, random_fpn_features(), random_proposals(num=80), targets)
    hook.remove()
    assert all(torch.isfinite(v) for v in losses.values())
    return captured["hardness"], captured["selected"], dtypes


def assert_same_selection_up_to_ties(reference_hardness, reference, selected, rtol=0.03):
    """Every RoI picked instead of a reference pick is as hard as the B-th reference pick, within rtol."""
    swapped_in = set(selected.tolist()) - set(reference.tolist())
    kth = reference_hardness[reference].min()
    for i in swapped_in:
        assert reference_hardness[i] >= kth * (1 - rtol), (i, reference_hardness[i], kth)
    assert len(swapped_in) <= len(reference) // 4


@pytest.fixture()
def heads():
    torch.manual_seed(0)
    return fpn_heads(opts=["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", B, "MODEL.OHEM.NMS_THRESH", 1.0])


def test_bf16_read_only_pass_is_opt_in_and_ranks_in_fp32(heads):
    h32, s32, dtypes32 = mine(heads)
    assert set(dtypes32) == {torch.float32}
    heads.ohem = dataclasses.replace(heads.ohem, readonly_dtype="bfloat16")
    hbf, sbf, dtypes_bf = mine(heads)
    assert set(dtypes_bf) == {torch.bfloat16}
    assert hbf.dtype == torch.float32
    assert_same_selection_up_to_ties(h32, s32, sbf)


def test_under_amp_the_read_only_pass_follows_autocast(heads):
    h32, s32, _ = mine(heads)
    hamp, samp, dtypes = mine(heads, autocast_dtype=torch.bfloat16)
    assert set(dtypes) == {torch.bfloat16}
    assert hamp.dtype == torch.float32 and torch.isfinite(hamp).all()
    assert_same_selection_up_to_ties(h32, s32, samp)


def c4_heads(opts=()):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import build_roi_heads

    from conftest import C4_OHEM, load_cfg

    torch.manual_seed(0)
    cfg = load_cfg(C4_OHEM, ["MODEL.OHEM.BATCH_SIZE_PER_IMAGE", B, "MODEL.OHEM.NMS_THRESH", 1.0, *opts])
    return build_roi_heads(cfg, {"res4": ShapeSpec(channels=256, stride=16)}).to(device()).train()


def mine_c4(heads):
    """The C4 heads' training step: (hardness, selected, [(res5 input shape, channels_last) of each
    read-only call])."""
    calls = []
    hook = heads.res5.register_forward_pre_hook(lambda m, i: calls.append(
        (tuple(i[0].shape), i[0].is_contiguous(memory_format=torch.channels_last))) if not torch.is_grad_enabled()
        else None)
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7])] * 2
    g = torch.Generator().manual_seed(1)
    with capturing_selection(heads) as captured, EventStorage():
        _, losses = heads(None, {"res4": torch.randn(2, 256, 4, 4, generator=g).to(device())},
                          random_proposals(num=50), targets)
    hook.remove()
    sum(losses.values()).backward()  # the trainable pass is unaffected by the option
    return captured["hardness"], captured["selected"], calls


def test_fixed_shapes_pad_every_chunk_and_run_res5_in_channels_last_in_the_read_only_pass_only():
    chunk = ["MODEL.OHEM.READONLY_CHUNK_SIZE", 16]
    h_ref, s_ref, calls_ref = mine_c4(c4_heads(chunk))
    h_fix, s_fix, calls_fix = mine_c4(c4_heads(chunk + ["MODEL.OHEM.READONLY_CHANNELS_LAST", True]))
    # 52 RoIs per image (50 proposals + 2 GT): chunks of 16, 16, 16 and 4; padded, all of 16.
    assert [shape[0] for shape, _ in calls_ref] == [16, 16, 16, 4] * 2 and not any(cl for _, cl in calls_ref)
    assert {shape[0] for shape, _ in calls_fix} == {16} and len(calls_fix) == 8 and all(cl for _, cl in calls_fix)
    assert h_fix.shape == h_ref.shape  # the padding rows are dropped
    torch.testing.assert_close(h_fix, h_ref, rtol=1e-4, atol=1e-5)  # fp32: the layout changes rounding only
    assert_same_selection_up_to_ties(h_ref, s_ref, s_fix)


def test_fixed_shapes_need_chunks():
    from ohem_d2.modeling.settings import OHEMConfigError, OHEMSettings

    with pytest.raises(OHEMConfigError, match=r"MODEL\.OHEM\.READONLY_CHANNELS_LAST = True is invalid: expected "
                                              "False with READONLY_CHUNK_SIZE 0"):
        OHEMSettings(readonly_channels_last=True, readonly_chunk_size=0)
    with pytest.raises(OHEMConfigError, match=r"READONLY_CHANNELS_LAST = 'yes' is invalid"):
        OHEMSettings(readonly_channels_last="yes")
