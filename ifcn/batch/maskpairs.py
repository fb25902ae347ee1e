"""Mask NMS's pair work (ifcn.batch.masknms), on the windows' device: which pairs of a round's windows and the
kept masks may still pass the IoU threshold, by a bound from boxes and areas (candidate_pixels),
then a tighter one from the masks' pixels per box column and row (projection_filter, Projections),
and the exact intersections of the pairs left, read from a bit-packed flat store of masks 32 pixels
at a time (intersections). Every bound is an upper bound on the intersection, and I / (a + b - I)
grows with I: the decisions are the reference's (GreedyMaskNMS).

Shapes: B images; R a round's windows; G = K + R columns (the K kept so far, then the round's own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ifcn.ops.nms import IOU_BLOCK, box_overlap

from .budgets import device_budget


@dataclass(frozen=True)
class Projections:
    """Pasted masks' pixels per box column and per box row (mask_nms's tighter intersection bound).

    cols, rows: (Σw,), (Σh,) int32 every window's counts back to back; at: (n, 2) long each window's
    offset in cols and in rows."""

    cols: torch.Tensor
    rows: torch.Tensor
    at: torch.Tensor


def candidate_pixels(rb: torch.Tensor, ra: torch.Tensor, gb: torch.Tensor, ga: torch.Tensor, k: int,
                     iou_threshold: float) -> torch.Tensor:
    """Box-intersection pixels of the pairs whose mask IoU may pass the threshold, 0 for the rest.

    rb: (B, R, 4) a round's boxes, ra: (B, R) their mask areas; gb: (B, G, 4), ga: (B, G) the kept
    masks (first k columns) then the round's own. A pair (i, j) is a candidate if j is kept or
    earlier in the round and the IoU bound from boxes and areas passes (as GreedyMaskNMS: the
    intersection is at most the boxes' overlap and either area, and I / (a + b - I) grows with I).
    Rows in blocks of nms.IOU_BLOCK float64 elements. Returns (B, R, G) long."""
    b, r, g = rb.shape[0], rb.shape[1], gb.shape[1]
    dev = rb.device
    out = torch.empty((b, r, g), dtype=torch.long, device=dev)
    col, row = torch.arange(g, device=dev), torch.arange(r, device=dev)
    earlier = (col[None, :] < k) | (col[None, :] - k < row[:, None])  # (R, G)
    rows = max(1, device_budget(IOU_BLOCK, dev) // max(1, b * g))
    for lo in range(0, r, rows):
        overlap = box_overlap(rb[:, lo:lo + rows], gb)  # (B, rows, G) float64
        a, o = ra[:, lo:lo + rows, None].double(), ga[:, None, :].double()
        bound = torch.minimum(overlap, torch.minimum(a, o))
        near = (bound / (a + o - bound).clamp(min=1) > iou_threshold) & earlier[lo:lo + rows]
        out[:, lo:lo + rows] = torch.where(near, overlap.long(), 0)
    return out


def projection_filter(pixels: torch.Tensor, gb: torch.Tensor, ra: torch.Tensor, ga: torch.Tensor, proj: Projections,
                      k: int, iou_threshold: float) -> torch.Tensor:
    """The candidate pairs (pixels: (B, R, G) box-intersection pixels, 0: none) whose mask IoU may still
    pass the threshold by a tighter bound than boxes and areas: the intersection is at most the sum
    over the shared columns of the smaller of the two masks' pixels in that column, and likewise over
    the shared rows (projections: every window's per-column and per-row pixels, at proj.at (B, G, 2)
    for the columns of gb (B, G, 4): kept, then the round's; ra (B, R), ga (B, G) areas). Most
    candidates of overlapping masks fail it (mask IoU well under the threshold), so their pixels are
    never read: the decisions are the reference's (the bound is an upper bound, and I / (a + b - I)
    grows with I), at ~50 bytes written a shared column or row instead of ~5 a shared pixel. One host
    read (how many candidates and shared columns and rows). Returns (B, R, G) long, 0 where it fails."""
    b, r, g = pixels.shape
    dev = pixels.device
    flat = pixels.reshape(-1)
    gi = gb.to(torch.int32)  # boxes inside images: far below 2^31
    cand = pixels > 0

    def extent(axis: int) -> torch.Tensor:  # (B, R, G) the boxes' overlap along x (0) or y (1)
        return torch.where(cand, torch.minimum(gi[:, k:, None, axis + 2], gi[:, None, :, axis + 2])
                           - torch.maximum(gi[:, k:, None, axis], gi[:, None, :, axis]), 0).reshape(-1)

    sides = [extent(0), extent(1)]
    n, *items = (int(v) for v in torch.stack([cand.sum(), sides[0].sum(), sides[1].sum()]).numpy(force=True))
    pair = torch.nonzero_static(flat, size=n).reshape(-1)  # (n,) candidates
    img, i, j = pair // (r * g), pair // g % r, pair % g
    mine, other = img * g + k + i, img * g + j  # (n,) rows of the (B G) columns
    boxes, at = gb.reshape(-1, 4), proj.at.reshape(-1, 2)
    ix = torch.int32 if max(items + [len(proj.cols), len(proj.rows)]) < 2 ** 31 - 2 ** 16 else torch.long
    bound = None
    for axis, (count, store) in enumerate(zip(items, (proj.cols, proj.rows))):
        width = sides[axis][pair].to(ix)  # (n,) shared columns (rows)
        first = torch.maximum(boxes[mine, axis], boxes[other, axis])  # (n,) the first shared one (image coordinates)
        owner = torch.repeat_interleave(torch.arange(n, device=dev, dtype=ix), width, output_size=count)  # (I,)
        step = torch.arange(count, device=dev, dtype=ix) - (torch.cumsum(width, 0, dtype=ix) - width)[owner]
        ends = [(at[rows, axis] + first - boxes[rows, axis]).to(ix)[owner] + step for rows in (mine, other)]
        smaller = torch.minimum(store[ends[0]], store[ends[1]])  # (I,) int32
        total = torch.zeros(n, dtype=torch.int32, device=dev).index_add_(0, owner, smaller)
        bound = total if bound is None else torch.minimum(bound, total)
    a, o = ra.reshape(-1)[img * r + i].double(), ga.reshape(-1)[other].double()
    inter = bound.double()
    passes = inter / (a + o - inter).clamp(min=1) > iou_threshold
    return torch.zeros_like(flat).index_copy_(0, pair, torch.where(passes, flat[pair], 0)).reshape(b, r, g)


def intersections(store: torch.Tensor, pixels: torch.Tensor, gb: torch.Tensor, gs: torch.Tensor, k: int,
                  budget: int) -> torch.Tensor:
    """Exact mask intersections of every candidate pair, read from the flat store 32 pixels at a time.

    store: (S,) bool masks over their boxes, column-major; pixels: (B, R, G) long box-intersection
    pixels of each pair (0: not a candidate); gb: (B, G, 4) boxes and gs: (B, G) store offsets of
    the columns (round window i is column k + i). One host read (the candidates, their columns and
    their words) plans it. Each candidate's box intersection is a run of columns (*items*, with a
    store offset per mask), each column a run of 32-pixel *words*; the store is packed to bits
    (`_packed`) and every word of both masks read at any bit offset (`_bits`), ANDed and counted
    (`_popcount`), budget / 4 words a step (~300 bytes a word at the peak): ~4.5 bytes written a pair
    pixel, where one bool per pixel wrote ~35 and dividing each pixel's index into a column and row ~170.
    Returns (B, R, G) long."""
    b, r, g = pixels.shape
    dev = pixels.device
    flat = pixels.reshape(-1)
    gi = gb.to(torch.int32)  # boxes inside images: coordinates far below 2^31

    def extent(lo: int, hi: int) -> torch.Tensor:  # (B, R, G) overlap of the boxes along x (0, 2) or y (1, 3)
        return torch.minimum(gi[:, k:, None, hi], gi[:, None, :, hi]) - torch.maximum(gi[:, k:, None, lo], gi[:, None, :, lo])

    cand = flat.reshape(b, r, g) > 0
    cols = torch.where(cand, extent(0, 2), 0).reshape(-1).long()  # (B R G) candidates' columns
    words = (cols * torch.div(extent(1, 3).reshape(-1) + 31, 32, rounding_mode="floor"))  # and their words
    n, items, total = (int(v) for v in torch.stack([cand.sum(), cols.sum(), words.sum()]).numpy(force=True))
    pair = torch.nonzero_static(flat, size=n).reshape(-1)  # (n,) candidates (no sync: n is known)
    img, i, j = pair // (r * g), pair // g % r, pair % g
    mine, other = (gb.reshape(-1, 4)[rows] for rows in (img * g + k + i, img * g + j))  # (n, 4) boxes
    start = gs.reshape(-1)
    origin = torch.maximum(mine[:, :2], other[:, :2])  # (n, 2) the boxes' intersection's first pixel
    height = torch.minimum(mine[:, 3], other[:, 3]) - origin[:, 1]  # (n,)
    width = cols[pair]
    # items: each candidate's columns; per item its first word's index, its height and, per mask,
    # the store offset of its first pixel
    owner = torch.repeat_interleave(torch.arange(n, device=dev), width, output_size=items)  # (I,)
    column = torch.arange(items, device=dev) - (torch.cumsum(width, 0) - width)[owner]
    h = height[owner]
    nw = torch.div(h + 31, 32, rounding_mode="floor")
    end = torch.cumsum(nw, 0)  # (I,) one past each item's last word
    first = end - nw
    offs = [base[owner] + column * stride[owner] for base, stride in
            (_origin_offset(box, at, origin) for box, at in ((mine, start[img * g + k + i]), (other, start[img * g + j])))]
    packed = _packed(store)
    ix = torch.int32 if max(len(store) + 64, total) < 2 ** 31 else torch.long  # per-word indices
    end, first, h = end.to(ix), first.to(ix), h.to(ix)
    offs = [o.to(ix) for o in offs]
    live_bits = (1 << torch.arange(33, device=dev)) - 1  # (33,): the low k bits set
    hits = torch.zeros(items, dtype=torch.int32, device=dev)
    step = max(1, budget // 4)  # words: ~300 bytes each at the peak, as ~75 a budget pixel (~100 before)
    for lo in range(0, total, step):
        at = torch.arange(lo, min(lo + step, total), device=dev, dtype=ix)  # (T,) words
        item = torch.searchsorted(end, at, right=True, out_int32=ix == torch.int32)  # (T,) the item holding word `at`
        row = (at - first[item]) * 32  # the word's first pixel in its column
        live = live_bits[(h[item] - row).clamp(max=32)]  # its bits inside the column
        both = _bits(packed, offs[0][item] + row) & _bits(packed, offs[1][item] + row) & live
        hits.index_add_(0, item, _popcount(both))
    inter = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, owner, hits.long())
    return torch.zeros_like(flat).index_copy_(0, pair, inter).reshape(b, r, g)


def _packed(store: torch.Tensor) -> torch.Tensor:
    """(S,) bool -> (S / 32 + 1,) int64: word w holds store[32 w:32 w + 64] (bit i: store[32 w + i];
    zeros past the end), so the 32 bits from any offset below S are one read and one shift."""
    dev = store.device
    bits = torch.cat([store, store.new_zeros((-len(store)) % 32 + 64)]).view(torch.uint8).reshape(-1, 8)
    weights = torch.ones(8, dtype=torch.uint8, device=dev) << torch.arange(8, dtype=torch.uint8, device=dev)
    byte = (bits * weights).sum(-1, dtype=torch.uint8)  # (S / 8,): 8 pixels, first in bit 0
    words = byte.view(torch.int32).long() & 0xFFFFFFFF  # little-endian: 4 bytes, first in the low one
    return words[:-1] | (words[1:] << 32)  # 64 bits from each word: any 32 from an offset are one read


def _bits(pairs: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The store bits from each bit offset (T,) int32 or long -> (T,) int64: bit i is store[offset + i]
    for i < 32, anything above (pairs: _packed's words, each with the next one above it)."""
    return pairs[offset >> 5] >> (offset & 31)


_POPCOUNT16: dict[torch.device, torch.Tensor] = {}


def _popcount(v: torch.Tensor) -> torch.Tensor:
    """(T,) int64 values below 2^32 -> (T,) int32 their set bits: a 16-bit table (64 kB, made once per
    device) read at the two low 16-bit halves (a uint16 view, little-endian), ~14 bytes written a
    value where a byte table wrote ~72."""
    table = _POPCOUNT16.get(v.device)
    if table is None:
        ar = torch.arange(1 << 16, device=v.device)
        table = _POPCOUNT16.setdefault(v.device, ((ar[:, None] >> torch.arange(16, device=v.device)) & 1).sum(1).to(torch.uint8))
    halves = v.view(torch.uint16).reshape(-1, 4)[:, :2].to(torch.int32)  # (T, 2)
    return table[halves].sum(1, dtype=torch.int32)


def _origin_offset(box: torch.Tensor, start: torch.Tensor, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks stored column-major over their boxes (n, 4) from offsets start (n,): the offset of
    pixel origin (n, 2) (x, y) inside each box, and each box's height (n,)."""
    height = box[:, 3] - box[:, 1]
    return start + (origin[:, 0] - box[:, 0]) * height + origin[:, 1] - box[:, 1], height
