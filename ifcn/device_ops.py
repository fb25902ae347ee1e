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

import math
from dataclasses import dataclass

import torch

# Elements (windows x pixels) one pasting call may materialise: bounds peak memory (~4 bytes
# each in float32, a few temporaries) whatever the image size, e.g. a 4000 x 3000 photo.
PASTE_BUDGET = 1 << 25
# Fixed-point NMS sweeps between convergence checks (each check is a host sync).
_SWEEPS_PER_CHECK = 4


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


def span(cell0: torch.Tensor, factor: torch.Tensor, m: int, stride: int) -> torch.Tensor:
    """(N,) first image pixel of each window's span along one axis (as ops.window_pixel_span);
    `span_count` pixels from there cover it."""
    return torch.ceil((cell0 * stride).double() / factor - 0.5).long()


def span_count(min_factor: float, m: int, stride: int) -> int:
    """Pixels that cover a window's span along an axis whose resized/original factor is >= min_factor."""
    return int(math.ceil(m * stride / min_factor)) + 1


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


@dataclass
class Windows:
    """Candidate windows of one image, on one device.

    scores: (C,) objectness probability; cells: (C, 2) long top-left feature cell (y0, x0);
    probs: (C, m, m) assembled probabilities; factor: (C, 2) float64 resized/original (fy, fx);
    scale: (C,) long short side of the window's scale.
    """

    scores: torch.Tensor
    cells: torch.Tensor
    probs: torch.Tensor
    factor: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, idx: torch.Tensor) -> "Windows":
        return Windows(self.scores[idx], self.cells[idx], self.probs[idx], self.factor[idx], self.scale[idx])

    @staticmethod
    def cat(parts: list["Windows"]) -> "Windows":
        return Windows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("scores", "cells", "probs", "factor", "scale")))


def _chunks(n: int, per_item: int) -> list[slice]:
    """Slices of n items, each within PASTE_BUDGET elements at `per_item` elements per item."""
    step = max(1, PASTE_BUDGET // max(1, per_item))
    return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _probe_pixels(cell0: torch.Tensor, factor: torch.Tensor, m: int, stride: int, size: int, count: int) -> torch.Tensor:
    """(N, 2m + 2) long pixels that decide a row's (or column's) maximum over this axis, -1 = none.

    Within the pixels that blend the same cell pair (same floor(u)), the pasted value of any
    fixed row is affine in t, and t grows with the pixel: its maximum sits at the first or last
    such pixel. So a row holds a mask pixel iff one of these <= 2m probes does."""
    pix = span(cell0, factor, m, stride)[:, None] + torch.arange(count, device=cell0.device)  # (N, S)
    s = axis_samples(cell0, factor, pix, m, stride, size)
    key = torch.where(s.valid, s.i0, torch.full_like(s.i0, -1))
    edge = torch.ones_like(key[:, :1], dtype=torch.bool)
    first = s.valid & torch.cat([edge, key[:, 1:] != key[:, :-1]], 1)
    last = s.valid & torch.cat([key[:, :-1] != key[:, 1:], edge], 1)
    probe = first | last
    # Probes first (stable keeps pixel order), padded with -1 beyond each row's probes.
    order = torch.argsort((~probe).to(torch.int8), dim=1, stable=True)[:, :2 * m + 2]
    return torch.where(probe.gather(1, order), pix.gather(1, order), torch.full_like(order, -1))


def tight_boxes(w: Windows, image_size: tuple[int, int], m: int, stride: int, threshold: float,
                min_factor: tuple[float, float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, 4) long tight boxes (x0, y0, x1, y1), ends exclusive, of the windows' binarised pasted
    masks, without pasting them; (0, 0, 0, 0) for an empty mask.

    min_factor: (fy, fx) lower bounds of the windows' factors (host floats, so no sync); windows of
    one scale give the tightest padding."""
    height, width = image_size
    out = torch.zeros((len(w), 4), dtype=torch.long, device=w.scores.device)
    ny, nx = (span_count(f, m, stride) for f in min_factor)
    (cy, cx), (fy, fx) = w.cells.unbind(1), w.factor.unbind(1)
    ar_y, ar_x = torch.arange(ny, device=out.device), torch.arange(nx, device=out.device)
    for sl in _chunks(len(w), (2 * m + 2) * (ny + nx) + ny + nx):
        probs = w.probs[sl]
        ypix = span(cy[sl], fy[sl], m, stride)[:, None] + ar_y  # (n, Sy)
        xpix = span(cx[sl], fx[sl], m, stride)[:, None] + ar_x  # (n, Sx)
        ys = axis_samples(cy[sl], fy[sl], ypix, m, stride, height)
        xs = axis_samples(cx[sl], fx[sl], xpix, m, stride, width)
        yprobe = axis_samples(cy[sl], fy[sl], _probe_pixels(cy[sl], fy[sl], m, stride, height, ny), m, stride, height)
        xprobe = axis_samples(cx[sl], fx[sl], _probe_pixels(cx[sl], fx[sl], m, stride, width, nx), m, stride, width)
        rows = (blend(probs, ys, xprobe, dtype) > threshold).any(2)  # (n, Sy)
        cols = (blend(probs, yprobe, xs, dtype) > threshold).any(1)  # (n, Sx)
        y0, y1 = _first_last(rows, ypix)
        x0, x1 = _first_last(cols, xpix)
        out[sl] = torch.stack([x0, y0, x1, y1], 1)
    return out


def _first_last(on: torch.Tensor, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """on: (n, S) bool over pixels pix (n, S) -> first pixel and last pixel + 1 (0, 0 when none)."""
    any_ = on.any(1)
    first = pix.gather(1, on.to(torch.int8).argmax(1, keepdim=True))[:, 0]
    last = pix.gather(1, (on.shape[1] - 1 - on.flip(1).to(torch.int8).argmax(1)).unsqueeze(1))[:, 0] + 1
    zero = torch.zeros_like(first)
    return torch.where(any_, first, zero), torch.where(any_, last, zero)


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
    so NMS and run lengths read masks again without pasting them again."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.start = torch.full((n,), -1, dtype=torch.long, device=device)  # (n,) offset of window i's crop
        self._parts: list[torch.Tensor] = []
        self._size = 0
        self._flat: torch.Tensor | None = None

    def add(self, idx: torch.Tensor, crops: torch.Tensor, boxes: torch.Tensor) -> None:
        """crops: (k, hmax, wmax) of windows idx (k,) over their tight boxes (k, 4), False past each size."""
        h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
        ar_y = torch.arange(crops.shape[1], device=crops.device)
        ar_x = torch.arange(crops.shape[2], device=crops.device)
        inside = (ar_y < h[:, None])[:, :, None] & (ar_x < w[:, None])[:, None, :]  # (k, hmax, wmax)
        sizes = h * w
        self.start[idx] = self._size + torch.cumsum(sizes, 0) - sizes
        part = crops[inside]  # row-major per window, windows in order (a host sync: its length)
        self._parts.append(part)
        self._size += len(part)
        self._flat = None

    def read(self, idx: torch.Tensor, boxes: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(k, hmax, wmax) bool: windows idx's masks (tight boxes `boxes`) over `region` (x0, y0, x1, y1),
        which lies inside each window's box; False past a region's size."""
        if self._flat is None:
            self._flat = torch.cat(self._parts) if self._parts else torch.zeros(0, dtype=torch.bool,
                                                                                device=self.start.device)
        k = len(idx)
        hmax = int((region[:, 3] - region[:, 1]).max()) if k else 0
        wmax = int((region[:, 2] - region[:, 0]).max()) if k else 0
        dev_ = region.device
        rows = torch.arange(hmax, device=dev_, dtype=torch.int32)
        cols = torch.arange(wmax, device=dev_, dtype=torch.int32)
        rh, rw = (region[:, 3] - region[:, 1]).int(), (region[:, 2] - region[:, 0]).int()
        # offset of region pixel (r, c) in the window's row-major crop: start + (dy + r) * width + dx + c
        width = boxes[:, 2] - boxes[:, 0]
        base = (self.start[idx] + (region[:, 1] - boxes[:, 1]) * width + region[:, 0] - boxes[:, 0]).int()  # (k,)
        row_off = base[:, None] + rows[None, :] * width.int()[:, None]  # (k, hmax)
        pos = row_off[:, :, None] + cols[None, None, :]  # (k, hmax, wmax) int32
        valid = (rows[None, :] < rh[:, None])[:, :, None] & (cols[None, :] < rw[:, None])[:, None, :]
        pos.clamp_(0, max(0, len(self._flat) - 1))  # past a region's size: any pixel, masked below
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


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, 4), (k, 4) boxes (x0, y0, x1, y1) -> (n, k) float64 IoU (0 for two empty boxes)."""
    inter = box_overlap(a, b)
    a, b = a.double(), b.double()
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1.0)


def greedy_keep(suppress: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Greedy NMS from a suppression matrix, without a sequential loop over items.

    suppress: (n, n) bool, [i, j] = item j (earlier in score order, j < i) would suppress i;
    alive: (n,) bool items that take part. Returns (n,) bool kept: i is kept iff alive and no
    kept j < i suppresses it. Computed as the fixed point of that rule, reached after as many
    sweeps as the longest chain of suppressions (each sweep one batched matrix-vector step).
    """
    suppress = torch.tril(suppress, diagonal=-1) & alive[None, :]
    kept = alive.clone()
    while True:
        for _ in range(_SWEEPS_PER_CHECK):
            prev, kept = kept, alive & ~(suppress & kept[None, :]).any(1)
        if torch.equal(prev, kept):  # a host sync on CUDA: once per few sweeps
            return kept


def box_nms(boxes: torch.Tensor, alive: torch.Tensor, iou_threshold: float, max_keep: int) -> torch.Tensor:
    """Greedy NMS on tight boxes in the given (score) order. boxes: (n, 4); alive: (n,) bool.
    Returns kept indices (long), at most max_keep, in order."""
    n = boxes.shape[0]
    suppress = torch.zeros((n, n), dtype=torch.bool, device=boxes.device)
    rows = max(1, PASTE_BUDGET // max(1, 8 * n))  # float64 IoU rows per block
    for lo in range(0, n, rows):
        suppress[lo:lo + rows] = box_iou(boxes[lo:lo + rows], boxes) > iou_threshold
    kept = greedy_keep(suppress, alive)
    return torch.nonzero(kept).reshape(-1)[:max_keep]


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
