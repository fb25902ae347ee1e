"""Window labels, sampling, mask targets and the loss, against hand-computed cases and slow references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifcn.train.loss import instancefcn_map_loss
from ifcn.train.sampling import (IGNORE, NEGATIVE, POSITIVE, Example, WindowBatch, WindowRule, augment,
                                 cell_fractions, mask_targets, sample_example, sample_windows, window_centres,
                                 window_labels)

M, STRIDE, FEAT = 21, 8, (32, 32)  # a 256 x 256 image at scale 1: window centres at 8 * cell + 4


def box_at(cy: float, cx: float, h: float, w: float) -> list[float]:
    return [cx - w / 2, cy - h / 2, w, h]


def labels_for(boxes: list[list[float]], crowd: list[bool] | None = None,
               crowd_cells: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    c = torch.tensor(crowd if crowd is not None else [False] * len(boxes), dtype=torch.bool)
    cc = crowd_cells if crowd_cells is not None else torch.zeros(FEAT, dtype=torch.bool)
    return window_labels(b, c, cc, FEAT, M, STRIDE, WindowRule())


def test_rule_is_deepmask_scaled_to_168px_window():
    r = WindowRule.for_window(168)
    assert (r.pos_shift, r.neg_shift, r.object_px) == (12.0, 24.0, 96.0)
    assert r == WindowRule()


def test_window_centres_match_the_model_window_geometry():
    cy, cx = window_centres(FEAT, M, STRIDE)
    # Window centred at cell y has top-left cell y - 10 and covers resized px [8*(y-10), 8*(y-10) + 168).
    y = 12
    assert cy[y] == 8 * (y - M // 2) + M * STRIDE / 2 == 100.0
    assert cx.shape == (32,)


def test_centred_object_of_the_right_size_is_positive():
    labels, inst = labels_for([box_at(100, 132, 96, 60)])  # centre exactly on cell (12, 16)
    assert labels[12, 16] == POSITIVE and inst[12, 16] == 0
    assert labels[13, 16] == POSITIVE  # 8 px off: within 12
    assert labels[14, 16] == IGNORE  # 16 px off: not positive, not yet negative (< 24)
    assert labels[15, 16] == NEGATIVE  # 24 px off
    assert labels[12, 19] == NEGATIVE
    assert labels[0, 0] == NEGATIVE and inst[0, 0] == -1
    assert int((labels == POSITIVE).sum()) == 9  # offsets -8, 0, 8 px on each axis


@pytest.mark.parametrize("size,expected", [(96 * 2 ** 0.24, POSITIVE), (96 * 2 ** 0.3, IGNORE),
                                           (96 * 2 ** -0.3, IGNORE), (96 * 2 ** 0.99, IGNORE), (192, NEGATIVE),
                                           (48, NEGATIVE), (300, NEGATIVE)])
def test_wrong_size_object_is_not_positive(size, expected):
    labels, _ = labels_for([box_at(100, 132, size, size * 0.6)])
    assert labels[12, 16] == expected


def test_off_centre_object_is_not_positive():
    labels, _ = labels_for([box_at(100 + 13, 132, 96, 60)])  # 13 px below cell 12's centre, 5 above cell 13's
    assert labels[12, 16] == IGNORE
    assert labels[13, 16] == POSITIVE


def test_nearest_instance_wins_and_negatives_need_every_instance_far():
    labels, inst = labels_for([box_at(100, 132, 96, 60), box_at(108, 132, 90, 60)])
    assert labels[12, 16] == POSITIVE and inst[12, 16] == 0
    assert labels[13, 16] == POSITIVE and inst[13, 16] == 1
    assert labels[15, 16] == IGNORE  # 24 px from the first (negative), 16 from the second (not)
    assert labels[16, 16] == NEGATIVE  # 32 and 24 px: far from both


def test_crowd_windows_are_ignored_not_negative():
    crowd_cells = torch.zeros(FEAT, dtype=torch.bool)
    crowd_cells[25:, 25:] = True
    labels, inst = labels_for([box_at(100, 132, 96, 60)], crowd=[True], crowd_cells=crowd_cells)
    assert labels[12, 16] == IGNORE and inst[12, 16] == -1  # would be positive for a normal instance
    assert labels[14, 16] == IGNORE
    assert labels[28, 28] == IGNORE  # centre on the crowd region
    assert labels[0, 0] == NEGATIVE
    assert not (labels == POSITIVE).any()


def test_no_instances_all_negative():
    labels, inst = window_labels(torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool),
                                 torch.zeros(FEAT, dtype=torch.bool), FEAT, M, STRIDE, WindowRule())
    assert (labels == NEGATIVE).all() and (inst == -1).all()


def test_cell_fractions_hand_computed():
    mask = torch.zeros(1, 20, 20)  # pads to 24 x 24: 3 x 3 cells
    mask[0, 0:8, 0:4] = 1  # half of cell (0, 0)
    mask[0, 16:20, 16:20] = 1  # the 4 x 4 in-image part of cell (2, 2)
    frac = cell_fractions(mask, 8)
    expected = torch.zeros(1, 3, 3)
    expected[0, 0, 0], expected[0, 2, 2] = 0.5, 16 / 64
    torch.testing.assert_close(frac, expected)


def test_target_mask_hand_computed():
    mask = torch.zeros(2, 256, 256)
    mask[0, 96:104, 128:144] = 1  # cells (12, 16) and (12, 17)
    mask[0, 96:104, 144:148] = 1  # half of cell (12, 18): >= 0.5 counts
    mask[0, 104:107, 128:144] = 1  # 3/8 of cells (13, 16..17): does not
    mask[1, 0:8, 0:8] = 1  # cell (0, 0)
    frac = cell_fractions(mask, STRIDE)
    t = mask_targets(frac, torch.tensor([0, 1]), torch.tensor([[12, 16], [1, 1]]), M)
    expected = torch.zeros(2, M, M)
    expected[0, 10, 10:13] = 1  # window top-left cell (2, 6): cell (12, 16) is window cell (10, 10)
    expected[1, 9, 9] = 1  # top-left (-9, -9): cell (0, 0) is window cell (9, 9); outside the map is 0
    torch.testing.assert_close(t, expected)


def test_sample_windows_all_positives_up_to_half_negatives_fill():
    labels = torch.full((10, 10), NEGATIVE, dtype=torch.int8)
    labels[0, :3] = POSITIVE
    labels[1, :] = IGNORE
    g = torch.Generator().manual_seed(0)
    pos, neg = sample_windows(labels, 16, 0.5, g)
    assert sorted(pos.tolist()) == [0, 1, 2] and len(neg) == 13
    assert all(labels.reshape(-1)[i] == NEGATIVE for i in neg)
    labels[2:, :] = POSITIVE
    pos, neg = sample_windows(labels, 16, 0.5, g)
    assert len(pos) == 8 and len(neg) == 7  # 7 negatives exist in total
    assert len(set(pos.tolist())) == 8


def test_sample_example_targets_are_the_positive_instances_masks():
    masks = torch.zeros(1, 256, 256)
    masks[0, 52:148, 102:162] = 1  # box centred on cell (12, 16), 96 x 60
    ex = Example(torch.zeros(1, 3, 256, 256), masks, torch.tensor([box_at(100, 132, 96, 60)]),
                 torch.tensor([False]), 256)
    batch = sample_example(ex, M, STRIDE, 256, 0.5, torch.Generator().manual_seed(0))
    assert batch.num_positive == 9 and len(batch.labels) == 256
    assert batch.labels[:9].eq(1).all() and batch.labels[9:].eq(0).all()
    centre = [i for i, c in enumerate(batch.cells.tolist()) if c == [12, 16]][0]
    # Rows 52..147: cells 6 (48..55) and 18 (144..151) have 4 of 8 rows inside, so count; columns
    # 102..161: cells 12 (96..103) and 20 (160..167) have only 2, so they do not.
    expected = torch.zeros(M, M)

    def covered(lo: int, hi: int) -> list[int]:  # cells with >= 4 of their 8 pixels inside [lo, hi)
        return [i for i in range(32) if len(set(range(8 * i, 8 * i + 8)) & set(range(lo, hi))) >= 4]

    rows, cols = covered(52, 148), covered(102, 162)
    assert rows == list(range(6, 19)) and cols == list(range(13, 20))
    for r in rows:
        for c in cols:
            expected[r - 2, c - 6] = 1
    torch.testing.assert_close(batch.targets[centre], expected)


def test_augment_flip_and_scale_move_boxes_with_masks():
    image = np.zeros((40, 60, 3), np.uint8)
    masks = np.zeros((1, 40, 60), np.uint8)
    masks[0, 10:20, 5:15] = 1
    boxes = np.array([[5, 10, 10, 10]], np.float32)
    for seed in range(6):
        ex = augment(image, masks, boxes, np.array([False]), np.random.default_rng(seed), (80,), 1000, True)
        assert ex.image.shape == (1, 3, 80, 120) and ex.masks.shape == (1, 80, 120)
        ys, xs = torch.nonzero(ex.masks[0] > 0.5, as_tuple=True)
        x, y, w, h = ex.boxes[0].tolist()
        assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (x, y, x + w, y + h)


def reference_loss(scores, objectness, batch, m):
    """Slow: every window cell read from its own score map in a Python loop."""
    k = int(math.isqrt(scores.shape[1]))
    obj = F.binary_cross_entropy_with_logits(
        torch.stack([objectness[0, 0, y, x] for y, x in batch.cells.tolist()]), batch.labels)
    h, w = scores.shape[-2:]
    total = 0.0
    for p in range(batch.num_positive):
        y0, x0 = (v - m // 2 for v in batch.cells[p].tolist())
        for r in range(m):
            for c in range(m):
                yy, xx = y0 + r, x0 + c
                logit = scores[0, (r * k // m) * k + c * k // m, yy, xx] if 0 <= yy < h and 0 <= xx < w \
                    else torch.tensor(-1e4)
                total = total + F.binary_cross_entropy_with_logits(logit, batch.targets[p, r, c])
    return obj + total / (batch.num_positive * m * m)


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    m, k = 7, 3
    scores, objectness = torch.randn(1, k * k, 9, 11, generator=g), torch.randn(1, 1, 9, 11, generator=g)
    cells = torch.tensor([[0, 0], [4, 5], [8, 10], [2, 7], [6, 1]])
    targets = (torch.rand(3, m, m, generator=g) > 0.5).float()
    batch = WindowBatch(cells, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]), targets)
    loss, parts = instancefcn_map_loss(scores, objectness, batch, m)
    torch.testing.assert_close(loss, reference_loss(scores, objectness, batch, m))
    assert parts["objectness"] > 0 and parts["mask"] > 0


def test_loss_without_positives_is_objectness_only_and_differentiable():
    scores = torch.randn(1, 25, 6, 6, requires_grad=True)
    objectness = torch.randn(1, 1, 6, 6, requires_grad=True)
    batch = WindowBatch(torch.tensor([[1, 1], [2, 3]]), torch.zeros(2), torch.zeros(0, 21, 21))
    loss, parts = instancefcn_map_loss(scores, objectness, batch, 21)
    loss.backward()
    assert parts["mask"] == 0.0 and scores.grad is not None
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(objectness[0, 0, [1, 2], [1, 3]],
                                                                        torch.zeros(2)))


def test_image_without_instances_gives_negatives_only():
    ex = augment(np.zeros((50, 60, 3), np.uint8), np.zeros((0, 50, 60), np.uint8), np.zeros((0, 4)),
                 np.zeros(0, bool), np.random.default_rng(0), (64,), 1000, True)
    batch = sample_example(ex, M, STRIDE, 16, 0.5, torch.Generator().manual_seed(0))
    assert batch.num_positive == 0 and batch.labels.tolist() == [0.0] * 16
    assert batch.targets.shape == (0, M, M)
