"""Low-precision read-only pass (opt-in) and AMP: rankings in fp32, selection as fp32 up to ties."""
import dataclasses

import pytest
import torch

from detectron2.utils.events import EventStorage

from conftest import device, instances, random_fpn_features, random_proposals
from test_mining import fpn_heads

pytestmark = pytest.mark.model

B = 12


def mine(heads, autocast_dtype=None):
    """Run the heads' training step; return (hardness, selected indices, read-only output dtypes)."""
    captured, dtypes = {}, []
    select = heads.select

    def capture(hardness, proposals):
        captured["hardness"] = hardness
        out = select(hardness, proposals)
        captured["selected"] = out[0]
        return out

    heads.select = capture
    hook = heads.box_head.register_forward_hook(
        lambda m, i, out: dtypes.append(out.dtype) if not torch.is_grad_enabled() else None
    )
    targets = [instances((64, 64), None, gt_boxes=[[5, 5, 30, 30], [30, 20, 60, 50]], gt_classes=[1, 7])] * 2
    context = torch.autocast(device(), dtype=autocast_dtype) if autocast_dtype else torch.autocast(device(), enabled=False)
    with EventStorage(), context:
        _, losses = heads(None, random_fpn_features(), random_proposals(num=80), targets)
    hook.remove()
    heads.select = select
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
