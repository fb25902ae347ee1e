"""Pure tensor/array ops: assembling, pasting, RLE, boxes, mask NMS.

No model state here: each function is tested against a slow reference in tests/test_ops.py.
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

# Logit for window cells that fall outside the feature map: sigmoid(-1e4) == 0 (background),
# and still finite in bf16/fp16.
BACKGROUND_LOGIT = -1.0e4


def cell_to_map(m: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(m, m) long: score-map number i*k + j that window cell (r, c) reads, i = r*k // m, j = c*k // m."""
    part = torch.arange(m, device=device) * k // m  # (m,)
    return part[:, None] * k + part[None, :]


def assemble(scores: torch.Tensor, windows: torch.Tensor, m: int) -> torch.Tensor:
    """Instance-sensitive assembling: copies each of a window's k x k cells from its own map.

    scores: (N, k*k, H, W) logits; windows: (W, 3) long (image index, y0, x0), the window's
    top-left feature cell (may be negative or run past the map). Returns (W, m, m) logits;
    cells outside the map read BACKGROUND_LOGIT.
    """
    if scores.ndim != 4:
        raise ValueError(f"assemble: scores must be (N, k*k, H, W), got {tuple(scores.shape)}")
    kk, height, width = scores.shape[1:]
    k = int(round(kk**0.5))
    if k * k != kk:
        raise ValueError(f"assemble: channel count {kk} is not a square k*k")
    windows = windows.to(device=scores.device, dtype=torch.long).reshape(-1, 3)
    if windows.shape[0] == 0:
        return scores.new_zeros((0, m, m))
    offs = torch.arange(m, device=scores.device)
    ys = windows[:, 1:2] + offs  # (W, m)
    xs = windows[:, 2:3] + offs  # (W, m)
    b = windows[:, 0][:, None, None]  # (W, 1, 1)
    ch = cell_to_map(m, k, scores.device)[None]  # (1, m, m)
    out = scores[b, ch, ys.clamp(0, height - 1)[:, :, None], xs.clamp(0, width - 1)[:, None, :]]  # (W, m, m)
    inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]  # (W, m, m)
    return torch.where(inside, out, torch.full_like(out, BACKGROUND_LOGIT))


def _interp_matrix(start_px: np.ndarray, count: int, first_cell_px: np.ndarray, factor: float, m: int,
                   stride: int) -> np.ndarray:
    """(W, count, m) bilinear weights that resample an m-cell window row onto image pixels.

    Output pixel p = start_px + t (centre p + 0.5) sits at resized coordinate (p + 0.5) * factor,
    i.e. at window cell u = ((p + 0.5) * factor - first_cell_px) / stride - 0.5, clamped to [0, m-1].
    Pixels outside the window's span [first_cell_px, first_cell_px + m*stride) get zero weight.
    """
    p = start_px[:, None] + np.arange(count)[None, :]  # (W, count)
    r = (p + 0.5) * factor - first_cell_px[:, None]  # resized px from window start
    inside = (r >= 0) & (r < m * stride)
    u = np.clip(r / stride - 0.5, 0.0, m - 1.0)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, m - 1)
    w1 = (u - i0) * inside
    w0 = (1.0 - (u - i0)) * inside
    mat = np.zeros((*p.shape, m), dtype=np.float32)
    np.put_along_axis(mat, i0[..., None], w0[..., None].astype(np.float32), axis=-1)
    np.add.at(mat, (*np.indices(p.shape), i1), w1.astype(np.float32))
    return mat


def window_pixel_span(cell0: np.ndarray, factor: float, m: int, stride: int) -> tuple[np.ndarray, int]:
    """First image pixel a window covers along one axis, and a span length that fits every window.

    A window starting at feature cell c0 covers resized pixels [c0*stride, (c0+m)*stride), i.e.
    image pixels p with c0*stride <= (p + 0.5) * factor < (c0+m)*stride.
    """
    start = np.ceil(cell0 * stride / factor - 0.5).astype(np.int64)
    count = int(np.ceil(m * stride / factor)) + 1
    return start, count


def paste_masks(probs: np.ndarray, cells: np.ndarray, factor: tuple[float, float], image_size: tuple[int, int],
                stride: int = 8, threshold: float = 0.5) -> list[tuple[int, int, np.ndarray]]:
    """Pastes m x m window probabilities back into image pixels and binarises them.

    probs: (W, m, m) in [0, 1]; cells: (W, 2) window top-left feature cells (y0, x0) at a scale
    whose resized/original factor is (fy, fx); image_size: (H, W) of the original image.
    Returns per window (top, left, crop): crop is a bool (h, w) array inside the image.
    """
    n, m, _ = probs.shape
    height, width = image_size
    if n == 0:
        return []
    y_start, y_count = window_pixel_span(cells[:, 0], factor[0], m, stride)
    x_start, x_count = window_pixel_span(cells[:, 1], factor[1], m, stride)
    ry = _interp_matrix(y_start, y_count, cells[:, 0] * stride, factor[0], m, stride)  # (W, Sy, m)
    rx = _interp_matrix(x_start, x_count, cells[:, 1] * stride, factor[1], m, stride)  # (W, Sx, m)
    out: list[tuple[int, int, np.ndarray]] = []
    chunk = max(1, int(8e6 // max(1, y_count * x_count)))  # bounds the float buffer to ~32 MB
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        full = torch.from_numpy(ry[s:e]) @ torch.from_numpy(probs[s:e].astype(np.float32)) @ torch.from_numpy(
            rx[s:e]).transpose(1, 2)  # (w, Sy, Sx)
        binary = (full > threshold).numpy()
        for i in range(e - s):
            top, left = int(y_start[s + i]), int(x_start[s + i])
            y0, y1 = max(0, top), min(height, top + y_count)
            x0, x1 = max(0, left), min(width, left + x_count)
            if y1 <= y0 or x1 <= x0:
                out.append((0, 0, np.zeros((0, 0), dtype=bool)))
                continue
            out.append((y0, x0, binary[i, y0 - top:y1 - top, x0 - left:x1 - left]))
    return out


def crop_bbox(top: int, left: int, crop: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight COCO box (x, y, w, h) of a pasted crop, or None when it is empty."""
    rows = np.flatnonzero(crop.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(crop.any(axis=0))
    return (float(left + cols[0]), float(top + rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def crop_to_rle(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> dict:
    """COCO compressed RLE of a full-image mask that is zero outside `crop`, without building it.

    Touches only the crop's columns: O(H * w) rather than O(H * W).
    """
    height, width = image_size
    h, w = crop.shape
    if h == 0 or w == 0:
        return _encode_counts([height * width], image_size)
    cols = np.zeros((w, height), dtype=np.uint8)  # column-major strip of the crop's columns
    cols[:, top:top + h] = crop.T
    flat = cols.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1  # positions where the value flips
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:  # COCO RLE starts with a run of zeros
        runs.insert(0, 0)
    runs[0] += left * height  # zeros in the columns before the crop
    tail = (width - left - w) * height  # zeros in the columns after it
    if flat[-1]:
        if tail:
            runs.append(tail)
    else:
        runs[-1] += tail
    return _encode_counts(runs, image_size)


def _encode_counts(runs: list[int], image_size: tuple[int, int]) -> dict:
    """Uncompressed column-major run lengths -> COCO compressed RLE with str counts."""
    height, width = image_size
    rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rle


def mask_nms(rles: list[dict], scores: np.ndarray, boxes: np.ndarray, areas: np.ndarray, iou_threshold: float,
             max_keep: int) -> np.ndarray:
    """Greedy mask NMS: in score order, keep a mask unless its IoU with a kept one exceeds the threshold.

    boxes: (N, 4) xywh tight boxes, areas: (N,) mask areas. Pairs whose IoU cannot exceed the
    threshold (box intersection / larger area <= threshold) skip the exact RLE IoU. Returns kept
    indices, best first (ties broken by index).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    kept: list[int] = []
    kept_arr = np.zeros(0, dtype=np.int64)
    for idx in order:
        if kept:
            iw = np.minimum(x1[idx], x1[kept_arr]) - np.maximum(x0[idx], x0[kept_arr])
            ih = np.minimum(y1[idx], y1[kept_arr]) - np.maximum(y0[idx], y0[kept_arr])
            inter_bound = np.clip(iw, 0, None) * np.clip(ih, 0, None)
            bound = inter_bound / np.maximum(areas[idx], areas[kept_arr])
            near = kept_arr[bound > iou_threshold]
            if near.size:
                ious = mask_utils.iou([rles[i] for i in near], [rles[idx]], [0])
                if np.any(np.asarray(ious) > iou_threshold):
                    continue
        kept.append(int(idx))
        kept_arr = np.asarray(kept, dtype=np.int64)
        if len(kept) >= max_keep:
            break
    return kept_arr
