"""The per-pixel half of inference for a whole batch at once, on the windows' device (torch):

    tight boxes of the windows NMS reaches (boxes.tight_boxes, from the m x m grids: no pasting)
    NMS of every image at once: box IoU (nms.box_nms) or mask IoU (mask_nms, in rounds)
    the kept windows pasted dense in blocks of similar box sizes, their areas and run lengths
    (paste.paste_dense; _dense_plan, _step_events, _counts)

One chain of ops per batch: its length does not grow with the number of images, windows or kept
masks, except one more step per memory budget (`pixel_budget` pixels pasted, IOU_BLOCK pair
bounds, PAIR_PIXEL_BUDGET intersection pixels) and, for mask NMS, one more round per MASK_ROUND
windows of the score order that an image needs before it has `max_proposals` kept (or per share of
STORE_PIXEL_BUDGET box pixels, and one chunk step per such share of kept masks past half of it). Host syncs per
batch: the NMS convergence checks (a few), one read of the kept boxes (to plan the pasting), one
per paste step (the number of run events) and two reads of results; mask NMS adds one read of the first
round's boxes (to plan its pasting) and four a round (the candidate pairs left by the projection
bound, their intersections, the greedy rule's check, the kept windows with the next round's boxes),
one more a chunk where its kept masks pass half of STORE_PIXEL_BUDGET and are pasted again in chunks.
float64 gives the numpy reference's proposals exactly; float32 (the default) differs only for
pixels within rounding of the threshold. The host planning between device steps (paste plans, mask
NMS's rounds and chunks, the per-image arrays) is yielded (`postprocess_steps`, ifcn.hostwork), so
the actor runs it on its calling thread and its device thread only launches device work.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .boxes import search_steps, tight_boxes
from .config import InferenceConfig
from .containers import Proposals, WindowBatch
from .hostwork import Host, Steps, drive
from .nms import IOU_BLOCK, box_nms_rounds, box_overlap, first_kept, greedy_keep
from .opcount import stage
from .paste import paste_dense
from .upload import upload

# Kept-mask pixels pasted per step (per batch, padded blocks of paste.paste_dense), by device type:
# bounds the step's buffers (~10 bytes a padded pixel at the peak: 2.7 GB on a GPU) whatever the
# images; a batch beyond it pastes in several steps (one host sync each). 480x640 images keep ~25-30 k
# box pixels per proposal at the paper's defaults (~30 M per image, ~45 M padded), so a batch of 16
# takes three steps on a GPU. Mask NMS pastes its rounds' windows in steps of the same budget.
PIXEL_BUDGET = {"cuda": 1 << 28, "cpu": 1 << 25}
# Kept windows are pasted dense (paste.paste_dense) in at most this many blocks of similar box sizes
# (each ~30 ops), cut where they least pad, over cut points at equal counts of windows.
DENSE_GROUPS, DENSE_CUT_POINTS = 12, 128
# ... and mask NMS's pastes (each round, each chunk of kept masks) in fewer: they are many (structured
# heads at the paper's defaults: 4 blocks write 2% more than 12, with ~15% fewer ops a batch).
MASK_DENSE_GROUPS = 4
# Windows whose tight boxes one call computes (~1.5 kB each in float32): bounds that memory.
WINDOW_BLOCK = 1 << 16
# Mask NMS: windows per image that one round settles, by device type. A round holds their masks
# (1 byte a pixel) and a (B, R, K + R) pair matrix against the K = max_proposals kept so far, so
# R bounds that memory; windows past the point where an image has max_proposals kept are never
# pasted. The paper's 6000 windows per image take at most six rounds on a GPU.
MASK_ROUND = {"cuda": 1024, "cpu": 256}
# Mask NMS: the candidate pairs' intersections read a quarter as many 32-pixel words a step (~75 bytes
# a budget unit at the peak; a step held as many pixels at ~100 bytes each before they were packed).
PAIR_PIXEL_BUDGET = {"cuda": 1 << 27, "cpu": 1 << 23}
# Mask NMS: box pixels (1 byte each) its flat store holds per batch, by device type: 2 GB on a GPU
# (a batch of 16 480x640 images needs ~1 GB, so it stays on the stored path) and 128 MB on a CPU.
# A round's windows get what the kept masks leave (at least half); kept masks past half of it are
# not stored but re-pasted in chunks of the rest for each round (`_chunked_intersections`).
STORE_PIXEL_BUDGET = {"cuda": 1 << 31, "cpu": 1 << 27}


def _budget(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cuda"])


def postprocess_batch(batch: WindowBatch, config: InferenceConfig, m: int, stride: int,
                      dtype: torch.dtype = torch.float32, pixel_budget: int | None = None) -> list[Proposals]:
    """Every image's proposals, best first (what ops.paste_masks + GreedyMaskNMS + crop_runs give).
    pixel_budget: pixels pasted per step (None: PIXEL_BUDGET of the device type). Everything on this
    thread; `postprocess_steps` is the same routine with its host planning handed out (ifcn.hostwork)."""
    return drive(postprocess_steps(batch, config, m, stride, dtype, pixel_budget))


def postprocess_steps(batch: WindowBatch, config: InferenceConfig, m: int, stride: int,
                      dtype: torch.dtype = torch.float32, pixel_budget: int | None = None) -> Steps[list[Proposals]]:
    """postprocess_batch as a device routine (ifcn.hostwork): it yields its host planning (paste blocks
    and steps, mask NMS's rounds, the per-image arrays) as Host items, so a driver can run them on
    another thread than the one launching the device work."""
    b, c = batch.scores.shape
    if c == 0:
        return [Proposals.empty(s) for s in batch.image_sizes]
    if pixel_budget is None:
        pixel_budget = _budget(PIXEL_BUDGET, batch.scores.device)
    live = batch.valid & (batch.scores >= config.min_score)
    # score order, ties in candidate order (as the reference's stable argsort); the rest at the end
    order = torch.argsort(torch.where(live, -batch.scores.double(), torch.inf), dim=1, stable=True)
    live = live.gather(1, order)  # (B, C) in score order
    if config.nms == "mask":
        with stage("nms"):
            pos, real, kept_boxes = yield from mask_nms(batch, order, live, config, m, stride, dtype, pixel_budget)
    else:
        def fetch(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Tight boxes (B, R, 4) of score positions [lo, hi) and which are alive (B, R)."""
            with stage("tight_boxes"):
                rb = _tight_boxes_at(batch, order[:, lo:hi], config, m, stride, dtype)
            return rb, live[:, lo:hi] & (rb[..., 2] > rb[..., 0])  # empty masks take no part

        with stage("nms"):
            coords = torch.int16 if max(max(s) for s in batch.image_sizes) < 2 ** 15 else torch.int64
            pos, real, kept_boxes = box_nms_rounds(fetch, (b, c), config.nms_iou, config.max_proposals, dtype,
                                                   limit=live.sum(1), coords=coords)
    idx = order.gather(1, pos)
    with stage("paste_runs"):
        return (yield from _finish(batch, idx, real, kept_boxes, m, stride, config.mask_threshold, dtype,
                                   pixel_budget))


def _tight_boxes_at(batch: WindowBatch, idx: torch.Tensor, config: InferenceConfig, m: int, stride: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(B, R, 4) long tight boxes of the windows idx (B, R), WINDOW_BLOCK windows a call."""
    b, r = idx.shape
    steps = search_steps(batch.min_factor, stride)
    probs, cells, factor = (_take(t, idx).reshape(b * r, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor))
    hw = batch.image_hw[:, None, :].expand(b, r, 2).reshape(-1, 2)
    return torch.cat([tight_boxes(probs[lo:lo + WINDOW_BLOCK], cells[lo:lo + WINDOW_BLOCK], factor[lo:lo + WINDOW_BLOCK],
                                  hw[lo:lo + WINDOW_BLOCK], m, stride, config.mask_threshold, steps, dtype)
                      for lo in range(0, b * r, WINDOW_BLOCK)]).reshape(b, r, 4)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t: (B, C, ...) -> (B, K, ...) at each row's indices idx (B, K)."""
    b, k = idx.shape
    return t.gather(1, idx.reshape(b, k, *([1] * (t.dim() - 2))).expand(b, k, *t.shape[2:]))


def _finish(batch: WindowBatch, idx: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor, m: int, stride: int,
            threshold: float, dtype: torch.dtype, pixel_budget: int) -> Steps[list[Proposals]]:
    """Kept windows idx (B, K) (real: (B, K) bool) with tight boxes (B, K, 4) -> Proposals: pastes them
    dense in groups of similar box sizes (paste.paste_dense, `pixel_budget` padded pixels a step) for
    their areas and run lengths. Host work (yielded): the paste plan, then the per-image arrays."""
    b, k = idx.shape
    scores, scale = _take(batch.scores, idx), _take(batch.scale, idx)
    head = torch.cat([real[..., None].double(), scores[..., None].double(), boxes.double(), scale[..., None].double()], 2)
    head = head.numpy(force=True)  # (B, K, 7): one host read plans the pasting
    n = b * k
    ix = torch.int32 if max(h * w for h, w in batch.image_sizes) < 2 ** 31 - 1 else torch.long  # run positions
    plan = yield Host(paste_plan, head[..., 2:6].reshape(n, 4), pixel_budget, DENSE_GROUPS, ix == torch.int32)
    dev = boxes.device
    pixels = torch.zeros(n, dtype=torch.long, device=dev)
    hw = batch.image_hw[:, None, :].expand(b, k, 2).reshape(n, 2)
    events: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (plan position, full-image position) per event
    at = None
    if len(plan.order):
        at = _upload(plan.order, dev)  # (n',) the pasted windows in plan order
        flat_idx = idx.reshape(n)[at] + torch.div(at, k, rounding_mode="floor") * batch.scores.shape[1]
        probs, cells, factor = (t.reshape(-1, *t.shape[2:])[flat_idx] for t in (batch.probs, batch.cells, batch.factor))
        pb, phw = boxes.reshape(n, 4)[at], hw[at]
        areas = []
        for (_, buffer, step_areas), table in zip(_dense_steps(probs, cells, factor, pb, plan.steps, m, stride,
                                                               threshold, dtype), plan.tables):
            areas.append(step_areas)
            events.append(_step_events(buffer, table, pb, phw))
        pixels.index_copy_(0, at, torch.cat(areas))
    counts, lengths = _counts(events, at, n, hw)
    tail = torch.stack([pixels, lengths], 1).numpy(force=True)  # (n, 2)
    runs = counts.numpy(force=True)
    return (yield Host(_assemble, head, tail, runs, batch.image_sizes))


def _assemble(head: np.ndarray, tail: np.ndarray, runs: np.ndarray, image_sizes: list[tuple[int, int]]
              ) -> list[Proposals]:
    """The host's half of _finish: head (B, K, 7) (real, score, box, scale), tail (B K, 2) (area,
    run count), runs (the counts of every window back to back) -> each image's Proposals."""
    k = head.shape[1]
    runs_at = np.concatenate([[0], np.cumsum(tail[:, 1])])
    out = []
    for i, size in enumerate(image_sizes):
        nk = int((head[i, :, 0] > 0).sum())  # real ones first (nms.first_kept)
        h, ln = head[i, :nk], tail[i * k:i * k + nk, 1]
        rows = slice(i * k, i * k + nk)
        counts_i = runs[runs_at[i * k]:runs_at[i * k + nk]]
        xywh = np.concatenate([h[:, 2:4], h[:, 4:6] - h[:, 2:4]], 1)
        out.append(Proposals(tuple(size), h[:, 1].astype(np.float32), xywh.astype(np.float32), tail[rows, 0].astype(np.int64),
                             h[:, 6].astype(np.int32), counts_i.astype(np.uint32), ln.astype(np.int32)))
    return out


@dataclass(frozen=True)
class PastePlan:
    """How paste_dense takes a set of windows (host arrays; paste_plan).

    order: (n',) the windows with pixels, in paste order; steps: per step its groups (lo, hi, W, H),
    positions in that order (_dense_plan); tables: per step (4, G) int32 or int64 each group's offset
    in the step's buffer, first position, W and H + 2 (_step_events; int32 where the images and the
    step have fewer than 2^31 pixels); step_pixels: per step its windows' box pixels; offsets: (n,)
    each window's offset in its box pixels laid back to back in paste order (0 for empty ones); the
    same for its box columns and rows (side_offsets: mask_nms's projections)."""

    order: np.ndarray
    steps: list[list[tuple[int, int, int, int]]]
    tables: list[np.ndarray]
    step_pixels: list[int]
    offsets: np.ndarray
    sides: np.ndarray  # (n, 2) each window's box width and height
    side_offsets: np.ndarray  # (n, 2) each window's offset in its columns, and in its rows, laid back to back in paste order
    step_sides: list[tuple[int, int]]  # per step its windows' columns and rows


def paste_plan(boxes: np.ndarray, budget: int, groups: int, ix32: bool) -> PastePlan:
    """The paste plan (host) of windows with boxes (n, 4) (x0, y0, x1, y1), `budget` padded pixels a step
    in at most `groups` blocks (_dense_plan); ix32: the images have fewer than 2^31 pixels."""
    hb = boxes.astype(np.int64)
    w, h = hb[:, 2] - hb[:, 0], hb[:, 3] - hb[:, 1]
    order, steps = _dense_plan(w, h, budget, groups)
    area = w * h
    offsets = np.zeros(len(hb), dtype=np.int64)
    offsets[order] = np.cumsum(area[order]) - area[order]
    sides = np.stack([w, h], 1)
    side_offsets = np.zeros_like(sides)
    side_offsets[order] = np.cumsum(sides[order], 0) - sides[order]
    steps = steps if len(order) else []
    step_pixels = [int(sum(area[order[lo:hi]].sum() for lo, hi, _, _ in step)) for step in steps]
    step_sides = [tuple(int(v) for v in sum(sides[order[lo:hi]].sum(0) for lo, hi, _, _ in step)) for step in steps]
    return PastePlan(order, steps, [step_table(step, ix32) for step in steps], step_pixels, offsets, sides, side_offsets,
                     step_sides)


def step_table(groups: list[tuple[int, int, int, int]], ix32: bool) -> np.ndarray:
    """(4, G) a step's groups (lo, hi, W, H): each one's offset in the step's buffer, first position, W
    and H + 2, in int32 where ix32 (the images have fewer than 2^31 pixels) and the step does too."""
    sizes = [(hi - lo) * w * (h + 2) for lo, hi, w, h in groups]
    small = ix32 and sum(sizes) < 2 ** 31 - 1
    return np.array([[off, lo, w, h + 2] for off, (lo, _, w, h) in zip(np.cumsum([0] + sizes[:-1]), groups)],
                    dtype=np.int32 if small else np.int64).T.copy()


def _dense_plan(w: np.ndarray, h: np.ndarray, budget: int, groups: int = DENSE_GROUPS
                ) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """How paste_dense takes the windows with pixels (host): their order (largest side first) and the
    steps, each a list of groups (lo, hi, W, H) of consecutive windows in that order pasted as one
    (hi - lo, W, H + 2) block; a step's blocks within `budget` pixels (a block larger than it alone).
    The cuts are the `groups` - 1 that least pad, over cut points at equal counts (dynamic programming)."""
    ids = np.flatnonzero(w * h > 0)
    ids = ids[np.argsort(-np.maximum(w, h)[ids], kind="stable")]
    if not len(ids):
        return ids, []
    sw, sh = w[ids], h[ids]
    cuts = np.unique(np.linspace(0, len(ids), min(len(ids), DENSE_CUT_POINTS) + 1).round().astype(np.int64))
    p = len(cuts)
    cost = np.full((p, p), np.inf)  # cost[i, j]: windows cuts[i]:cuts[j] as one block
    for i in range(p - 1):
        seg = slice(cuts[i], None)
        mw, mh = np.maximum.accumulate(sw[seg]), np.maximum.accumulate(sh[seg])
        ends = cuts[i + 1:] - cuts[i]
        cost[i, i + 1:] = ends * mw[ends - 1] * (mh[ends - 1] + 2)
    best = np.where(np.arange(p) == 0, 0.0, np.inf)  # best[j]: windows before cuts[j] in g blocks
    back = []
    for _ in range(min(groups, p - 1)):
        total = best[:, None] + cost  # (p, p): the last block from cuts[i] to cuts[j]
        back.append(np.argmin(total, 0))
        best = total.min(0)
    bounds, j = [], p - 1
    for choice in reversed(back):  # splitting a block never pads more: every block is used
        bounds.append((int(cuts[choice[j]]), int(cuts[j])))
        j = choice[j]
    steps, step, used = [], [], 0
    for lo, hi in reversed(bounds):
        width, height = int(sw[lo:hi].max()), int(sh[lo:hi].max())
        per = width * (height + 2)
        for a, z in _steps(np.full(hi - lo, per), budget):  # a block over the budget: in several
            if step and used + (z - a) * per > budget:
                steps.append(step)
                step, used = [], 0
            step.append((lo + a, lo + z, width, height))
            used += (z - a) * per
    steps.append(step)
    return ids, steps


def _dense_steps(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
                 steps: list[list[tuple[int, int, int, int]]], m: int, stride: int, threshold: float,
                 dtype: torch.dtype) -> Iterator[tuple[list[tuple[int, int, int, int]], torch.Tensor, torch.Tensor]]:
    """Windows in plan order (their grids and boxes (n', 4)) pasted dense step by step (_dense_plan's
    steps): per step its groups, its blocks back to back in one flat bool buffer (each (hi - lo, W,
    H + 2), paste.paste_dense's layout) and (n_step,) long mask areas."""
    for groups in steps:
        buffer = torch.empty(sum((hi - lo) * w * (h + 2) for lo, hi, w, h in groups), dtype=torch.bool,
                             device=boxes.device)
        areas, base = [], 0
        for lo, hi, w, h in groups:
            v = buffer[base:base + (hi - lo) * w * (h + 2)].view(hi - lo, w, h + 2)
            paste_dense(probs[lo:hi], cells[lo:hi], factor[lo:hi], boxes[lo:hi], (w, h), m, stride, threshold, dtype,
                        out=v)
            areas.append(v.sum((1, 2)))
            base += v.numel()
        yield groups, buffer, torch.cat(areas)


def _step_events(buffer: torch.Tensor, table: np.ndarray, boxes: torch.Tensor, hw: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run events of one step's dense blocks (buffer: (n_g, W, H + 2) blocks back to back, each column
    between two zero rows; table: the step's PastePlan.tables entry): where a pixel differs from the
    one before it. Returns the plan position (E,) of each event's window and its full-image
    column-major position (E,), in plan order, in the table's integer type (int32 where images and
    the step have fewer than 2^31 pixels: half the bytes of int64). One host sync (nonzero)."""
    dev = buffer.device
    ix = torch.int32 if table.dtype == np.int32 else torch.long
    e = torch.nonzero(buffer[1:] != buffer[:-1]).reshape(-1).to(ix) + 1  # (E,) the first pixel after a change
    offset, first, width, height = _upload(table, dev)  # (G,) each: block offset, first plan position, W, H + 2
    g = torch.searchsorted(offset, e, right=True, out_int32=ix == torch.int32) - 1
    local = e - offset[g]
    step = height[g]
    column = torch.div(local, step, rounding_mode="floor")  # window-in-block * W + x
    y = local - column * step - 1
    w = width[g]
    win = torch.div(column, w, rounding_mode="floor")
    pos = first[g] + win
    corner = boxes[:, :2].to(ix)[pos]  # (E, 2) x0, y0
    return pos, (corner[:, 0] + column - win * w) * hw[:, 0].to(ix)[pos] + corner[:, 1] + y


def _counts(events: list[tuple[torch.Tensor, torch.Tensor]], at: torch.Tensor | None, n: int, hw: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO counts of every window (n,) from its run events (per step: plan position, full-image
    position, in plan order, int32 or long; at: (n',) each plan position's window). A full-height
    box's columns follow each other directly: an event ending one column where the next starts one
    is no change (both go), and an event at the image's end is none. Returns (counts (E + n + 1,):
    window i's runs, background first, the lengths[i] after those of windows < i, then unused;
    lengths (n,) long)."""
    dev = hw.device
    if not events or at is None:
        return hw[:, 0] * hw[:, 1], torch.ones(n, dtype=torch.long, device=dev)
    pos, where = (torch.cat(t) for t in zip(*events))  # (E,), (E,)
    ix = where.dtype
    pixels = (hw[:, 0] * hw[:, 1]).to(ix)
    who = at.to(ix)[pos]  # (E,) window
    same_next = torch.cat([(pos[1:] == pos[:-1]) & (where[1:] == where[:-1]), pos.new_zeros(1, dtype=torch.bool)])
    same_prev = torch.cat([pos.new_zeros(1, dtype=torch.bool), same_next[:-1]])
    keep = ~(same_next | same_prev) & (where < pixels[who])
    changes = torch.zeros(n, dtype=ix, device=dev).index_add_(0, who, keep.to(ix))
    lengths = changes + 1
    start = torch.cumsum(lengths, 0, dtype=ix) - lengths  # (n,) each window's first count
    # rank among its window's kept events: plan order keeps a window's events together
    kept_at = torch.cumsum(keep, 0, dtype=ix) - 1  # (E,)
    plan_changes = changes[at]  # (n',)
    kept_before = torch.cumsum(plan_changes, 0, dtype=ix) - plan_changes  # (n',) kept events of earlier plan windows
    rank = kept_at - kept_before[pos]
    # the previous kept event's position in the same window (0 for the first): the running maximum
    # of (plan position, position) keys over the kept events, increasing in plan order (images below 2^40 pixels)
    key = torch.where(keep, (pos.long() << 40) + where, -1)  # (E,)
    last = torch.cummax(key, 0).values
    prev = torch.cat([last.new_full((1,), -1), last[:-1]])
    before = torch.where((prev >= 0) & ((prev >> 40) == pos), prev & ((1 << 40) - 1), 0).to(ix)
    counts = torch.zeros(len(where) + n + 1, dtype=ix, device=dev)
    dst = torch.where(keep, start[who] + rank, len(where) + n)  # dropped events: the unused last slot
    counts.index_put_((dst,), where - before)
    last_pos = torch.zeros(n, dtype=ix, device=dev).scatter_reduce(0, who.long(), torch.where(keep, where, 0), "amax")
    counts.index_put_((start + changes,), pixels - last_pos)
    return counts, lengths.long()


def _steps(area: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges covering all items, whose areas sum within `budget` (an item larger than it
    alone, with the empty items after it)."""
    out, lo, acc = [], 0, 0
    for i, a in enumerate(area.tolist()):
        if acc and acc + a > budget:
            out.append((lo, i))
            lo, acc = i, 0
        acc += a
    out.append((lo, len(area)))
    return out




# --------------------------------------------------------------------------- mask NMS, every image at once

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
    _candidate_pixels, _projection_filter), drops the windows a kept mask suppresses and runs the
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
    cap, k, most = config.max_proposals, min(config.max_proposals, c), _budget(MASK_ROUND, dev)
    budget = _budget(STORE_PIXEL_BUDGET, dev)
    n = c + most  # `most` dead positions past the end, so a round's positions never pass it
    src = torch.cat([order, order.new_zeros(b, most)], 1)  # (B, N) candidate index
    live = torch.cat([live, live.new_zeros(b, most)], 1)  # (B, N)
    boxes = torch.zeros((b, n, 4), dtype=torch.long, device=dev)  # tight boxes of the positions fetched (else 0)

    def fetch(span: np.ndarray) -> torch.Tensor:
        """Tight boxes (B, R, 4) of positions [start, start + count) of each image (span: (B, 2) host),
        zero past them and for dead positions and empty masks; also written into `boxes`."""
        r = int(span[:, 1].max())
        at = _upload(span, dev)  # (B, 2)
        ar = torch.arange(r, device=dev)
        pos = (at[:, :1] + ar).clamp(max=n - 1)  # (B, R)
        with stage("tight_boxes"):
            got = _tight_boxes_at(batch, src.gather(1, pos), config, m, stride, dtype)
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
        plan = _upload(plan_h, dev)  # (B, 3) positions done, this round's width, room
        ar = torch.arange(pos_h.shape[1], device=dev)
        pos = plan[:, :1] + ar  # (B, R) this round's positions
        inside = ar < plan[:, 1:2]  # (B, R)
        rb = torch.where(inside[..., None], _take(boxes, pos), 0)  # (B, R, 4)
        values, ra, roff, rproj = yield from _paste_round(batch, _take(src, pos), rb, hb, m, stride,
                                                          config.mask_threshold, dtype, pixel_budget)
        # projections of every window pasted so far (a few bytes a box side: never dropped)
        side_at.scatter_(1, pos[..., None].expand(b, len(ar), 2),
                         torch.stack([rproj.at[..., 0] + len(proj_cols), rproj.at[..., 1] + len(proj_rows)], 2))
        proj_cols, proj_rows = torch.cat([proj_cols, rproj.cols]), torch.cat([proj_rows, rproj.rows])
        base = len(store)  # the kept masks' pixels while stored, else 0
        box_area = (rb[..., 2] - rb[..., 0]) * (rb[..., 3] - rb[..., 1])  # (B, R)
        rstart = base + roff  # (B, R)
        kpos, kreal = first_kept(kept, k)  # (B, K) kept so far
        gb = torch.cat([torch.where(kreal[..., None], _take(boxes, kpos), 0), rb], 1)  # (B, G = K + R, 4)
        ga = torch.cat([_take(area, kpos), ra], 1)  # (B, G)
        pixels = _candidate_pixels(rb, ra, gb, ga, k, config.nms_iou)  # (B, R, G)
        pixels = _projection_filter(pixels, gb, ra, ga, Projections(proj_cols, proj_rows, _take(side_at, torch.cat(
            [kpos, pos], 1))), k, config.nms_iou)
        pair_budget = _budget(PAIR_PIXEL_BUDGET, dev)
        if stored:
            store = torch.cat([store, values])  # kept masks, then this round's windows
            gs = torch.cat([_take(start, kpos), rstart], 1)  # (B, G)
            inter = _intersections(store, pixels, gb, gs, k, pair_budget)  # (B, R, G)
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
    return pos, real, torch.where(real[..., None], _take(boxes, pos), 0)


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
    """_intersections when the kept masks are not stored: they are pasted again from their windows,
    a chunk at a time (consecutive kept masks in (B, K) order, `budget` box pixels, a mask larger
    than it alone), behind the round's windows `values` in a temporary store; each chunk reads only
    the pairs of its masks (the first one also the round's own pairs), so the sum is every pair's.

    src: (B, N) candidate index per position; kpos: (B, K) kept positions (nms.first_kept);
    values: the round's masks flat at offsets rstart (B, R); pixels: (B, R, G) candidate pairs'
    box pixels; gb: (B, G, 4) boxes (unreal kept columns zero); kept_hb: (B, K, 4) gb's first K
    columns on the host. One host read per chunk (_intersections). Returns (B, R, G) long."""
    b, k = kpos.shape
    dev = gb.device
    n = b * k
    idx = _take(src, kpos)  # (B, K) the kept masks' windows
    grids = [_take(t, idx).reshape(n, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor)]
    kb, khost = gb[:, :k].reshape(n, 4), kept_hb.reshape(n, 4)
    item = torch.arange(n, device=dev)
    inter = torch.zeros_like(pixels)
    chunks = yield Host(_steps, _box_pixels(khost), budget)
    for i, (lo, hi) in enumerate(chunks):
        chunk, _, chunk_at, _ = yield from _paste_items(*(g[lo:hi] for g in grids), kb[lo:hi], khost[lo:hi], m, stride, threshold,
                                          dtype, pixel_budget)
        mine = (item >= lo) & (item < hi)  # (n,) this chunk's kept masks
        offset = torch.zeros(n, dtype=torch.long, device=dev)
        offset[lo:hi] = len(values) + chunk_at
        gs = torch.cat([offset.reshape(b, k), rstart], 1)  # (B, G) store offsets (others: unused)
        cols = torch.cat([mine.reshape(b, k), torch.full_like(rstart, i == 0, dtype=torch.bool)], 1)  # (B, G)
        inter += _intersections(torch.cat([values, chunk]), pixels * cols[:, None, :], gb, gs, k, pair_budget)
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


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on the device without waiting for it (ifcn.upload)."""
    return upload(a, device)


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
    probs, cells, factor = (_take(t, idx).reshape(n, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor))
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
    offsets, side_offsets = _upload(plan.offsets, dev), _upload(plan.side_offsets, dev)
    if not len(plan.order):
        none = torch.zeros(0, dtype=torch.int32, device=dev)
        return torch.zeros(0, dtype=torch.bool, device=dev), areas, offsets, Projections(none, none, side_offsets)
    at = _upload(plan.order, dev)
    pb = boxes[at]
    parts, step_areas, cols, rows = [], [], [], []
    for (groups, buffer, part_areas), pixels, (n_cols, n_rows) in zip(
            _dense_steps(probs[at], cells[at], factor[at], pb, plan.steps, m, stride, threshold, dtype),
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


@dataclass(frozen=True)
class Projections:
    """Pasted masks' pixels per box column and per box row (mask_nms's tighter intersection bound).

    cols, rows: (Σw,), (Σh,) int32 every window's counts back to back; at: (n, 2) long each window's
    offset in cols and in rows."""

    cols: torch.Tensor
    rows: torch.Tensor
    at: torch.Tensor


def _candidate_pixels(rb: torch.Tensor, ra: torch.Tensor, gb: torch.Tensor, ga: torch.Tensor, k: int,
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
    rows = max(1, _budget(IOU_BLOCK, dev) // max(1, b * g))
    for lo in range(0, r, rows):
        overlap = box_overlap(rb[:, lo:lo + rows], gb)  # (B, rows, G) float64
        a, o = ra[:, lo:lo + rows, None].double(), ga[:, None, :].double()
        bound = torch.minimum(overlap, torch.minimum(a, o))
        near = (bound / (a + o - bound).clamp(min=1) > iou_threshold) & earlier[lo:lo + rows]
        out[:, lo:lo + rows] = torch.where(near, overlap.long(), 0)
    return out


def _projection_filter(pixels: torch.Tensor, gb: torch.Tensor, ra: torch.Tensor, ga: torch.Tensor, proj: Projections,
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


def _intersections(store: torch.Tensor, pixels: torch.Tensor, gb: torch.Tensor, gs: torch.Tensor, k: int,
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
