"""Pasting kept windows pixel by pixel and reading their COCO run lengths off, for any number of
windows of any images in one flat (ragged) layout (torch).

Each window's binarised mask over its tight box is laid out column-major, windows back to back,
so a batch's masks cost memory in proportion to their pixels (not to the largest box), and the
runs of every mask come from one pass of change detection over the flat buffer.
"""
from __future__ import annotations

import torch

from .boxes import cell_coord


def paste_flat(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
               totals: tuple[int, int, int], m: int, stride: int, threshold: float, dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binarised pasted masks of windows over their boxes, flat.

    probs: (n, m, m); cells: (n, 2) long; factor: (n, 2) float64; boxes: (n, 4) long (x0, y0, x1, y1),
    inside their images; totals: the sums of the boxes' areas, heights and widths (host ints).
    Returns (values (T,) bool, owner (T,) long window of each pixel, row (T,), col (T,) long pixel
    within its box); window i's pixels start at the cumulative sum of the areas before it, column
    by column. The reference's float ops: each box column blends the m rows along x (once per
    column), then each pixel blends two of those along y, in `dtype`."""
    total, rows_total, cols_total = totals
    dev = probs.device
    n = len(boxes)
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    p = probs.to(dtype)
    ar = torch.arange(n, device=dev)

    def axis(length: torch.Tensor, first: torch.Tensor, axis_: int, count: int):
        """Per box pixel along one axis (boxes' pixels back to back): its window, cell i0, i1, weight t."""
        owner = torch.repeat_interleave(ar, length, output_size=count)
        starts = torch.cumsum(length, 0) - length
        pix = first[owner] + torch.arange(count, device=dev) - starts[owner]
        u = cell_coord(pix, cells[owner, axis_], factor[owner, axis_], m, stride)
        i0 = u.floor()
        return owner, starts, i0.long(), (i0.long() + 1).clamp(max=m - 1), (u - i0).to(dtype)

    cown, cstart, i0x, i1x, tx = axis(w, boxes[:, 0], 1, cols_total)
    _, rstart, i0y, i1y, ty = axis(h, boxes[:, 1], 0, rows_total)
    q = p[cown, :, i0x] * (1.0 - tx[:, None]) + p[cown, :, i1x] * tx[:, None]  # (cols, m): along x first
    area = h * w
    owner = torch.repeat_interleave(ar, area, output_size=total)
    local = torch.arange(total, device=dev) - (torch.cumsum(area, 0) - area)[owner]
    hh = h[owner]
    col = local // hh
    row = local - col * hh
    qrow = (cstart[owner] + col) * m  # this pixel's column of q
    r = rstart[owner] + row  # this pixel's row geometry
    t = ty[r]
    flat = q.reshape(-1)
    return flat[qrow + i0y[r]] * (1.0 - t) + flat[qrow + i1y[r]] * t > threshold, owner, row, col


def flat_runs(values: torch.Tensor, owner: torch.Tensor, row: torch.Tensor, col: torch.Tensor, boxes: torch.Tensor,
              image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO uncompressed run lengths of full-image masks zero outside their boxes, from `paste_flat`.

    boxes: (n, 4); image_sizes: (n, 2) (H, W) of each window's image. Returns (counts (R,) long,
    lengths (n,) long): mask i's column-major runs, background first, are the lengths[i] counts
    after those of masks < i. One sync (nonzero: the number of runs). Masks must not be empty."""
    dev = values.device
    n = len(boxes)
    h = boxes[:, 3] - boxes[:, 1]
    height = image_sizes[:, 0]
    hh, full = h[owner], (h == height)[owner]  # a full-height box's columns follow each other directly
    pos = (boxes[owner, 0] + col) * height[owner] + boxes[owner, 1] + row  # full-image column-major
    prev_in = (row > 0) | (full & (col > 0))
    prev = torch.cat([values.new_zeros(1), values[:-1]]) & prev_in
    starts = values != prev  # a run starts at this pixel
    last_row = row == hh - 1
    width = boxes[:, 2] - boxes[:, 0]
    next_out = last_row & ~(full & (col < width[owner] - 1))
    pixels = image_sizes[:, 0] * image_sizes[:, 1]
    ends = values & next_out & (pos + 1 < pixels[owner])  # the pixel after it starts a background run
    events = torch.stack([starts, ends], 1).reshape(-1)  # (2T,): per pixel its start, then its end
    e = torch.nonzero(events).reshape(-1)  # in order: by window, then position
    pix, kind = e // 2, e % 2
    where = pos[pix] + kind
    who = owner[pix]
    changes = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, who, torch.ones_like(who))
    lengths = changes + 1
    first = torch.ones_like(who, dtype=torch.bool)
    first[1:] = who[1:] != who[:-1]
    before = torch.cat([where.new_zeros(1), where[:-1]])
    runs = where - torch.where(first, 0, before)
    counts = torch.empty(len(e) + n, dtype=torch.long, device=dev)
    counts[torch.arange(len(e), device=dev) + who] = runs  # event g of window o sits at g + o
    last_at = torch.cumsum(changes, 0) + torch.arange(n, device=dev)  # each window's final count
    last_pos = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, who, where, "amax", include_self=False)
    counts[last_at] = pixels - torch.where(changes > 0, last_pos, 0)
    return counts, lengths
