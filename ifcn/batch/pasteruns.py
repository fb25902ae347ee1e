"""The kept windows pasted dense and read as COCO run lengths, on the windows' device: each step of a
paste plan (ifcn.batch.pasteplan) pasted into one flat buffer of blocks (paste.paste_dense; dense_steps),
the mask areas, the run events of each step (where a pixel differs from the one before it;
_step_events) and every window's counts (_counts), then the per-image Proposals on the host
(_assemble). `paste_proposals` strings them together for the kept windows of a batch.

Host syncs: one read of the kept boxes (the plan), one per step (its run events), two for the
results. Shapes: B images, K kept windows each (n = B K), n' of them with pixels (plan order).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ifcn.ops.paste import paste_dense
from ifcn.ops.upload import upload

from .containers import Proposals, WindowBatch
from .hostwork import Host, Steps
from .pasteplan import DENSE_GROUPS, paste_plan
from .tightboxes import take


def paste_proposals(batch: WindowBatch, idx: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor, m: int,
                    stride: int, threshold: float, dtype: torch.dtype, pixel_budget: int) -> Steps[list[Proposals]]:
    """Kept windows idx (B, K) (real: (B, K) bool) with tight boxes (B, K, 4) -> Proposals: pastes them
    dense in groups of similar box sizes (paste.paste_dense, `pixel_budget` padded pixels a step) for
    their areas and run lengths. Host work (yielded): the paste plan, then the per-image arrays."""
    b, k = idx.shape
    scores, scale = take(batch.scores, idx), take(batch.scale, idx)
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
        at = upload(plan.order, dev)  # (n',) the pasted windows in plan order
        flat_idx = idx.reshape(n)[at] + torch.div(at, k, rounding_mode="floor") * batch.scores.shape[1]
        probs, cells, factor = (t.reshape(-1, *t.shape[2:])[flat_idx] for t in (batch.probs, batch.cells, batch.factor))
        pb, phw = boxes.reshape(n, 4)[at], hw[at]
        areas = []
        for (_, buffer, step_areas), table in zip(dense_steps(probs, cells, factor, pb, plan.steps, m, stride,
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
    """The host's half of paste_proposals: head (B, K, 7) (real, score, box, scale), tail (B K, 2) (area,
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


def dense_steps(probs: torch.Tensor, cells: torch.Tensor, factor: torch.Tensor, boxes: torch.Tensor,
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
    offset, first, width, height = upload(table, dev)  # (G,) each: block offset, first plan position, W, H + 2
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
    # each window's run ends, back to back (its kept events' positions, then its image's end; dropped
    # events: the unused last slot), and the counts their differences: no sort and no running maximum
    ends = torch.empty(len(where) + n + 1, dtype=ix, device=dev)  # every used slot is written below
    ends.index_put_((torch.where(keep, start[who] + rank, len(where) + n),), where)
    ends.index_put_((start + changes,), pixels)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    counts.index_put_((start,), ends[start])  # a window's first run starts at 0
    return counts, lengths.long()
