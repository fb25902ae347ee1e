"""ifcn.ops against slow, obviously-correct references and pycocotools.

Run: pytest tests/test_ops.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ifcn.ops import (BACKGROUND_LOGIT, GreedyMaskNMS, assemble, cell_to_map, crop_bbox, crop_to_rle, mask_nms,
                      paste_masks)


# ----------------------------------------------------------------------------- assembling

def _reference_assemble(scores: np.ndarray, windows: np.ndarray, m: int) -> np.ndarray:
    """Python loops straight from the paper: cell (r, c) of a window copies map (r*k//m)*k + c*k//m."""
    _, kk, height, width = scores.shape
    k = int(round(math.sqrt(kk)))
    out = np.empty((len(windows), m, m), dtype=scores.dtype)
    for w, (b, y0, x0) in enumerate(windows):
        for r in range(m):
            for c in range(m):
                y, x = y0 + r, x0 + c
                inside = 0 <= y < height and 0 <= x < width
                out[w, r, c] = scores[b, (r * k // m) * k + c * k // m, y, x] if inside else BACKGROUND_LOGIT
    return out


@pytest.mark.parametrize("m,k", [(21, 5), (7, 3), (4, 1), (9, 4), (7, 7), (10, 3)])
def test_cell_to_map_rule(m: int, k: int) -> None:
    got = cell_to_map(m, k).numpy()
    assert got.shape == (m, m)
    for r in range(m):
        for c in range(m):
            assert got[r, c] == (r * k // m) * k + c * k // m
    # every map is read by at least one cell, each part is a contiguous block
    assert set(got.reshape(-1).tolist()) == set(range(k * k))


@pytest.mark.parametrize("m,k,seed", [(21, 5, 0), (7, 3, 1), (4, 1, 2), (9, 4, 3), (5, 5, 4), (21, 5, 5)])
def test_assemble_matches_loop_reference(m: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, height, width = 2, int(rng.integers(3, 30)), int(rng.integers(3, 30))
    scores = rng.standard_normal((n, k * k, height, width)).astype(np.float32)
    count = 40
    windows = np.stack([rng.integers(0, n, count),
                        rng.integers(-m - 3, height + 3, count),
                        rng.integers(-m - 3, width + 3, count)], axis=1)
    # windows hanging over every border, one covering the whole map, and fully outside ones
    extra = [(0, -m // 2, -m // 2), (1, height - m // 2, width - m // 2), (0, -m // 2, width - 2),
             (1, height - 2, -m // 2), (0, -m, 0), (0, height, 0), (1, 0, -m), (1, 0, width),
             (0, -m - 5, width + 5), (0, (height - m) // 2, (width - m) // 2)]
    windows = np.concatenate([windows, np.array(extra)]).astype(np.int64)
    got = assemble(torch.from_numpy(scores), torch.from_numpy(windows), m).numpy()
    want = _reference_assemble(scores, windows, m)
    assert got.shape == (len(windows), m, m)
    np.testing.assert_array_equal(got, want)
    # windows fully outside the map read only background
    for w in range(len(windows) - 6, len(windows) - 1):
        assert np.all(got[w] == BACKGROUND_LOGIT)


def test_assemble_empty_windows_and_bad_input() -> None:
    scores = torch.zeros(1, 25, 4, 4)
    assert assemble(scores, torch.zeros((0, 3), dtype=torch.long), 21).shape == (0, 21, 21)
    with pytest.raises(ValueError, match="k\\*k"):
        assemble(torch.zeros(1, 24, 4, 4), torch.zeros((1, 3), dtype=torch.long), 21)
    with pytest.raises(ValueError, match="scores"):
        assemble(torch.zeros(25, 4, 4), torch.zeros((1, 3), dtype=torch.long), 21)


def _instance_sensitive_maps(instances: list[np.ndarray], k: int, m: int, shape: tuple[int, int]) -> np.ndarray:
    """Ideal score maps: a pixel of an instance is positive only in the map of its relative cell
    in the m x m window centred on that instance (the paper's definition), else negative."""
    scores = np.full((1, k * k, *shape), -10.0, dtype=np.float32)
    for inst in instances:
        ys, xs = np.nonzero(inst)
        cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
        y0, x0 = cy - m // 2, cx - m // 2
        for y, x in zip(ys, xs):
            scores[0, ((y - y0) * k // m) * k + (x - x0) * k // m, y, x] = 10.0
    return scores


def test_assemble_separates_touching_instances() -> None:
    """Two touching squares form one foreground blob; windows centred on each assemble only their own."""
    m, k, shape = 21, 5, (40, 50)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[16:24, 12:20] = True
    b[16:24, 20:28] = True  # touches a: together one foreground region
    win_a, win_b = (0, 20 - m // 2, 16 - m // 2), (0, 20 - m // 2, 24 - m // 2)
    windows = torch.tensor([win_a, win_b])

    def window_crop(mask: np.ndarray, win: tuple[int, int, int]) -> np.ndarray:
        return mask[win[1]:win[1] + m, win[2]:win[2] + m]

    def on_map(window_mask: np.ndarray, win: tuple[int, int, int]) -> np.ndarray:
        full = np.zeros(shape, bool)  # windows lie inside the map here
        full[win[1]:win[1] + m, win[2]:win[2] + m] = window_mask
        return full

    assert window_crop(b, win_a).any() and window_crop(a, win_b).any()  # each window sees both squares
    scores = _instance_sensitive_maps([a, b], k, m, shape)
    masks = torch.sigmoid(assemble(torch.from_numpy(scores), windows, m)).numpy() > 0.5
    # in image coordinates each window selects exactly its own square: two different masks
    np.testing.assert_array_equal(on_map(masks[0], win_a), a)
    np.testing.assert_array_equal(on_map(masks[1], win_b), b)

    # One foreground map (k = 1) cannot tell them apart: each window takes in its neighbour too.
    fg = _instance_sensitive_maps([a, b], 1, m, shape)
    fg_masks = torch.sigmoid(assemble(torch.from_numpy(fg), windows, m)).numpy() > 0.5
    np.testing.assert_array_equal(on_map(fg_masks[0], win_a), window_crop_mask(a | b, win_a, m))
    assert (on_map(fg_masks[0], win_a) & b).any() and (on_map(fg_masks[1], win_b) & a).any()


def window_crop_mask(mask: np.ndarray, win: tuple[int, int, int], m: int) -> np.ndarray:
    """`mask` zeroed outside the window."""
    out = np.zeros_like(mask)
    out[win[1]:win[1] + m, win[2]:win[2] + m] = mask[win[1]:win[1] + m, win[2]:win[2] + m]
    return out


# ----------------------------------------------------------------------------- pasting

def _reference_paste(probs: np.ndarray, cell: tuple[int, int], factor: tuple[float, float],
                     image_size: tuple[int, int], stride: int) -> np.ndarray:
    """Per-pixel bilinear resampling straight from paste_masks' docstring, in float64.

    Pixel p (centre p + 0.5) sits at resized coordinate (p + 0.5) * factor, i.e. at window cell
    u = (r - stride*c0) / stride - 0.5 clamped to [0, m-1]; zero outside the window's span.
    """
    m = probs.shape[0]
    height, width = image_size

    def axis(p: int, c0: int, f: float) -> tuple[int, int, float] | None:
        r = (p + 0.5) * f - stride * c0
        if not 0 <= r < m * stride:
            return None
        u = min(max(r / stride - 0.5, 0.0), m - 1.0)
        i0 = math.floor(u)
        return i0, min(i0 + 1, m - 1), u - i0

    out = np.zeros((height, width), dtype=np.float64)
    for py in range(height):
        ay = axis(py, cell[0], factor[0])
        if ay is None:
            continue
        for px in range(width):
            ax = axis(px, cell[1], factor[1])
            if ax is None:
                continue
            (y0, y1, ty), (x0, x1, tx) = ay, ax
            top = (1 - tx) * probs[y0, x0] + tx * probs[y0, x1]
            bottom = (1 - tx) * probs[y1, x0] + tx * probs[y1, x1]
            out[py, px] = (1 - ty) * top + ty * bottom
    return out


def _full(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    full = np.zeros(image_size, dtype=bool)
    full[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    return full


@pytest.mark.parametrize("m,factor,image_size,seed", [
    (7, (1.0, 1.0), (40, 50), 0),
    (7, (0.5, 0.75), (30, 37), 1),
    (5, (2.0, 1.5), (61, 47), 2),
    (6, (0.37, 1.9), (23, 71), 3),
    (21, (1.25, 1.25), (96, 80), 4),
])
def test_paste_masks_matches_bilinear_reference(m: int, factor: tuple[float, float], image_size: tuple[int, int],
                                                seed: int) -> None:
    rng = np.random.default_rng(seed)
    stride, threshold = 8, 0.5
    fh = math.ceil(image_size[0] * factor[0] / stride)
    fw = math.ceil(image_size[1] * factor[1] / stride)
    cells = np.stack([rng.integers(-m - 1, fh + 1, 6), rng.integers(-m - 1, fw + 1, 6)], axis=1)
    # over every border, the far corner, and fully outside
    cells = np.concatenate([cells, [[-m // 2, -m // 2], [fh - m // 2, fw - m // 2], [0, fw], [-m, 0],
                                    [fh - m, fw - m]]]).astype(np.int64)
    probs = rng.random((len(cells), m, m)).astype(np.float32)
    probs[0] = 1.0  # a solid window: its crop is exactly the window's span inside the image
    probs[1] = np.where(rng.random((m, m)) < 0.3, 0.5, 0.5 - 2.0**-11)  # cells at the threshold (fp16 0.5)
    probs[2] = 0.0
    probs[2, 1:3, m // 2:] = 0.9  # a sparse mask: most of the window is never resampled
    got = paste_masks(probs, cells, factor, image_size, stride, threshold)
    assert len(got) == len(cells)
    for i, (top, left, crop) in enumerate(got):
        assert crop.dtype == bool
        assert 0 <= top and 0 <= left and top + crop.shape[0] <= image_size[0] and left + crop.shape[1] <= image_size[1]
        ref = _reference_paste(probs[i].astype(np.float64), tuple(cells[i]), factor, image_size, stride)
        full = _full(top, left, crop, image_size)
        np.testing.assert_array_equal(full, ref > threshold, err_msg=f"window {i}")
        if full.any():  # crops are the masks' tight boxes
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        else:
            assert crop.size == 0
    # window 0 is all ones: its mask is every pixel whose centre falls inside the window span
    ref0 = _reference_paste(np.ones((m, m)), tuple(cells[0]), factor, image_size, stride)
    np.testing.assert_array_equal(_full(*got[0], image_size), ref0 > threshold)


def test_paste_masks_thresholds_and_empty() -> None:
    assert paste_masks(np.zeros((0, 21, 21), np.float32), np.zeros((0, 2), np.int64), (1.0, 1.0), (10, 10)) == []
    probs = np.full((1, 5, 5), 0.6, np.float32)
    (top, left, crop), = paste_masks(probs, np.array([[0, 0]]), (1.0, 1.0), (100, 100), 8, 0.5)
    want = np.zeros((100, 100), bool)
    want[:40, :40] = True  # 5 cells of 8 px at factor 1
    np.testing.assert_array_equal(_full(top, left, crop, (100, 100)), want)
    (_, _, crop), = paste_masks(probs, np.array([[0, 0]]), (1.0, 1.0), (100, 100), 8, 0.7)
    assert not crop.any()
    (_, _, crop), = paste_masks(probs, np.array([[20, 20]]), (1.0, 1.0), (100, 100), 8, 0.5)
    assert crop.size == 0  # window entirely past the image


# ----------------------------------------------------------------------------- RLE and boxes

def _coco_rle(full: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _crop_cases() -> list[tuple[tuple[int, int], int, int, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(60):
        height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.choice([0.05, 0.5, 0.95])
        cases.append(((height, width), top, left, crop))
    ones = np.ones((5, 7), bool)
    cases += [
        ((1, 1), 0, 0, np.ones((1, 1), bool)),
        ((1, 1), 0, 0, np.zeros((1, 1), bool)),
        ((1, 1), 0, 0, np.zeros((0, 0), bool)),
        ((10, 12), 3, 4, np.zeros((0, 5), bool)),
        ((10, 12), 3, 4, np.zeros((4, 5), bool)),
        ((5, 7), 0, 0, ones),  # the whole image
        ((9, 11), 4, 4, ones),  # bottom-right corner
        ((9, 11), 0, 0, ones),  # top-left corner
        ((9, 11), 0, 4, ones), ((9, 11), 4, 0, ones),
        ((1, 9), 0, 3, np.array([[1, 0, 1, 1]], bool)),
        ((9, 1), 2, 0, np.array([[1], [0], [1]], bool)),
        ((4, 6), 0, 2, np.ones((4, 2), bool)),  # full-height crops: columns follow each other
        ((4, 6), 0, 4, np.ones((4, 2), bool)),
        ((4, 6), 0, 1, np.array([[1, 0], [0, 0], [0, 0], [0, 1]], bool)),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_crop_cases())))
def test_crop_to_rle_bbox_area_match_pycocotools(case: int) -> None:
    image_size, top, left, crop = _crop_cases()[case]
    full = _full(top, left, crop, image_size)
    rle = crop_to_rle(top, left, crop, image_size)
    assert rle == _coco_rle(full)
    assert isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode(rle), full.astype(np.uint8))
    box = crop_bbox(top, left, crop)
    if full.any():
        coco = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
        assert list(box) == mask_utils.toBbox(coco).tolist()
        assert int(crop.sum()) == int(mask_utils.area(coco))
    else:
        assert box is None


# ----------------------------------------------------------------------------- mask NMS

def _reference_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int) -> list[int]:
    """Brute force: full IoU matrix in numpy, then greedy in (score desc, index asc) order."""
    flat = masks.reshape(len(masks), -1).astype(np.int64)
    inter = flat @ flat.T
    areas = flat.sum(1)
    iou = inter / (areas[:, None] + areas[None, :] - inter)
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept: list[int] = []
    for i in order:
        if all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(i)
        if len(kept) == max_keep:
            break
    return kept


def _nms_inputs(masks: np.ndarray) -> tuple[list[dict], np.ndarray, np.ndarray]:
    rles = [mask_utils.encode(np.asfortranarray(mk.astype(np.uint8))) for mk in masks]
    boxes = np.array([mask_utils.toBbox(r) for r in rles], dtype=np.float64).reshape(-1, 4)
    areas = np.array([mask_utils.area(r) for r in rles], dtype=np.int64)
    return rles, boxes, areas


def _random_masks(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """Random rectangles jittered around a few centres, some with holes: many near-duplicates."""
    masks = np.zeros((n, size, size), bool)
    centres = rng.integers(6, size - 6, (3, 2))
    for i in range(n):
        cy, cx = centres[rng.integers(0, 3)] + rng.integers(-2, 3, 2)
        hh, hw = rng.integers(2, 7, 2)
        masks[i, max(0, cy - hh):cy + hh, max(0, cx - hw):cx + hw] = True
        if rng.random() < 0.3:
            masks[i] &= rng.random((size, size)) < 0.8
        if not masks[i].any():
            masks[i, cy, cx] = True
    return masks


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_nms_matches_brute_force(iou_threshold: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 60)
    scores = rng.random(60).astype(np.float32)
    scores[5:10] = scores[0]  # ties are broken by index
    rles, boxes, areas = _nms_inputs(masks)
    for max_keep in (1000, 7):
        got = mask_nms(rles, scores, boxes, areas, iou_threshold, max_keep)
        assert got.dtype == np.int64
        assert got.tolist() == _reference_nms(masks, scores, iou_threshold, max_keep)


def test_mask_nms_just_above_and_below_threshold() -> None:
    # a: 10 x 10 square; b: the same with 20 pixels removed -> IoU 80/100 = 0.8 exactly;
    # c: 19 pixels removed -> IoU 0.81
    a = np.zeros((20, 20), bool)
    a[:10, :10] = True
    b, c = a.copy(), a.copy()
    b[:2, :10] = False
    c[:2, :10] = False
    c[1, 0] = True
    scores = np.array([0.9, 0.8], np.float32)
    for other, iou in ((b, 0.8), (c, 0.81)):
        rles, boxes, areas = _nms_inputs(np.stack([a, other]))
        # only an IoU above the threshold suppresses: at exactly the threshold both stay
        assert mask_nms(rles, scores, boxes, areas, iou, 10).tolist() == [0, 1]
        assert mask_nms(rles, scores, boxes, areas, iou - 0.005, 10).tolist() == [0]
        assert mask_nms(rles, scores, boxes, areas, iou + 0.005, 10).tolist() == [0, 1]
        for thr, want in ((iou, 2), (iou - 0.005, 1), (iou + 0.005, 2)):  # the pasted-crop path agrees
            nms = GreedyMaskNMS(thr, 10)
            for mask in (a, other):
                crop = _tight_crop(mask)
                nms.offer(crop, crop_bbox(*crop), int(mask.sum()))
            assert len(nms.kept) == want
    # boxes that overlap while masks do not (two L shapes): the box bound must not suppress
    l1, l2 = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    l1[:, 0] = l1[9, :] = True
    l2[0, :] = l2[:, 9] = True
    rles, boxes, areas = _nms_inputs(np.stack([l1, l2]))
    assert mask_nms(rles, np.array([0.5, 0.4]), boxes, areas, 0.5, 10).tolist() == [0, 1]


def test_mask_nms_empty_and_max_keep() -> None:
    got = mask_nms([], np.zeros(0, np.float32), np.zeros((0, 4)), np.zeros(0, np.int64), 0.8, 10)
    assert got.shape == (0,) and got.dtype == np.int64
    masks = np.zeros((5, 20, 20), bool)
    for i in range(5):
        masks[i, 4 * i:4 * i + 3, :3] = True  # disjoint
    rles, boxes, areas = _nms_inputs(masks)
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.2])
    assert mask_nms(rles, scores, boxes, areas, 0.5, 3).tolist() == [3, 1, 2]
    assert mask_nms(rles, scores, boxes, areas, 0.5, 1).tolist() == [3]


def _tight_crop(mask: np.ndarray) -> tuple[int, int, np.ndarray]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_nms_on_crops_matches_brute_force(iou_threshold: float, seed: int) -> None:
    """The pasted-crop path (exact IoU from overlapping pixels) keeps what the RLE path keeps."""
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 60)
    scores = rng.random(60)
    order = np.argsort(-scores, kind="stable")
    for max_keep in (1000, 9):
        nms = GreedyMaskNMS(iou_threshold, max_keep)
        kept = []
        for i in order:
            top, left, crop = _tight_crop(masks[i])
            if nms.offer((top, left, crop), crop_bbox(top, left, crop), int(crop.sum())):
                kept.append(int(i))
        assert kept == _reference_nms(masks, scores, iou_threshold, max_keep)
        assert nms.full == (len(kept) == max_keep)
        if nms.full:
            assert not nms.offer(_tight_crop(masks[0]), (0, 0, 1, 1), 1)
