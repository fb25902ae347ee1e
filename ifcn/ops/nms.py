"""Greedy NMS, side by side: the numpy reference (`GreedyMaskNMS`, `mask_nms`: box or mask IoU, one
mask at a time in score order) and greedy box NMS for every image of a batch at once (torch).

Every window of a batch sits in one padded (B, N) layout in score order. Box NMS goes in rounds of
positions (`box_nms_rounds`): a round's (B, R, K) "a kept box suppresses it" and (B, R, R) "an
earlier one in the round suppresses it" come from box IoUs in row blocks of a fixed element budget,
and the greedy rule's kept set within the round is its fixed point: `kept = alive & ~any(suppress &
kept)`, reached after as many sweeps as the longest chain of suppressions. Rounds stop once every
image has max_keep kept, so the (B, N, N) matrix is never built: its bytes, not its launches, were
what a GPU waited for. The host checks convergence only after sweeps that double in length, with
each round's kept counts in the same read: a few syncs a batch, none per window or image.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ifcn.config import NMS_MODES

# float64 IoU elements one block materialises (a few temporaries each), by device type: bounds
# memory at any batch (a batch of 16 with the paper's 6000 windows each: 5 blocks on a GPU).
IOU_BLOCK = {"cuda": 1 << 27, "cpu": 1 << 24}
# Row blocks of a square (within-round) suppression matrix at least: each reads the columns before its end.
TRIANGLE_BLOCKS = 4
FIRST_SWEEPS = 8  # sweeps before the first convergence check; each later round doubles
# Box NMS: positions of the score order the first round takes, as a multiple of max_keep (plus 16);
# later rounds take what the keep rate so far says is needed, times this margin.
FIRST_ROUND = 1.25


Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _prepared(boxes: torch.Tensor, coords: torch.dtype) -> Prepared:
    """(..., n, 4) integer boxes -> their coordinates in `coords` and in the areas' type, and their
    areas (..., n): what box IoU reads, converted once per matrix, not once per row block."""
    wide = boxes.to(torch.int32 if coords == torch.int16 else torch.int64)
    return boxes.to(coords), wide, (wide[..., 2] - wide[..., 0]) * (wide[..., 3] - wide[..., 1])


def _iou(a: Prepared, b: Prepared, dtype: torch.dtype) -> torch.Tensor:
    """box_iou of prepared boxes."""
    (a, ah, area_a), (b, bh, area_b) = a, b
    w = (torch.minimum(a[..., :, None, 2], b[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], b[..., None, :, 0]))
    h = (torch.minimum(a[..., :, None, 3], b[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], b[..., None, :, 1]))
    inter = w.clamp_(min=0).to(ah.dtype) * h.clamp_(min=0)  # in the areas' type (int16 * int32 promotes)
    # union >= 1 but for two empty boxes (0 / 0: NaN, never above a threshold, as the reference's 0)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return torch.div(inter.to(dtype), union) if dtype != torch.float32 else torch.div(inter, union)


def box_iou(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64,
            coords: torch.dtype = torch.int64) -> torch.Tensor:
    """(..., n, 4), (..., k, 4) integer boxes (x0, y0, x1, y1) -> (..., n, k) IoU in `dtype`, the
    reference's ops: inter / max(area_a + area_b - inter, 1) (NaN, not 0, for two empty boxes: the
    same decision against any threshold), every term but the division exact in
    integers (widths in `coords`: int16 where every coordinate is below 2^15, and then areas in
    int32; else int64), the division in `dtype` (float64: the reference's; float32: within
    rounding of the threshold). ~37 bytes written a pair with int16, where float32 terms wrote ~56."""
    return _iou(_prepared(a, coords), _prepared(b, coords), dtype)


def suppression(boxes: torch.Tensor, iou_threshold: float, others: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float64, coords: torch.dtype = torch.int64) -> torch.Tensor:
    """boxes: (B, N, 4) in score order -> (B, N, N) bool, [b, i, j] = IoU > threshold for j < i (the
    rest unset: greedy_keep reads j < i only, anything above the diagonal of a block); with
    `others` (B, K, 4): (B, N, K) bool, IoU > threshold against those (any order). Rows in blocks
    of IOU_BLOCK elements; without `others` at least TRIANGLE_BLOCKS blocks, each against the columns
    before its end only (the pairs j < i: ~5/8 of the square)."""
    batch, n = boxes.shape[:2]
    mine = _prepared(boxes, coords)
    cols = mine if others is None else _prepared(others, coords)
    k = cols[0].shape[1]
    rows = max(1, IOU_BLOCK.get(boxes.device.type, IOU_BLOCK["cuda"]) // max(1, batch * k))

    def part(t: Prepared, lo: int, hi: int) -> Prepared:
        return tuple(x[:, lo:hi] for x in t)  # type: ignore[return-value]

    if others is not None:
        out = torch.empty((batch, n, k), dtype=torch.bool, device=boxes.device)
        for lo in range(0, n, rows):
            out[:, lo:lo + rows] = _iou(part(mine, lo, lo + rows), cols, dtype) > iou_threshold
        return out
    out = torch.zeros((batch, n, n), dtype=torch.bool, device=boxes.device)
    rows = max(1, min(rows, -(-n // TRIANGLE_BLOCKS)))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        out[:, lo:hi, :hi] = _iou(part(mine, lo, hi), part(cols, 0, hi), dtype) > iou_threshold
    return out


def greedy_keep(suppress: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Greedy NMS from a suppression matrix without a sequential loop.

    suppress: (..., n, n) bool, [i, j] = earlier item j would suppress i (only j < i is read);
    alive: (..., n) bool. Returns (..., n) bool: i kept iff alive and no kept j < i suppresses it."""
    return greedy_keep_read(suppress, alive, lambda kept: kept.new_zeros(0))[0]


def greedy_keep_read(suppress: torch.Tensor, alive: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """greedy_keep, and `read(kept)` (a 1-d tensor) brought to the host by the same read as the
    last convergence check: one host sync per round of sweeps, none more for the caller's question."""
    # As a 0/1 matrix, a sweep's "any kept j suppresses i" is one matrix-vector product: a sweep
    # writes O(n) bytes, not a (..., n, n) bool. float16: a sum is 0 exactly when no term is 1,
    # whatever its rounding; kept stays within alive, so alive's columns need no mask.
    weights = torch.tril(suppress, diagonal=-1).to(torch.float16)
    kept = alive.clone()
    sweeps = FIRST_SWEEPS
    while True:
        for _ in range(sweeps):
            prev, kept = kept, alive & (weights @ kept[..., None].to(torch.float16)).squeeze(-1).eq(0)
        host = torch.cat([(prev != kept).any().reshape(1).long(), read(kept).long()]).numpy(force=True)
        if not host[0]:  # one host sync per round
            return kept, host[1:]
        sweeps *= 2


def first_kept(kept: torch.Tensor, max_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kept: (B, N) bool -> the positions of each row's first `max_keep` kept items, (B, K) long in
    order with K = min(max_keep, N), and (B, K) bool which of those are real (no sync)."""
    n = kept.shape[1]
    pos = torch.arange(n, device=kept.device)
    key = torch.where(kept, n - pos, 0)  # the earliest kept item has the largest key
    top = torch.topk(key, min(max_keep, n), dim=1)
    return torch.where(top.values > 0, n - top.values, 0), top.values > 0


def box_nms(boxes: torch.Tensor, alive: torch.Tensor, iou_threshold: float, max_keep: int,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS on tight boxes in score order, every image at once (box_nms_rounds).

    boxes: (B, N, 4) long (x0, y0, x1, y1); alive: (B, N) bool. Returns (B, K) positions of the kept
    items, best first, and (B, K) bool which are real (K = min(max_keep, N))."""
    pos, real, _ = box_nms_rounds(lambda lo, hi: (boxes[:, lo:hi], alive[:, lo:hi]), alive.shape, iou_threshold,
                                  max_keep, dtype)
    return pos, real


Fetch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def box_nms_rounds(fetch: Fetch, shape: tuple[int, int], iou_threshold: float, max_keep: int,
                   dtype: torch.dtype = torch.float64, limit: torch.Tensor | None = None,
                   coords: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy box NMS of every image at once, in rounds over the pairs that can matter.

    A round takes the next positions [lo, hi) of the score order (all images alike) from `fetch`
    (-> their (B, R, 4) long boxes and (B, R) bool alive), drops those a kept box suppresses
    ((B, R, K) against the kept so far) and runs the greedy rule within the round ((B, R, R)).
    Rounds stop once every image has max_keep kept or has no position below `limit` (B,) left
    (None: N), so later positions are never compared, nor fetched (their tight boxes never
    computed). The first round takes FIRST_ROUND x max_keep positions, later ones what the keep rate
    so far says the images still need. IoU in `dtype` (float64: the reference's decisions exactly),
    its integer terms in `coords` (box_iou).
    shape: (B, N). Returns (B, K) positions of the kept items, best first, (B, K) bool which are
    real (K = min(max_keep, N)) and (B, K, 4) their boxes (zero where not real). One host read a
    round, shared with the greedy rule's convergence check."""
    b, n = shape
    k = min(max_keep, n)
    kept, seen = None, None
    count = np.zeros(b, dtype=np.int64)  # kept per image (host)
    ends = np.full(b, n, dtype=np.int64)  # positions that may be alive per image (host, after round 1)
    lo, width = 0, min(n, int(math.ceil(FIRST_ROUND * k)) + 16)
    while True:
        hi = lo + width
        rb, ra = fetch(lo, hi)  # (B, R, 4), (B, R)
        if kept is None:
            dev = rb.device
            kept = torch.zeros((b, n), dtype=torch.bool, device=dev)
            seen = torch.zeros((b, n, 4), dtype=torch.long, device=dev)  # boxes of the positions done
            ends_t = torch.full((b,), n, dtype=torch.long, device=dev) if limit is None else limit.long()
        seen[:, lo:hi] = rb
        room = k - kept.sum(1, keepdim=True)  # (B, 1)
        if lo:
            kpos, kreal = first_kept(kept[:, :lo], max(1, int(count.max())))  # (B, K') kept so far (host count)
            kb = torch.where(kreal[..., None], seen.gather(1, kpos[..., None].expand(*kpos.shape, 4)), 0)
            ra = ra & ~suppression(rb, iou_threshold, kb, dtype, coords).any(-1)  # zero boxes suppress nothing
            # the round's pairs among the survivors of that check only (first, in order): one host read
            # of how many, for a square of the survivors instead of the round (~3x fewer pairs: structured
            # heads keep a fourth of a round)
            first = torch.argsort((~ra).to(torch.int8), dim=1, stable=True)[:, :max(1, int(ra.sum(1).max()))]
            sb, sa = rb.gather(1, first[..., None].expand(*first.shape, 4)), ra.gather(1, first)
            skeep, host = greedy_keep_read(suppression(sb, iou_threshold, dtype=dtype, coords=coords), sa,
                                           lambda kp: kp.sum(1))
            keep = torch.zeros_like(ra).scatter_(1, first, skeep)
        else:
            keep, host = greedy_keep_read(suppression(rb, iou_threshold, dtype=dtype, coords=coords), ra,
                                          lambda kp: torch.cat([kp.sum(1), ends_t]))
        keep &= torch.cumsum(keep, 1) <= room  # the kept list stops at max_keep
        kept[:, lo:hi] = keep
        if not lo:
            ends = host[b:]
        count = np.minimum(count + host[:b], k)
        lo = hi
        todo = (count < k) & (ends > lo)  # images that may still keep more
        if not todo.any():
            break
        # the rest at the keep rate seen so far, with a margin (any width gives the same result)
        rate = max(float((count[todo] / lo).min()), 0.05)
        width = min(int(ends[todo].max()) - lo, int(math.ceil(float((k - count[todo]).max()) / rate * FIRST_ROUND)) + 16)
    pos, real = first_kept(kept, max_keep)
    return pos, real, torch.where(real[..., None], seen.gather(1, pos[..., None].expand(*pos.shape, 4)), 0)


def box_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., n, 4), (..., k, 4) boxes (x0, y0, x1, y1) -> (..., n, k) float64 area of their intersection."""
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[..., :, None, 2], b[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], b[..., None, :, 0])
          ).clamp(min=0)
    ih = (torch.minimum(a[..., :, None, 3], b[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], b[..., None, :, 1])
          ).clamp(min=0)
    return iw * ih


# --------------------------------------------------------------------------- numpy reference

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
