"""Pure tensor/array ops: assembling, pasting, RLE, boxes, mask NMS.

No model state here: each function is tested against a slow reference in tests/test_ops.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from .config import NMS_MODES

# Logit for window cells that fall outside the feature map: sigmoid(-1e4) == 0 (background),
# and still finite in bf16/fp16.
BACKGROUND_LOGIT = -1.0e4


def cell_to_map(m: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(m, m) long: score-map number i*k + j that window cell (r, c) reads, i = r*k // m, j = c*k // m."""
    part = torch.arange(m, device=device) * k // m  # (m,)
    return part[:, None] * k + part[None, :]


def assemble(scores: torch.Tensor, windows: torch.Tensor, m: int) -> torch.Tensor:
    """Instance-sensitive assembling: copies each of a window's k x k cells from its own map.

    scores: (N, k*k, H, W) logits; windows: (n, 3) long (image index, y0, x0), each window's
    top-left feature cell (may be negative or run past the map). Returns (n, m, m) logits;
    cells outside the map read BACKGROUND_LOGIT.
    """
    if scores.ndim != 4:
        raise ValueError(f"assemble: scores must be (N, k*k, H, W), got {tuple(scores.shape)}")
    kk, height, width = scores.shape[1:]
    k = int(round(kk**0.5))
    if k * k != kk:
        raise ValueError(f"assemble: channel count {kk} is not a square k*k")
    windows = windows.long() if windows.device == scores.device else windows.to(device=scores.device, dtype=torch.long)
    windows = windows.reshape(-1, 3)
    if windows.shape[0] == 0:
        return scores.new_zeros((0, m, m))
    # A background border of m cells makes every window one plain gather: a window starting
    # further out than the border is all background, as is the border itself.
    padded = F.pad(scores, (m, m, m, m), value=BACKGROUND_LOGIT)  # (N, k*k, H + 2m, W + 2m)
    offs = torch.arange(m, device=scores.device)
    ys = windows[:, 1:2].clamp(-m, height) + m + offs  # (W, m) rows of `padded`
    xs = windows[:, 2:3].clamp(-m, width) + m + offs  # (W, m)
    b = windows[:, 0][:, None, None]  # (W, 1, 1)
    ch = cell_to_map(m, k, scores.device)[None]  # (1, m, m)
    return padded[b, ch, ys[:, :, None], xs[:, None, :]]  # (W, m, m)


class _AxisSamples:
    """Bilinear sampling of one axis for a batch of windows: each pixel of a window's span blends
    cells i0 and i1 with weight t on i1. All fields (W, count); `valid` marks pixels inside both
    the window's span and the image.

    Pixel p (centre p + 0.5) sits at resized coordinate (p + 0.5) * factor, i.e. at window cell
    u = ((p + 0.5) * factor - stride * c0) / stride - 0.5, clamped to [0, m-1].
    """

    def __init__(self, cell0: np.ndarray, factor: float, m: int, stride: int, size: int) -> None:
        self.start, count = window_pixel_span(cell0, factor, m, stride)
        p = self.start[:, None] + np.arange(count)[None, :]  # (W, count) image pixels
        r = (p + 0.5) * factor - (cell0 * stride)[:, None]  # resized px from the window's start
        self.valid = (r >= 0) & (r < m * stride) & (p >= 0) & (p < size)
        u = np.clip(r / stride - 0.5, 0.0, m - 1.0)
        self.i0 = np.floor(u).astype(np.int64)
        self.i1 = np.minimum(self.i0 + 1, m - 1)
        self.t = u - self.i0

    def support(self, on: np.ndarray) -> np.ndarray:
        """(W, count) pixels that blend at least one cell marked in `on` (W, m)."""
        rows = np.arange(len(on))[:, None]
        return self.valid & (on[rows, self.i0] | on[rows, self.i1])


def window_pixel_span(cell0: np.ndarray, factor: float, m: int, stride: int) -> tuple[np.ndarray, int]:
    """First image pixel a window covers along one axis, and a span length that fits every window.

    A window starting at feature cell c0 covers resized pixels [c0*stride, (c0+m)*stride), i.e.
    image pixels p with c0*stride <= (p + 0.5) * factor < (c0+m)*stride.
    """
    start = np.ceil(cell0 * stride / factor - 0.5).astype(np.int64)
    count = int(np.ceil(m * stride / factor)) + 1
    return start, count


_EMPTY_CROP = (0, 0, np.zeros((0, 0), dtype=bool))


def paste_masks(probs: np.ndarray, cells: np.ndarray, factor: tuple[float, float], image_size: tuple[int, int],
                stride: int = 8, threshold: float = 0.5) -> list[tuple[int, int, np.ndarray]]:
    """Pastes m x m window probabilities back into image pixels and binarises them.

    probs: (W, m, m) in [0, 1]; cells: (W, 2) window top-left feature cells (y0, x0) at a scale
    whose resized/original factor is (fy, fx); image_size: (H, W) of the original image.
    Returns per window (top, left, crop): crop is the mask's tight bool (h, w) box inside the image,
    (0, 0, (0, 0)) when the mask is empty. Pixel p samples the window bilinearly at cell
    u = ((p + 0.5) * factor - stride * c0) / stride - 0.5 (clamped to [0, m-1]) and is zero outside
    the window's span [stride * c0, stride * (c0 + m)) in resized pixels.
    """
    n, m, _ = probs.shape
    height, width = image_size
    if n == 0:
        return []
    probs = np.asarray(probs, dtype=np.float64)  # float64: bit-identical to the per-pixel formula
    # Bilinear weights are convex, so a pixel can pass the threshold only where one of the cells
    # it blends does (up to rounding, hence the margin): only those rows/columns are resampled,
    # and masks are sparse in their windows.
    on = probs > threshold - 1e-9  # (W, m, m)
    ay = _AxisSamples(cells[:, 0].astype(np.int64), factor[0], m, stride, height)
    ax = _AxisSamples(cells[:, 1].astype(np.int64), factor[1], m, stride, width)
    ys_live, xs_live = ay.support(on.any(axis=2)), ax.support(on.any(axis=1))  # (W, Sy), (W, Sx)
    y_first, y_end = _first_and_end(ys_live)  # (W,) live pixel range [first, end) per window
    x_first, x_end = _first_and_end(xs_live)
    out: list[tuple[int, int, np.ndarray]] = []
    for w in range(n):
        a, b, c, d = y_first[w], y_end[w], x_first[w], x_end[w]
        if a >= b or c >= d:
            out.append(_EMPTY_CROP)
            continue
        tx, ty = ax.t[w, c:d], ay.t[w, a:b, None]
        p = probs[w]
        q = p[:, ax.i0[w, c:d]] * (1.0 - tx) + p[:, ax.i1[w, c:d]] * tx  # (m, wx): along x first
        v = q[ay.i0[w, a:b]] * (1.0 - ty) + q[ay.i1[w, a:b]] * ty  # (hy, wx)
        binary = v > threshold
        rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
        if rows.size == 0:
            out.append(_EMPTY_CROP)
            continue
        top, left = int(ay.start[w] + a + rows[0]), int(ax.start[w] + c + cols[0])
        out.append((top, left, binary[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    return out


def _first_and_end(live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """live: (W, S) bool -> per row the first True index and one past the last (0, 0 when none)."""
    any_ = live.any(axis=1)
    first = np.argmax(live, axis=1)
    end = live.shape[1] - np.argmax(live[:, ::-1], axis=1)
    return np.where(any_, first, 0), np.where(any_, end, 0)


def crop_bbox(top: int, left: int, crop: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight COCO box (x, y, w, h) of a pasted crop, or None when it is empty."""
    rows = np.flatnonzero(crop.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(crop.any(axis=0))
    return (float(left + cols[0]), float(top + rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def crop_to_rle(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> dict:
    """COCO compressed RLE of a full-image mask that is zero outside `crop`, without building it."""
    return encode_counts(crop_runs(top, left, crop, image_size), image_size)


def crop_runs(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """COCO uncompressed run lengths (uint32, column-major, background first) of a full-image
    mask that is zero outside `crop`.

    Touches only the crop's pixels: O(h * w) rather than O(H * W). Runs are read off the crop's
    columns (column-major, as COCO counts), each followed by one zero that stands for the
    H - h background pixels between the crop's end in one column and its start in the next.
    """
    height, width = image_size
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return np.array([height * width], dtype=np.uint32)
    sep = 1 if h < height else 0  # a full-height crop's columns follow each other directly
    strip = np.zeros((w, h + sep), dtype=np.int8)  # (w, h [+1]) column-major crop + separators
    strip[:, :h] = crop.T
    flat = strip.reshape(-1)
    change = np.flatnonzero(np.diff(flat, prepend=0))  # runs start here (the image starts with background)
    if flat[-1]:  # only without separators: the run after the crop starts past its last pixel
        change = np.append(change, flat.size)
    col, row = np.divmod(change, h + sep)
    pos = (left + col) * height + top + row  # full-image column-major position
    bounds = np.concatenate(([0], pos[pos < height * width], [height * width]))
    return np.diff(bounds).astype(np.uint32)


def encode_counts(runs: list[int] | np.ndarray, image_size: tuple[int, int]) -> dict:
    """Uncompressed column-major run lengths -> COCO compressed RLE with str counts.

    A uint32 array goes to pycocotools without a Python-list round trip."""
    height, width = image_size
    rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rle


# A mask as NMS sees it: a COCO RLE, or a pasted crop (top, left, bool (h, w)) inside the image.
Mask = Union[dict, tuple[int, int, np.ndarray]]


def _crop_intersection(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> int:
    """Pixels two pasted crops share, read off the overlap of their boxes only."""
    (ta, la, ca), (tb, lb, cb) = a, b
    y0, y1 = max(ta, tb), min(ta + ca.shape[0], tb + cb.shape[0])
    x0, x1 = max(la, lb), min(la + ca.shape[1], lb + cb.shape[1])
    if y1 <= y0 or x1 <= x0:
        return 0
    return int(np.count_nonzero(ca[y0 - ta:y1 - ta, x0 - la:x1 - la] & cb[y0 - tb:y1 - tb, x0 - lb:x1 - lb]))


class GreedyMaskNMS:
    """Greedy NMS fed one mask at a time in score order, so callers can stop producing masks
    once `max_keep` are kept. A mask is kept unless its IoU with a kept one exceeds the threshold.

    mode "box" (the paper's): IoU of the masks' tight boxes. mode "mask": IoU of the masks; pairs
    whose IoU cannot exceed the threshold (judged from boxes and areas alone) skip the exact
    IoU, which comes from pycocotools for RLEs and from the overlapping pixels for crops (same
    value: intersection / union in float64).
    """

    def __init__(self, iou_threshold: float, max_keep: int, mode: str = "mask") -> None:
        if mode not in NMS_MODES:
            raise ValueError(f"NMS mode {mode!r}: choose one of {NMS_MODES}")
        self.iou_threshold, self.max_keep, self.mode = iou_threshold, max_keep, mode
        self.kept: list[Mask] = []
        self._boxes = np.zeros((16, 4), dtype=np.float64)  # x0, y0, x1, y1 of kept masks; grows by doubling
        self._areas = np.zeros(len(self._boxes), dtype=np.float64)

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.max_keep

    def offer(self, mask: Mask, box: Sequence[float], area: int) -> bool:
        """mask: RLE or (top, left, crop), all offered masks of one kind; box: (x, y, w, h) tight box;
        area: its pixel count. Returns whether the mask is kept (appended to `kept`)."""
        if self.full:
            return False
        n = len(self.kept)
        x0, y0, bw, bh = (float(v) for v in box)
        x1, y1 = x0 + bw, y0 + bh
        if n:
            kb = self._boxes[:n]
            iw = np.clip(np.minimum(x1, kb[:, 2]) - np.maximum(x0, kb[:, 0]), 0, None)
            ih = np.clip(np.minimum(y1, kb[:, 3]) - np.maximum(y0, kb[:, 1]), 0, None)
            if self.mode == "box":
                kept_box_areas = (kb[:, 2] - kb[:, 0]) * (kb[:, 3] - kb[:, 1])
                inter = iw * ih
                if np.any(inter / np.maximum(kept_box_areas + bw * bh - inter, 1) > self.iou_threshold):
                    return False
            else:
                # IoU = I / (a + b - I) grows with the intersection I, which is at most the boxes'
                # overlap and either area: that I gives an upper bound on the IoU
                kept_areas = self._areas[:n]
                inter = np.minimum(iw * ih, np.minimum(kept_areas, area))
                bound = inter / np.maximum(kept_areas + area - inter, 1)
                near = np.flatnonzero(bound > self.iou_threshold)
                if near.size and self._overlaps(mask, area, near):
                    return False
        if n == len(self._boxes):
            self._boxes = np.concatenate([self._boxes, np.zeros_like(self._boxes)])
            self._areas = np.concatenate([self._areas, np.zeros_like(self._areas)])
        self._boxes[n] = (x0, y0, x1, y1)
        self._areas[n] = area
        self.kept.append(mask)
        return True

    def _overlaps(self, mask: Mask, area: int, near: np.ndarray) -> bool:
        """Whether `mask` has IoU above the threshold with any kept mask in `near` (best boxes first)."""
        if isinstance(mask, dict):
            ious = mask_utils.iou([self.kept[i] for i in near], [mask], [0])
            return bool(np.any(np.asarray(ious) > self.iou_threshold))
        for i in near:
            inter = _crop_intersection(self.kept[i], mask)
            if inter / (self._areas[i] + area - inter) > self.iou_threshold:
                return True
        return False


def mask_nms(rles: Sequence[dict], scores: np.ndarray, boxes: np.ndarray, areas: np.ndarray, iou_threshold: float,
             max_keep: int, mode: str = "mask") -> np.ndarray:
    """Greedy NMS: in score order, keep a mask unless its IoU (of masks, or of boxes with
    mode="box") with a kept one exceeds the threshold.

    rles: N COCO RLEs; boxes: (N, 4) xywh tight boxes, areas: (N,) mask areas. Returns kept
    indices, best first (ties broken by index).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    nms = GreedyMaskNMS(iou_threshold, max_keep, mode)
    kept: list[int] = []
    for idx in order:
        if nms.full:
            break
        if nms.offer(rles[idx], boxes[idx], int(areas[idx])):
            kept.append(int(idx))
    return np.asarray(kept, dtype=np.int64)
