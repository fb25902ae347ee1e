"""Greedy mask-IoU NMS of every image of a batch at once, on the windows' device (mask_nms): rounds of
the next windows of each image's score order, pasted over their boxes into a flat store (with their
per-column and per-row projections), their candidate pairs against the kept masks and each other
bounded and intersected (ifcn.batch.maskpairs), the greedy rule (nms.greedy_keep) run over the rest.
The host side (which positions a round takes, the store's budget, the chunks of kept masks pasted
again past it) is `_Rounds`, yielded to the caller's thread (ifcn.batch.hostwork).

Shapes: B images, C windows each (N = C + MASK_ROUND positions), R a round's windows, K kept.
"""
from __future__ import annotations

import numpy as np
import torch

from ifcn.config import InferenceConfig
from ifcn.ops.nms import first_kept, greedy_keep
from ifcn.ops.upload import upload
from ifcn.tools.opcount import stage

from .budgets import MASK_ROUND, PAIR_PIXEL_BUDGET, STORE_PIXEL_BUDGET, device_budget
from .containers import WindowBatch
from .hostwork import Host, Steps
from .maskpairs import Projections, candidate_pixels, intersections, projection_filter
from .pasteplan import MASK_DENSE_GROUPS, paste_plan, step_ranges
from .pasteruns import dense_steps
from .tightboxes import take, tight_boxes_at


def mask_nms(batch: WindowBatch, order: torch.Tensor, live: torch.Tensor, config: InferenceConfig, m: int,
             stride: int, dtype: torch.dtype, pixel_budget: int
             ) -> Steps[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Greedy mask-IoU NMS of every image of the batch at once, the reference's rule exactly: in
    score order, a window is kept iff no kept earlier one has mask IoU above `nms_iou`, until
    `max_proposals` are kept.

    order: (B, C) candidate index of each position in score order, live (B, C) bool ones first.
    Rounds: each takes the next positions of every image that still has room (at most MASK_ROUND,
    `_round_widths`), pastes them (dense, then their box pixels flat: _paste_items, `pixel_budget`
    padded pixels a step) for exact areas (empty masks: 0, they take no part), reads the exact
    intersections of the pairs whose bounds pass (round x kept so far, round x earlier in the round;
    candidate_pixels, projection_filter), drops the windows a kept mask suppresses and runs the
    greedy rule (nms.greedy_keep) over the rest. Tight boxes are computed only for the positions a
    round may take: MASK_ROUND past the next round's start, fetched a round ahead and read with the
    round's kept windows (no host read of their own), so positions past the point where an image
    has max_proposals kept are never computed. Returns (B, K) positions of the kept windows, best
    first, (B, K) bool which are real (K = min(max_proposals, C)), as nms.box_nms does, and (B, K, 4)
    their tight boxes (zero where not real).

    Memory: the flat `store` (1 byte a box pixel) stays within STORE_PIXEL_BUDGET per batch, but for
    the one window a round always takes of an unfinished image and a chunk's last kept mask: while
    the kept masks take at most half of it they stay stored and a round's windows get the rest;
    past that they are pasted again each round, in chunks (`_chunked_intersections`, one more host
    read a chunk), and a round's windows get half. Dropping a round's unkept windows copies the
    store once (`_kept_pixels`: ~1.5x it at the peak)."""
    b, c = live.shape
    dev = order.device
    cap, k, most = config.max_proposals, min(config.max_proposals, c), device_budget(MASK_ROUND, dev)
    budget = device_budget(STORE_PIXEL_BUDGET, dev)
    n = c + most  # `most` dead positions past the end, so a round's positions never pass it
    src = torch.cat([order, order.new_zeros(b, most)], 1)  # (B, N) candidate index
    live = torch.cat([live, live.new_zeros(b, most)], 1)  # (B, N)
    boxes = torch.zeros((b, n, 4), dtype=torch.long, device=dev)  # tight boxes of the positions fetched (else 0)

    def fetch(span: np.ndarray) -> torch.Tensor:
        """Tight boxes (B, R, 4) of positions [start, start + count) of each image (span: (B, 2) host),
        zero past them and for dead positions and empty masks; also written into `boxes`."""
        r = int(span[:, 1].max())
        at = upload(span, dev)  # (B, 2)
        ar = torch.arange(r, device=dev)
        pos = (at[:, :1] + ar).clamp(max=n - 1)  # (B, R)
        with stage("tight_boxes"):
            got = tight_boxes_at(batch, src.gather(1, pos), config, m, stride, dtype)
        got = torch.where(((ar < at[:, 1:]) & live.gather(1, pos))[..., None], got, 0)
        boxes.scatter_(1, pos[..., None].expand(b, r, 4), got)  # positions past a span: not fetched yet, 0 either way
        return got

    first = np.stack([np.zeros(b, np.int64), np.full(b, min(most, n), np.int64)], 1)
    got = fetch(first)
    head = torch.cat([live.sum(1), got.reshape(-1)]).numpy(force=True)  # one host read plans the first round
    rounds = yield Host(_Rounds, b, n, cap, k, most, budget, head[:b], first, head[b:].reshape(b, -1, 4))
    kept = torch.zeros((b, n), dtype=torch.bool, device=dev)
    area = torch.zeros((b, n), dtype=torch.long, device=dev)  # mask areas of the pasted positions
    start = torch.zeros((b, n), dtype=torch.long, device=dev)  # kept masks' offsets in `store`
    store = torch.zeros(0, dtype=torch.bool, device=dev)  # kept masks over their boxes, flat (while stored)
    proj_cols = proj_rows = torch.zeros(0, dtype=torch.int32, device=dev)  # every pasted window's projections
    side_at = torch.zeros((b, n, 2), dtype=torch.long, device=dev)  # their offsets in proj_cols, proj_rows
    width = rounds.width
    while width.any():
        stored = rounds.stored
        plan_h, pos_h, hb, ahead = yield Host(rounds.next_round)
        plan = upload(plan_h, dev)  # (B, 3) positions done, this round's width, room
        ar = torch.arange(pos_h.shape[1], device=dev)
        pos = plan[:, :1] + ar  # (B, R) this round's positions
        inside = ar < plan[:, 1:2]  # (B, R)
        rb = torch.where(inside[..., None], take(boxes, pos), 0)  # (B, R, 4)
        values, ra, roff, rproj = yield from _paste_round(batch, take(src, pos), rb, hb, m, stride,
                                                          config.mask_threshold, dtype, pixel_budget)
        # projections of every window pasted so far (a few bytes a box side: never dropped)
        side_at.scatter_(1, pos[..., None].expand(b, len(ar), 2),
                         torch.stack([rproj.at[..., 0] + len(proj_cols), rproj.at[..., 1] + len(proj_rows)], 2))
        proj_cols, proj_rows = torch.cat([proj_cols, rproj.cols]), torch.cat([proj_rows, rproj.rows])
        base = len(store)  # the kept masks' pixels while stored, else 0
        box_area = (rb[..., 2] - rb[..., 0]) * (rb[..., 3] - rb[..., 1])  # (B, R)
        rstart = base + roff  # (B, R)
        kpos, kreal = first_kept(kept, k)  # (B, K) kept so far
        gb = torch.cat([torch.where(kreal[..., None], take(boxes, kpos), 0), rb], 1)  # (B, G = K + R, 4)
        ga = torch.cat([take(area, kpos), ra], 1)  # (B, G)
        pixels = candidate_pixels(rb, ra, gb, ga, k, config.nms_iou)  # (B, R, G)
        pixels = projection_filter(pixels, gb, ra, ga, Projections(proj_cols, proj_rows, take(side_at, torch.cat(
            [kpos, pos], 1))), k, config.nms_iou)
        pair_budget = device_budget(PAIR_PIXEL_BUDGET, dev)
        if stored:
            store = torch.cat([store, values])  # kept masks, then this round's windows
            gs = torch.cat([take(start, kpos), rstart], 1)  # (B, G)
            inter = intersections(store, pixels, gb, gs, k, pair_budget)  # (B, R, G)
        else:
            store = values  # this round's windows only
            kept_hb = yield Host(rounds.kept_boxes)  # (B, K, 4): gb's first k columns on the host
            inter = yield from _chunked_intersections(batch, src, kpos, values, pixels, gb, rstart, kept_hb,
                                                      budget - len(values), m, stride, config.mask_threshold, dtype,
                                                      pixel_budget, pair_budget)
        union = (ra[:, :, None] + ga[:, None, :] - inter).clamp(min=1)  # >= 1 wherever inter > 0
        suppress = inter.double() / union.double() > config.nms_iou  # (B, R, G): the exact rule
        free = (ra > 0) & ~suppress[:, :, :k].any(2)  # (B, R): no kept mask suppresses it
        keep = greedy_keep(suppress[:, :, k:], free)  # (B, R): the greedy rule within the round
        keep &= torch.cumsum(keep, 1) <= plan[:, 2:3]  # the kept list stops at max_proposals
        kept.scatter_(1, pos, keep)
        area.scatter_(1, pos, ra)
        got = fetch(ahead) if ahead[:, 1].any() else keep.new_zeros((b, 0, 4), dtype=torch.long)  # the next round's
        # one host read: how many each image kept, which pixels to keep, the boxes fetched for the next round
        read = torch.cat([keep.reshape(-1).long(), got.reshape(-1)]).numpy(force=True)
        keep_h = read[:keep.numel()].reshape(keep.shape).astype(bool)
        round_kept_px = yield Host(rounds.settle, pos_h, hb, keep_h, ahead, read[keep.numel():].reshape(b, -1, 4))
        width = rounds.width
        if width.any():  # another round: keep the kept masks' pixels only
            if rounds.stored:
                store, new_start = _kept_pixels(store, base, keep, box_area, rstart, round_kept_px)
                start.scatter_(1, pos, new_start)
            else:
                store = store[:0]
    pos, real = first_kept(kept[:, :c], k)
    return pos, real, torch.where(real[..., None], take(boxes, pos), 0)


class _Rounds:
    """mask_nms's host side: which positions each round takes (_round_widths) and which it fetches
    tight boxes for ahead, the host's copy of those boxes and of what is kept (B, N), and of the kept
    masks' box pixels; whether they stay in the store (while they take at most half of its budget;
    past it, for good, they are pasted again in chunks each round).

    b, n: images and positions (C + most); cap: max_proposals; k: kept columns; most: positions a round
    takes at most per image; budget: the store's box pixels; n_live: (B,) live positions (first in
    order); span, boxes: the first fetch ((B, 2) start, count; (B, R, 4) boxes)."""

    def __init__(self, b: int, n: int, cap: int, k: int, most: int, budget: int, n_live: np.ndarray,
                 span: np.ndarray, boxes: np.ndarray) -> None:
        self.cap, self.k, self.most, self.budget, self.n_live = cap, k, most, budget, n_live
        self.host = np.zeros((b, n, 4), dtype=np.int64)  # (B, N, 4) boxes of the positions fetched (else 0)
        self.fetched = np.zeros(b, dtype=np.int64)  # positions fetched per image (from 0)
        self.kept = np.zeros((b, n), dtype=bool)
        self.lo, self.count = np.zeros(b, dtype=np.int64), np.zeros(b, dtype=np.int64)  # positions done, kept
        self.stored, self.kept_px = True, 0
        self._receive(span, boxes)
        self.width = self._widths()

    def _receive(self, span: np.ndarray, boxes: np.ndarray) -> None:
        """Fetched boxes (B, R, 4) of positions [start, start + count) per image."""
        r = boxes.shape[1]
        at = span[:, :1] + np.arange(r)  # (B, R)
        inside = np.arange(r) < span[:, 1:]
        rows = np.nonzero(inside)
        self.host[rows[0], at[rows]] = boxes[rows]
        self.fetched = np.maximum(self.fetched, span[:, 0] + span[:, 1])

    def _widths(self) -> np.ndarray:
        room = self.budget - self.kept_px if self.stored else self.budget - self.budget // 2
        cum = np.concatenate([np.zeros((len(self.host), 1), np.int64), np.cumsum(_box_pixels(self.host), 1)], 1)
        width = _round_widths(np.minimum(self.n_live, self.fetched), self.lo, self.count, self.cap, self.most, cum, room)
        return np.minimum(width, np.maximum(self.fetched - self.lo, 0))  # only positions with boxes

    def next_round(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The next round: (B, 3) positions done, width, room; (B, R) its positions; (B, R, 4) their
        boxes (zero past an image's width); (B, 2) the positions to fetch for the round after it
        (start, count: up to `most` past this round's end, within the live ones)."""
        r = int(self.width.max())
        pos_h = self.lo[:, None] + np.arange(r)
        hb = np.take_along_axis(self.host, pos_h[..., None], 1) * (np.arange(r) < self.width[:, None])[..., None]
        end = np.minimum(self.lo + self.width + self.most, self.n_live)
        ahead = np.stack([self.fetched, np.where(self.width > 0, np.maximum(end - self.fetched, 0), 0)], 1)
        return np.stack([self.lo, self.width, self.cap - self.count], 1), pos_h, hb, ahead

    def kept_boxes(self) -> np.ndarray:
        """(B, K, 4) the kept boxes in order, zero past them (_first_kept_host)."""
        return _first_kept_host(self.kept, self.host, self.k)

    def settle(self, pos_h: np.ndarray, hb: np.ndarray, keep_h: np.ndarray, span: np.ndarray,
               boxes: np.ndarray) -> int:
        """A round's kept windows keep_h (B, R) bool and the boxes fetched ahead (span, boxes):
        records them and plans the next round. Returns the box pixels the round keeps."""
        np.put_along_axis(self.kept, pos_h, np.take_along_axis(self.kept, pos_h, 1) | keep_h, 1)
        round_kept_px = int((_box_pixels(hb) * keep_h).sum())
        self.kept_px += round_kept_px
        self.lo, self.count = self.lo + self.width, self.count + keep_h.sum(1)
        self.stored = self.stored and 2 * self.kept_px <= self.budget
        if boxes.shape[1]:
            self._receive(span, boxes)
        self.width = self._widths()
        return round_kept_px


def _box_pixels(hb: np.ndarray) -> np.ndarray:
    """Host boxes (..., 4) -> (...) their pixels."""
    return (hb[..., 2] - hb[..., 0]) * (hb[..., 3] - hb[..., 1])


def _first_kept_host(kept_h: np.ndarray, host: np.ndarray, k: int) -> np.ndarray:
    """The host's copy of mask_nms's kept boxes: kept_h (B, N) bool, host (B, N, 4) boxes ->
    (B, K, 4) the boxes of each row's first k kept positions in order, zero past them (as
    nms.first_kept's positions with the unreal ones' boxes zeroed)."""
    first = np.argsort(~kept_h, axis=1, kind="stable")[:, :k]  # (B, K) kept positions first, in order
    real = np.take_along_axis(kept_h, first, 1)
    return np.take_along_axis(host, first[..., None], 1) * real[..., None]


def _chunked_intersections(batch: WindowBatch, src: torch.Tensor, kpos: torch.Tensor, values: torch.Tensor,
                           pixels: torch.Tensor, gb: torch.Tensor, rstart: torch.Tensor, kept_hb: np.ndarray,
                           budget: int, m: int, stride: int, threshold: float, dtype: torch.dtype,
                           pixel_budget: int, pair_budget: int) -> Steps[torch.Tensor]:
    """intersections when the kept masks are not stored: they are pasted again from their windows,
    a chunk at a time (consecutive kept masks in (B, K) order, `budget` box pixels, a mask larger
    than it alone), behind the round's windows `values` in a temporary store; each chunk reads only
    the pairs of its masks (the first one also the round's own pairs), so the sum is every pair's.

    src: (B, N) candidate index per position; kpos: (B, K) kept positions (nms.first_kept);
    values: the round's masks flat at offsets rstart (B, R); pixels: (B, R, G) candidate pairs'
    box pixels; gb: (B, G, 4) boxes (unreal kept columns zero); kept_hb: (B, K, 4) gb's first K
    columns on the host. One host read per chunk (intersections). Returns (B, R, G) long."""
    b, k = kpos.shape
    dev = gb.device
    n = b * k
    idx = take(src, kpos)  # (B, K) the kept masks' windows
    grids = [take(t, idx).reshape(n, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor)]
    kb, khost = gb[:, :k].reshape(n, 4), kept_hb.reshape(n, 4)
    item = torch.arange(n, device=dev)
    inter = torch.zeros_like(pixels)
    chunks = yield Host(step_ranges, _box_pixels(khost), budget)
    for i, (lo, hi) in enumerate(chunks):
        chunk, _, chunk_at, _ = yield from _paste_items(*(g[lo:hi] for g in grids), kb[lo:hi], khost[lo:hi], m, stride, threshold,
                                          dtype, pixel_budget)
        mine = (item >= lo) & (item < hi)  # (n,) this chunk's kept masks
        offset = torch.zeros(n, dtype=torch.long, device=dev)
        offset[lo:hi] = len(values) + chunk_at
        gs = torch.cat([offset.reshape(b, k), rstart], 1)  # (B, G) store offsets (others: unused)
        cols = torch.cat([mine.reshape(b, k), torch.full_like(rstart, i == 0, dtype=torch.bool)], 1)  # (B, G)
        inter += intersections(torch.cat([values, chunk]), pixels * cols[:, None, :], gb, gs, k, pair_budget)
    return inter


def _round_widths(n_alive: np.ndarray, done: np.ndarray, count: np.ndarray, cap: int, most: int,
                  cum: np.ndarray, pixels: int) -> np.ndarray:
    """Windows each image takes in the next round (host, (B,) ints; 0: it is finished): what it
    likely needs to fill its room at the keep rate it has had so far, with a margin, at most `most`,
    and with box pixels within an equal share of `pixels` over the unfinished images (cum: (B, N + 1)
    cumulative box pixels per position), at least one window. Any width gives the same result (the
    greedy rule runs in order); this one keeps rounds few and pastes few windows past the end."""
    rate = np.where(done > 0, count / np.maximum(done, 1), 1.0)
    need = np.ceil((cap - count) / np.maximum(rate, 0.05) * 1.25) + 16
    width = np.minimum(np.minimum(need, most), n_alive - done).astype(np.int64)
    width = np.where(count < cap, np.maximum(width, 0), 0)
    share = max(0, pixels) // max(1, int((width > 0).sum()))
    # the most windows from `done` whose box pixels fit the share (searchsorted per image, B small)
    fits = np.array([np.searchsorted(row, row[d] + share, side="right") - 1 - d for row, d in zip(cum, done)],
                    dtype=np.int64).reshape(width.shape)
    return np.where(width > 0, np.clip(fits, 1, None), 0).clip(max=width)


def _exclusive_cumsum(t: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n,) sums of the items before each."""
    return torch.cumsum(t, 0) - t


def _paste_round(batch: WindowBatch, idx: torch.Tensor, boxes: torch.Tensor, host_boxes: np.ndarray, m: int,
                 stride: int, threshold: float, dtype: torch.dtype, budget: int
                 ) -> Steps[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Projections]]:
    """Windows idx (B, R) of the batch pasted over their boxes (B, R, 4) (empty: nothing), `budget`
    padded pixels a step (_paste_items). Returns (values (T,) bool: each box's pixels column-major,
    boxes back to back, (B, R) long mask areas, (B, R) long each box's offset in values, their
    projections (at: (B, R, 2)))."""
    b, r = idx.shape
    n = b * r
    probs, cells, factor = (take(t, idx).reshape(n, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor))
    values, areas, offsets, proj = yield from _paste_items(probs, cells, factor, boxes.reshape(n, 4),
                                                           host_boxes.reshape(n, 4), m, stride, threshold, dtype, budget)
    return values, areas.reshape(b, r), offsets.reshape(b, r), Projections(proj.cols, proj.rows, proj.at.reshape(b, r, 2))


def _paste_items(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
                 host_boxes: np.ndarray, m: int, stride: int, threshold: float, dtype: torch.dtype, budget: int
                 ) -> Steps[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Projections]]:
    """Windows (n,) (their grids, boxes (n, 4) and the same on the host) pasted over their boxes:
    dense in blocks of similar sizes (_dense_plan, `budget` padded pixels a step), each box's pixels
    then taken out of its block column-major (one gather a step, at offsets the host knows: no sync),
    and the mask's pixels per box column and per box row (sums over the blocks: their outputs only).
    Returns (values (T,) bool, boxes back to back in the plan's order, (n,) long mask areas, (n,)
    long each box's offset in values, the projections)."""
    dev = boxes.device
    n = len(boxes)
    plan = yield Host(paste_plan, host_boxes, budget, MASK_DENSE_GROUPS, True)
    areas = torch.zeros(n, dtype=torch.long, device=dev)
    offsets, side_offsets = upload(plan.offsets, dev), upload(plan.side_offsets, dev)
    if not len(plan.order):
        none = torch.zeros(0, dtype=torch.int32, device=dev)
        return torch.zeros(0, dtype=torch.bool, device=dev), areas, offsets, Projections(none, none, side_offsets)
    at = upload(plan.order, dev)
    pb = boxes[at]
    parts, step_areas, cols, rows = [], [], [], []
    for (groups, buffer, part_areas), pixels, (n_cols, n_rows) in zip(
            dense_steps(probs[at], cells[at], factor[at], pb, plan.steps, m, stride, threshold, dtype),
            plan.step_pixels, plan.step_sides):
        inside, base = torch.empty_like(buffer), 0
        col_sums, row_sums, col_in, row_in = [], [], [], []
        for lo, hi, gw, gh in groups:  # the box pixels of each block: x < w and 1 <= y <= h
            view = buffer[base:base + (hi - lo) * gw * (gh + 2)].view(hi - lo, gw, gh + 2)
            bw, bh = (pb[lo:hi, 2] - pb[lo:hi, 0])[:, None], (pb[lo:hi, 3] - pb[lo:hi, 1])[:, None]
            y = torch.arange(gh + 2, device=dev)
            xs, ys = torch.arange(gw, device=dev)[None, :] < bw, (y >= 1) & (y <= bh)  # (n_g, W), (n_g, H + 2)
            torch.logical_and(xs[:, :, None], ys[:, None, :], out=inside[base:base + view.numel()].view(view.shape))
            col_sums.append(view.sum(2, dtype=torch.int32).reshape(-1))
            row_sums.append(view.sum(1, dtype=torch.int32).reshape(-1))
            col_in.append(xs.reshape(-1))
            row_in.append(ys.reshape(-1))
            base += view.numel()
        parts.append(buffer[torch.nonzero_static(inside, size=pixels).reshape(-1)])
        for out, sums, keep, size in ((cols, col_sums, col_in, n_cols), (rows, row_sums, row_in, n_rows)):
            out.append(torch.cat(sums)[torch.nonzero_static(torch.cat(keep), size=size).reshape(-1)])
        step_areas.append(part_areas)
    areas.index_copy_(0, at, torch.cat(step_areas))
    return torch.cat(parts), areas, offsets, Projections(torch.cat(cols), torch.cat(rows), side_offsets)


def _kept_pixels(store: torch.Tensor, base: int, keep: torch.Tensor, box_area: torch.Tensor, rstart: torch.Tensor,
                 total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops a round's windows from the store but the kept ones, so it holds kept masks only.

    store: the kept masks (first `base` pixels), then the round's; keep, box_area, rstart: (B, R)
    the round's kept windows, box pixels and store offsets; total: the kept ones' box pixels (host).
    Returns the new store and (B, R) the kept windows' offsets in it (others: anything). The round's
    pixels keep their order (a kept mask per pixel, then one nonzero_static of the host-known size:
    ~10 bytes written a round pixel, not ~50 for per-pixel offsets)."""
    order = torch.argsort(rstart.reshape(-1))  # (n,) the round's windows in store order (back to back)
    lengths, kept = box_area.reshape(-1)[order], keep.reshape(-1)[order]
    mask = torch.repeat_interleave(kept, lengths, output_size=len(store) - base)  # (round pixels,)
    at = torch.nonzero_static(mask, size=total).reshape(-1)  # in the round's part (a view: no offset added)
    first = torch.zeros_like(lengths).index_copy_(0, order, _exclusive_cumsum(torch.where(kept, lengths, 0)))
    return torch.cat([store[:base], store[base:][at]]), (base + first).reshape(keep.shape)
