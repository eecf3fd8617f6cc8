"""ohem_d2.modeling.pooling.pool equals Detectron2's ROIPooler bit for bit, without host syncs."""
import pytest
import torch

from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from ohem_d2.experiments.op_count import OpCounter
from ohem_d2.modeling.pooling import pool


def boxes_of(n, size, g):
    xy = torch.rand(n, 2, generator=g) * (size - 8)
    wh = torch.rand(n, 2, generator=g) * size * 0.7 * torch.rand(1, generator=g)
    return Boxes(torch.cat([xy, (xy + wh).clamp(max=size)], dim=1))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("scales,channels", [((1 / 4, 1 / 8, 1 / 16, 1 / 32), 8), ((1 / 16,), 16)])
def test_pool_equals_detectron2_roipooler(sampling_ratio, pooler_type, scales, channels):
    pooler = ROIPooler(7, scales, sampling_ratio, pooler_type)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        size = 256
        features = [torch.randn(3, channels, int(size * s), int(size * s), generator=g) for s in scales]
        box_lists = [boxes_of(n, size, g) for n in (37, 0, 120)]  # an image without boxes
        expected = pooler(features, box_lists)
        with OpCounter() as counter:
            got = pool(pooler, features, box_lists)
        assert torch.equal(got, expected)
        assert counter.num_syncs == 0
