"""Mask NMS's crop store (torch): binarised pasted crops kept flat so NMS and run lengths read them
again without pasting again, and the size groups that bound each padded read.
"""
from __future__ import annotations

import torch

# Elements (windows x pixels) one pasting call may materialise: bounds peak memory (~4 bytes
# each in float32, a few temporaries) whatever the image size, e.g. a 4000 x 3000 photo.
PASTE_BUDGET = 1 << 25


class CropStore:
    """Binarised pasted masks, each its tight-box crop in row-major order in one flat bool buffer,
    so NMS and run lengths read masks again without pasting them again.

    Offsets are int64 (a 48 MP image's crops pass 2**31 pixels); the buffer grows by doubling, so
    adding a block copies the store only when it fills (amortised O(1) per pixel), never per read."""

    def __init__(self, n: int, device: torch.device, capacity: int = 1 << 20) -> None:
        self.start = torch.full((n,), -1, dtype=torch.long, device=device)  # (n,) offset of window i's crop
        self._flat = torch.zeros(capacity, dtype=torch.bool, device=device)
        self._size = 0

    def add(self, idx: torch.Tensor, crops: torch.Tensor, boxes: torch.Tensor) -> None:
        """crops: (k, hmax, wmax) of windows idx (k,) over their tight boxes (k, 4), False past each size."""
        h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
        ar_y = torch.arange(crops.shape[1], device=crops.device)
        ar_x = torch.arange(crops.shape[2], device=crops.device)
        inside = (ar_y < h[:, None])[:, :, None] & (ar_x < w[:, None])[:, None, :]  # (k, hmax, wmax)
        sizes = h * w
        self.start[idx] = self._size + torch.cumsum(sizes, 0) - sizes
        part = crops[inside]  # row-major per window, windows in order (a host sync: its length)
        end = self._size + len(part)
        if end > len(self._flat):
            grown = torch.zeros(max(end, 2 * len(self._flat)), dtype=torch.bool, device=self._flat.device)
            grown[:self._size] = self._flat[:self._size]
            self._flat = grown
        self._flat[self._size:end] = part
        self._size = end

    def read(self, idx: torch.Tensor, boxes: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(k, hmax, wmax) bool: windows idx's masks (tight boxes `boxes`) over `region` (x0, y0, x1, y1),
        which lies inside each window's box; False past a region's size."""
        k = len(idx)
        rh, rw = region[:, 3] - region[:, 1], region[:, 2] - region[:, 0]
        hmax = int(rh.max()) if k else 0
        wmax = int(rw.max()) if k else 0
        dev_ = region.device
        rows = torch.arange(hmax, device=dev_)
        cols = torch.arange(wmax, device=dev_)
        # offset of region pixel (r, c) in the window's row-major crop: start + (dy + r) * width + dx + c
        width = boxes[:, 2] - boxes[:, 0]
        base = self.start[idx] + (region[:, 1] - boxes[:, 1]) * width + region[:, 0] - boxes[:, 0]  # (k,) int64
        pos = (base[:, None] + rows[None, :] * width[:, None])[:, :, None] + cols[None, None, :]  # (k, hmax, wmax)
        valid = (rows[None, :] < rh[:, None])[:, :, None] & (cols[None, :] < rw[:, None])[:, None, :]
        pos.clamp_(0, max(0, self._size - 1))  # past a region's size: any pixel, masked below
        return self._flat[pos] & valid


def size_groups(boxes: torch.Tensor) -> list[torch.Tensor]:
    """Indices of `boxes` (x0, y0, x1, y1) in groups of similar size whose padded pasting stays within
    PASTE_BUDGET: sorted by area, so a group pads little. Every index appears once (one host sync)."""
    hw = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    order = torch.argsort(hw[:, 0] * hw[:, 1], descending=True, stable=True)
    sizes = hw[order].cpu().tolist()
    out, lo = [], 0
    while lo < len(sizes):
        hi, wmax, hmax = lo, 0, 0
        while hi < len(sizes):
            nw, nh = max(wmax, sizes[hi][0]), max(hmax, sizes[hi][1])
            if hi > lo and (hi + 1 - lo) * nh * nw > PASTE_BUDGET:
                break
            wmax, hmax, hi = nw, nh, hi + 1
        out.append(order[lo:hi])
        lo = hi
    return out


def ragged_place(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reassembles per-item variable-length values computed in groups.

    parts: (idx (k,), values (R,), lengths (k,)) per group: item idx[i]'s values are the i-th
    lengths[i] of `values`. Returns (values, lengths) of items 0..n-1, back to back, in item order."""
    device = parts[0][0].device
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    for idx, _, ln in parts:
        lengths[idx] = ln
    starts = torch.cumsum(lengths, 0) - lengths
    out = torch.empty(int(lengths.sum()), dtype=parts[0][1].dtype, device=device)
    for idx, values, ln in parts:
        first = torch.cumsum(ln, 0) - ln  # (k,) each item's offset within `values`
        rank = torch.arange(len(values), device=device) - first.repeat_interleave(ln)
        out[starts[idx].repeat_interleave(ln) + rank] = values
    return out, lengths




