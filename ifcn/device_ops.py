"""The per-pixel half of inference as batched torch ops: paste, binarise, tight boxes, NMS, run lengths.

They run wherever their tensors live: on the GPU inside the inference actor (so the pinned GPU
never waits on CPU postprocessing), and on CPU in CI, where tests/test_device_ops.py compares
them against the numpy reference in ifcn/ops.py. The maths is the reference's, term for term:

    pixel p of an axis sits at window cell u = clip(((p + 0.5) * factor - stride * c0) / stride - 0.5, 0, m-1)
    and blends cells floor(u) and floor(u) + 1 with weight t = u - floor(u); pixels whose centre
    falls outside the window's span [stride * c0, stride * (c0 + m)) or outside the image are 0.
    A window's pasted value is that blend along x first, then along y; > threshold is the mask.

Geometry (positions, weights) is always float64: it is tiny, and keeps CUDA's masks on the
same pixels as the CPU's. Blending runs in `dtype` (float32 by default; float64 reproduces
the numpy reference bit for bit).

Nothing here pastes a window that NMS may drop: a window's tight box follows from its m x m grid
(`tight_boxes`), box NMS needs only boxes, and only kept windows are pasted for their area and
run lengths. Mask NMS pastes windows a round at a time in score order, as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .containers import Windows

# Elements (windows x pixels) one pasting call may materialise: bounds peak memory (~4 bytes
# each in float32, a few temporaries) whatever the image size, e.g. a 4000 x 3000 photo.
PASTE_BUDGET = 1 << 25


@dataclass
class AxisSamples:
    """Bilinear sampling of one axis at given pixels, per window. All (N, n); `valid` marks
    pixels inside both the window's span and the image."""

    i0: torch.Tensor  # long, first blended cell
    i1: torch.Tensor  # long, second blended cell (= i0 at the last cell)
    t: torch.Tensor  # float64 weight of i1
    valid: torch.Tensor  # bool


def axis_samples(cell0: torch.Tensor, factor: torch.Tensor, pixels: torch.Tensor, m: int, stride: int,
                 size: int) -> AxisSamples:
    """cell0: (N,) long window start cell; factor: (N,) float64 resized/original; pixels: (N, n) long."""
    r = (pixels.double() + 0.5) * factor[:, None] - (cell0 * stride).double()[:, None]  # resized px from the start
    valid = (r >= 0) & (r < m * stride) & (pixels >= 0) & (pixels < size)
    u = (r / stride - 0.5).clamp(0.0, m - 1.0)
    i0 = u.floor()
    t = u - i0
    i0 = i0.long()
    return AxisSamples(i0, (i0 + 1).clamp(max=m - 1), t, valid)


def blend(probs: torch.Tensor, ys: AxisSamples, xs: AxisSamples, dtype: torch.dtype) -> torch.Tensor:
    """probs: (N, m, m) -> (N, ny, nx) pasted values at the sampled pixels (0 where not valid).

    Along x first, then y, as ops.paste_masks does, so float64 reproduces it exactly."""
    p = probs.to(dtype)
    n, m, _ = p.shape
    tx, ty = xs.t.to(dtype)[:, None, :], ys.t.to(dtype)[:, :, None]  # (N, 1, nx), (N, ny, 1)
    nx, ny = xs.i0.shape[1], ys.i0.shape[1]
    q = (p.gather(2, xs.i0[:, None, :].expand(n, m, nx)) * (1.0 - tx)
         + p.gather(2, xs.i1[:, None, :].expand(n, m, nx)) * tx)  # (N, m, nx)
    v = (q.gather(1, ys.i0[:, :, None].expand(n, ny, nx)) * (1.0 - ty)
         + q.gather(1, ys.i1[:, :, None].expand(n, ny, nx)) * ty)  # (N, ny, nx)
    return v * (ys.valid[:, :, None] & xs.valid[:, None, :])


def paste_in_boxes(w: Windows, boxes: torch.Tensor, image_size: tuple[int, int], m: int, stride: int,
                   threshold: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, hmax, wmax) bool: each window's binarised pasted mask over its box (x0, y0, x1, y1);
    pixels past a box's own size are False. One call: callers bound n * hmax * wmax."""
    height, width = image_size
    n = len(w)
    hmax = int((boxes[:, 3] - boxes[:, 1]).max()) if n else 0
    wmax = int((boxes[:, 2] - boxes[:, 0]).max()) if n else 0
    ar_y, ar_x = torch.arange(hmax, device=boxes.device), torch.arange(wmax, device=boxes.device)
    ys = axis_samples(w.cells[:, 0], w.factor[:, 0], boxes[:, 1:2] + ar_y, m, stride, height)
    xs = axis_samples(w.cells[:, 1], w.factor[:, 1], boxes[:, 0:1] + ar_x, m, stride, width)
    ys.valid &= boxes[:, 1:2] + ar_y < boxes[:, 3:4]
    xs.valid &= boxes[:, 0:1] + ar_x < boxes[:, 2:3]
    return blend(w.probs, ys, xs, dtype) > threshold


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


def box_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, 4), (k, 4) boxes (x0, y0, x1, y1) -> (n, k) float64 area of their intersection."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    return iw * ih


def crop_runs(crops: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO uncompressed run lengths of full-image masks that are zero outside their crops.

    crops: (n, hmax, wmax) bool, crop i placed at boxes[i] (x0, y0, ...), False past its size.
    Returns (counts (R,) long, lengths (n,) long): mask i's column-major runs, starting with
    background, are counts[sum(lengths[:i]):sum(lengths[:i+1])]. One host sync (the count).
    """
    height, width = image_size
    n, hmax, wmax = crops.shape
    dev = crops.device
    strip = torch.zeros((n, wmax, hmax + 1), dtype=torch.int8, device=dev)  # column-major + a zero separator row
    strip[:, :, :hmax] = crops.transpose(1, 2)
    flat = strip.reshape(n, -1)
    change = flat != torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], 1)  # a run starts here
    win, idx = torch.nonzero(change, as_tuple=True)  # by window, then position: sorted
    col, row = idx // (hmax + 1), idx % (hmax + 1)
    pos = (boxes[win, 0] + col) * height + boxes[win, 1] + row  # full-image column-major position
    # A run ending at a column's last pixel and one starting at the next column's first pixel meet
    # at one position (full-height crops): no change there. And the image end is no run start.
    same = (pos[1:] == pos[:-1]) & (win[1:] == win[:-1])
    drop = torch.zeros_like(pos, dtype=torch.bool)
    drop[1:] |= same
    drop[:-1] |= same
    drop |= pos >= height * width
    win, pos = win[~drop], pos[~drop]
    changes = torch.bincount(win, minlength=n)  # (n,)
    lengths = changes + 1
    first = torch.ones_like(win, dtype=torch.bool)
    first[1:] = win[1:] != win[:-1]
    prev = torch.cat([torch.zeros_like(pos[:1]), pos[:-1]])
    runs = pos - torch.where(first, torch.zeros_like(prev), prev)
    ends = torch.cumsum(lengths, 0)  # one past each mask's last count
    counts = torch.empty(int(ends[-1]) if n else 0, dtype=torch.long, device=dev)
    starts = ends - lengths
    rank = torch.arange(len(win), device=dev) - (torch.cumsum(changes, 0) - changes)[win]  # j-th change of its mask
    counts[starts[win] + rank] = runs
    last_pos = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, win, pos, "amax", include_self=False)
    counts[ends - 1] = height * width - torch.where(changes > 0, last_pos, torch.zeros_like(last_pos))
    return counts, lengths
