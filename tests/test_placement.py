"""Placement: what training teaches is where inference puts a mask.

A fake model returns IDEAL score and objectness maps: for each ground-truth instance, the training
targets of one positive window (built with ifcn.train.sampling's own geometry: `resize` of the
masks as `augment` does, `cell_fractions`, `window_labels`, `mask_targets`) are written into the
k*k instance-sensitive maps, and objectness is high at that window's centre. The public Predictor
then has to paste every instance back onto itself (mask IoU >= 0.85; the stride-8 cell grid caps an
ideal map near 0.9) from the scale where training made it positive. A second test shifts the
targets by half a cell and by one cell and checks the same bar then fails, so the first test would
catch a placement error of that size between training targets and inference pasting.

Run: OMP_NUM_THREADS=1 pytest -q tests/test_placement.py
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ifcn import InferenceConfig, ModelConfig, Predictor, assemble
from ifcn.train.sampling import WindowRule, cell_fractions, mask_targets, window_centres, window_labels
from ifcn.ops.transforms import resize, scaled_size

CONFIG = ModelConfig("vgg16_narrow")  # k = 5, m = 21, stride 8
LOGIT = 8.0  # ideal logits: sigmoid(+-8) is 1 or 0 up to 3e-4
IOU_BAR = 0.85
MAX_SIZE = 2000


# ----------------------------------------------------------------------------- ground truth

@dataclass(frozen=True)
class Case:
    """An image size (H, W) and non-overlapping instances (kind, top, left, height, width) in image px."""

    name: str
    size: tuple[int, int]
    shapes: tuple[tuple[str, int, int, int, int], ...]
    scales: tuple[int, ...] = (96, 128, 171, 228)


# Sizes are not multiples of 8; every instance's larger side is within 2^(+-1/4) of 96 px at one
# scale or two. Some instances touch each other, several touch the image border (their windows
# hang over it).
CASES = (
    Case("150x233", (150, 233), (
        ("rect", 0, 0, 60, 80),  # top-left corner, positive at 171
        ("rect", 0, 80, 100, 60),  # shares rect 0's right border; 128 and 171
        ("rect", 60, 10, 85, 45),  # shares rect 0's bottom border, tall; 171
        ("ellipse", 7, 142, 70, 90),  # 171
        ("ellipse", 91, 168, 59, 65),  # bottom-right corner, 228
    )),
    Case("201x131", (201, 131), (
        ("ellipse", 10, 0, 140, 60),  # left border, tall, 96
        ("rect", 0, 60, 50, 60),  # top border, 228
        ("rect", 50, 60, 90, 71),  # shares rect 1's bottom border, right border; 128
        ("ellipse", 150, 20, 51, 100),  # bottom border, wide; 128
    )),
    Case("97x97", (97, 97), (
        ("rect", 0, 0, 40, 48),  # 171 and 228
        ("rect", 0, 48, 40, 49),  # shares rect 0's right border, right border; 171
        ("ellipse", 45, 10, 52, 76),  # bottom border; 128
    )),
    Case("61x317", (61, 317), (
        ("ellipse", 0, 0, 61, 61),  # touches three borders; 96
        ("rect", 5, 61, 50, 40),  # touches the ellipse's box; 128
        ("rect", 20, 120, 35, 25),  # 171
        ("ellipse", 10, 200, 30, 45),  # wide; 128
        ("rect", 31, 288, 30, 29),  # bottom-right corner, 171 and 228
    )),
)


def draw(case: Case) -> np.ndarray:
    """(N, H, W) bool instance masks; ellipses are the pixels whose centres lie inside."""
    height, width = case.size
    ys, xs = np.mgrid[:height, :width] + 0.5
    out = np.zeros((len(case.shapes), height, width), dtype=bool)
    for i, (kind, top, left, h, w) in enumerate(case.shapes):
        if kind == "rect":
            out[i, top:top + h, left:left + w] = True
        else:
            out[i] = ((ys - top - h / 2) / (h / 2)) ** 2 + ((xs - left - w / 2) / (w / 2)) ** 2 <= 1.0
    assert out.sum(0).max() <= 1, f"{case.name}: instances overlap"
    return out


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 COCO xywh tight boxes (as the dataset's boxes are)."""
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append((cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1))
    return np.asarray(boxes, dtype=np.float32)


# ----------------------------------------------------------------------------- ideal maps

@dataclass
class IdealMaps:
    """Logits of one scale: scores (k*k, h, w), objectness (1, h, w); centres: instance -> (y, x)."""

    scores: torch.Tensor
    objectness: torch.Tensor
    centres: dict[int, tuple[int, int]]


def ideal_maps(masks: np.ndarray, size: tuple[int, int], shift: tuple[int, int] = (0, 0)) -> IdealMaps:
    """What a perfectly trained model outputs at resized size (h, w), by the training geometry.

    shift (dy, dx) moves the target masks by that many resized pixels (windows and labels stay
    put): a placement error the test must catch.
    """
    m, k, stride = CONFIG.m, CONFIG.k, CONFIG.stride
    height, width = masks.shape[1:]
    fy, fx = size[0] / height, size[1] / width
    # as `augment`: float masks resized like the image, boxes scaled by the same factors
    resized = resize(torch.from_numpy(masks).float()[:, None], size)[:, 0]  # (N, h, w)
    boxes = torch.from_numpy(tight_boxes(masks) * np.array([fx, fy, fx, fy], dtype=np.float32))
    if shift != (0, 0):
        dy, dx = shift  # pad on one side, crop the other: content moves by (dy, dx), zeros come in
        padded = F.pad(resized, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
        resized = padded[:, max(-dy, 0):max(-dy, 0) + size[0], max(-dx, 0):max(-dx, 0) + size[1]]
    fractions = cell_fractions(resized, stride)  # (N, fh, fw)
    feat = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    n = len(masks)
    labels, instance = window_labels(boxes, torch.zeros(n, dtype=torch.bool), torch.zeros(feat, dtype=torch.bool),
                                     feat, m, stride, WindowRule.for_window(m * stride))
    # one window per positive instance: among the cells training assigns to it, the one whose
    # centre is nearest the box centre
    cy, cx = window_centres(feat, m, stride)
    centres: dict[int, tuple[int, int]] = {}
    for i in range(n):
        ys, xs = torch.nonzero(instance == i, as_tuple=True)
        if len(ys) == 0:
            continue
        bx, by, bw, bh = boxes[i].tolist()
        dist = (cy[ys] - (by + bh / 2)) ** 2 + (cx[xs] - (bx + bw / 2)) ** 2
        j = int(torch.argmin(dist))
        centres[i] = (int(ys[j]), int(xs[j]))
    scores = torch.full((k * k, *feat), -LOGIT)
    objectness = torch.full((1, *feat), -LOGIT)
    if not centres:
        return IdealMaps(scores, objectness, centres)
    inst = torch.tensor(list(centres))
    cells = torch.tensor(list(centres.values()))  # (P, 2) window centres (y, x)
    targets = mask_targets(fractions, inst, cells, m)  # (P, m, m) {0, 1}
    # window cell (r, c) of the window with top-left cell (y0, x0) is map (r*k//m)*k + c*k//m at
    # feature cell (y0 + r, x0 + c), the paper's definition
    for (y, x), target in zip(cells.tolist(), targets):
        rr, cc = torch.nonzero(target > 0.5, as_tuple=True)
        fy_, fx_ = y - m // 2 + rr, x - m // 2 + cc
        inside = (fy_ >= 0) & (fy_ < feat[0]) & (fx_ >= 0) & (fx_ < feat[1])
        part = (rr * k // m) * k + cc * k // m
        scores[part[inside], fy_[inside], fx_[inside]] = LOGIT
        objectness[0, y, x] = LOGIT
    # instances write into the same maps: each chosen window must still read back exactly its
    # own target, or the test would measure map collisions rather than placement
    windows = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long), cells - m // 2], dim=1)
    read = (assemble(scores[None], windows, m) > 0).float()
    assert torch.equal(read, targets), "ideal maps collide: instances too close at this scale"
    return IdealMaps(scores, objectness, centres)


class IdealModel(torch.nn.Module):
    """Stands in for InstanceFCN: returns precomputed ideal logits for the input's (h, w)."""

    def __init__(self, masks: np.ndarray, scales: tuple[int, ...], shift: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.config = CONFIG
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # something for Predictor's .to() to move
        height, width = masks.shape[1:]
        self.maps: dict[tuple[int, int], IdealMaps] = {}
        self.positive: dict[int, set[int]] = {i: set() for i in range(len(masks))}  # instance -> scales
        for short in scales:
            size = scaled_size(height, width, short, MAX_SIZE)
            self.maps[size] = ideal_maps(masks, size, shift)
            for i in self.maps[size].centres:
                self.positive[i].add(short)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.maps[tuple(x.shape[-2:])]
        n = x.shape[0]  # any batch: every item is the same image
        return (maps.scores.to(x)[None].expand(n, -1, -1, -1), maps.objectness.to(x)[None].expand(n, -1, -1, -1))


# ----------------------------------------------------------------------------- matching

def best_matches(case: Case, shift: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, list[int], dict[int, set[int]]]:
    """Runs the Predictor on the case's ideal model: per instance the best proposal IoU and its
    scale, and the scales at which each instance is positive."""
    masks = draw(case)
    model = IdealModel(masks, case.scales, shift)
    config = InferenceConfig(scales=case.scales, max_size=MAX_SIZE, windows_per_scale=12, max_proposals=100,
                             nms_iou=0.8)
    image = np.zeros((*case.size, 3), dtype=np.uint8)  # the fake model ignores pixels
    proposals = Predictor(model, config, device="cpu").predict(image)
    assert proposals, f"{case.name}: no proposals"
    pred = np.stack([mask_utils.decode(p["rle"]) for p in proposals]).astype(bool)  # (P, H, W)
    inter = np.einsum("phw,nhw->np", pred.astype(np.float64), masks.astype(np.float64))
    union = pred.sum((1, 2))[None, :] + masks.sum((1, 2))[:, None] - inter
    iou = inter / union  # (N, P)
    best = iou.argmax(1)
    return iou.max(1), [proposals[j]["scale"] for j in best], model.positive


def describe(case: Case, ious: np.ndarray, scales: list[int], positive: dict[int, set[int]]) -> str:
    return "; ".join(f"#{i} {case.shapes[i][0]} IoU {v:.3f} from scale {s}, positive at {sorted(positive[i])}"
                     for i, (v, s) in enumerate(zip(ious, scales)))


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ideal_maps_paste_back_onto_their_instances(case: Case) -> None:
    ious, scales, positive = best_matches(case)
    report = describe(case, ious, scales, positive)
    print(f"{case.name}: {report}")  # visible with -s
    unplaced = [i for i, s in positive.items() if not s]
    assert not unplaced, f"{case.name}: instances {unplaced} are positive at no scale (fix the case)"
    assert ious.min() >= IOU_BAR, f"{case.name}: min IoU {ious.min():.3f} < {IOU_BAR}: {report}"
    # the proposal comes from the window training taught, not from a neighbour scale's leftovers
    wrong = [i for i, s in enumerate(scales) if s not in positive[i]]
    assert not wrong, f"{case.name}: best match from a scale where not positive: {report}"


@pytest.mark.parametrize("shift", [(4, 0), (0, 4), (-4, 0), (0, -4), (4, 4), (8, 8)], ids=str)
def test_shifted_maps_fail_the_bar(shift: tuple[int, int]) -> None:
    """The bar has teeth: targets off by half a cell (4 px, either axis or sign) or one cell,
    as a misplaced paste would be, bring instances below it (a diagonal cell: all of them)."""
    ious = np.concatenate([best_matches(case, shift)[0] for case in CASES])
    print(f"shift {shift} px: IoUs {np.round(ious, 3).tolist()}")
    assert ious.min() < IOU_BAR, f"a {shift} px shift went unnoticed: min IoU {ious.min():.3f}"
    if shift == (8, 8):
        assert ious.max() < IOU_BAR, f"one-cell shift: IoUs {np.round(ious, 3).tolist()}"
