"""How the kept windows are pasted (host planning, numpy): the order of the windows with pixels, cut
into blocks of similar box sizes (least padding, dynamic programming) and steps within a pixel
budget, with each step's table for reading its run events (PastePlan, paste_plan); and `step_ranges`,
consecutive ranges of items within a budget. ifcn.batch.pasteruns and ifcn.batch.masknms carry the plans out
on the device (pasteruns.dense_steps); the planning is yielded to the caller's thread (ifcn.batch.hostwork).

Shapes: n windows, boxes (n, 4) (x0, y0, x1, y1) in image pixels; a group (lo, hi, W, H) is plan
positions [lo, hi) pasted as one (hi - lo, W, H + 2) block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Kept windows are pasted dense (paste.paste_dense) in at most this many blocks of similar box sizes
# (each ~30 ops), cut where they least pad, over cut points at equal counts of windows.
DENSE_GROUPS, DENSE_CUT_POINTS = 12, 128
# ... and mask NMS's pastes (each round, each chunk of kept masks) in fewer: they are many (structured
# heads at the paper's defaults: 4 blocks write 2% more than 12, with ~15% fewer ops a batch).
MASK_DENSE_GROUPS = 4


@dataclass(frozen=True)
class PastePlan:
    """How paste_dense takes a set of windows (host arrays; paste_plan).

    order: (n',) the windows with pixels, in paste order; steps: per step its groups (lo, hi, W, H),
    positions in that order (_dense_plan); tables: per step (4, G) int32 or int64 each group's offset
    in the step's buffer, first position, W and H + 2 (pasteruns._step_events; int32 where the images
    and the step have fewer than 2^31 pixels); step_pixels: per step its windows' box pixels; offsets: (n,)
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
        for a, z in step_ranges(np.full(hi - lo, per), budget):  # a block over the budget: in several
            if step and used + (z - a) * per > budget:
                steps.append(step)
                step, used = [], 0
            step.append((lo + a, lo + z, width, height))
            used += (z - a) * per
    steps.append(step)
    return ids, steps


def step_ranges(area: np.ndarray, budget: int) -> list[tuple[int, int]]:
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
