"""The selection step against hand-computed cases (paper, Sec. 4.1)."""
import pytest
import torch

from ohem_d2.modeling.selection import deduplicate, select_per_image

from conftest import device

pytestmark = pytest.mark.model


def far_apart_boxes(n):
    """n 10x10 boxes that do not overlap each other."""
    return torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(n)], device=device())


def select(hardness, boxes, image_ids, num_images, b, nms=0.7):
    idx, num_after_nms = select_per_image(
        torch.tensor(hardness, device=device()), boxes.to(device()), torch.tensor(image_ids, device=device()),
        num_images, b, nms,
    )
    return idx.tolist(), num_after_nms


def test_ranks_by_loss_and_keeps_the_hardest():
    idx, n = select([0.1, 0.9, 0.5, 0.3], far_apart_boxes(4), [0, 0, 0, 0], 1, 2)
    assert idx == [1, 2]
    assert n == 4


def test_nms_at_0_7_removes_near_duplicates_of_harder_rois():
    boxes = torch.tensor([
        [0.0, 0, 10, 10],   # 0: IoU 0.9 with box 1 -> removed by the harder box 1
        [0.0, 0, 10, 9],    # 1: hardest
        [0.0, 0, 10, 6],    # 2: IoU 60/90 = 0.667 with box 1, 0.6 with box 0 -> kept
        [50.0, 50, 60, 60], # 3: far away
    ])
    idx, n = select([0.5, 0.8, 0.3, 0.4], boxes, [0, 0, 0, 0], 1, 10)
    assert idx == [1, 3, 2]
    assert n == 3
    # NMS_THRESH 1.0 turns it off: pure ranking by loss.
    idx, n = select([0.5, 0.8, 0.3, 0.4], boxes, [0, 0, 0, 0], 1, 10, nms=1.0)
    assert idx == [1, 0, 3, 2]
    assert n == 4


def test_nms_does_not_cross_images():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    idx, _ = select([0.2, 0.3], boxes, [0, 1], 2, 1)
    assert idx == [0, 1]


def test_top_k_per_image_grouped_by_image_hardest_first():
    hardness = [0.2, 0.7, 0.4, 0.9, 0.1, 0.6, 0.8]
    image_ids = [0, 0, 0, 1, 1, 1, 1]
    idx, _ = select(hardness, far_apart_boxes(7), image_ids, 2, 2)
    assert idx == [1, 2, 3, 6]


def test_image_with_fewer_candidates_than_k_keeps_all_of_them():
    hardness = [0.2, 0.7, 0.4, 0.9, 0.1, 0.6, 0.8]
    image_ids = [0, 0, 0, 1, 1, 1, 1]
    idx, _ = select(hardness, far_apart_boxes(7), image_ids, 2, 3)
    assert idx == [1, 2, 0, 3, 6, 5]  # image 0 has only 3, image 1 gives its 3 hardest of 4
    idx, _ = select(hardness, far_apart_boxes(7), image_ids, 2, 100)
    assert idx == [1, 2, 0, 3, 6, 5, 4]


def test_image_without_rois_gets_nothing_and_shifts_nothing():
    idx, _ = select([0.3, 0.5, 0.9, 0.1], far_apart_boxes(4), [0, 0, 2, 2], 3, 1)
    assert idx == [1, 2]


@pytest.mark.parametrize("nms", [0.5, 0.7, 1.0])
def test_matches_a_plain_python_reference(nms):
    """Random RoIs: the vectorised selection equals a greedy per-image loop written from the paper."""
    g = torch.Generator().manual_seed(1)
    num, num_images, b = 300, 3, 20
    xy = torch.rand(num, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 5 + torch.rand(num, 2, generator=g) * 30], dim=1)
    hardness = torch.rand(num, generator=g)
    image_ids = torch.randint(0, num_images, (num,), generator=g)

    from torchvision.ops import box_iou

    expected = []
    for i in range(num_images):
        rois = sorted((j for j in range(num) if image_ids[j] == i), key=lambda j: -hardness[j].item())
        kept = []
        for j in rois:
            if all(box_iou(boxes[j : j + 1], boxes[k : k + 1]).item() <= nms for k in kept) or nms >= 1:
                kept.append(j)
        expected += kept[:b]
    idx, _ = select_per_image(hardness.to(device()), boxes.to(device()), image_ids.to(device()), num_images, b, nms)
    assert idx.tolist() == expected


def test_deduplicate_returns_hardest_first():
    order = deduplicate(far_apart_boxes(3), torch.tensor([0.1, 0.3, 0.2], device=device()),
                        torch.zeros(3, dtype=torch.long, device=device()), 0.7)
    assert order.tolist() == [1, 2, 0]
