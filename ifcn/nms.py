"""Greedy box NMS for every image of a batch at once (torch), sync-light.

Every window of a batch sits in one padded (B, N) layout in score order; the (B, N, N) matrix
of "j (earlier) suppresses i" comes from box IoUs in row blocks of a fixed element budget, and the
greedy rule's kept set is its fixed point: `kept = alive & ~any(suppress & kept)`, reached after as
many sweeps as the longest chain of suppressions. The host checks convergence only after rounds
of sweeps that double in length, so a batch costs a handful of syncs, none per window or image.
"""
from __future__ import annotations

import torch

# float64 IoU elements one block materialises (a few temporaries each), by device type: bounds
# memory at any batch (a batch of 16 with the paper's 6000 windows each: 5 blocks on a GPU).
IOU_BLOCK = {"cuda": 1 << 27, "cpu": 1 << 24}
FIRST_SWEEPS = 8  # sweeps before the first convergence check; each later round doubles


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., n, 4), (..., k, 4) boxes (x0, y0, x1, y1) -> (..., n, k) float64 IoU, the reference's
    float ops: inter / max(area_a + area_b - inter, 1)."""
    a, b = a.double(), b.double()
    lo = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (hi - lo).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1.0)


def suppression(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes: (B, N, 4) in score order -> (B, N, N) bool, [b, i, j] = j < i and IoU > threshold."""
    batch, n = boxes.shape[:2]
    out = torch.empty((batch, n, n), dtype=torch.bool, device=boxes.device)
    rows = max(1, IOU_BLOCK.get(boxes.device.type, IOU_BLOCK["cuda"]) // max(1, batch * n))
    for lo in range(0, n, rows):
        out[:, lo:lo + rows] = box_iou(boxes[:, lo:lo + rows], boxes) > iou_threshold
    return out.tril_(diagonal=-1)


def greedy_keep(suppress: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Greedy NMS from a suppression matrix without a sequential loop.

    suppress: (..., n, n) bool, [i, j] = earlier item j would suppress i (only j < i is read);
    alive: (..., n) bool. Returns (..., n) bool: i kept iff alive and no kept j < i suppresses it."""
    suppress = torch.tril(suppress, diagonal=-1) & alive[..., None, :]
    kept = alive.clone()
    sweeps = FIRST_SWEEPS
    while True:
        for _ in range(sweeps):
            prev, kept = kept, alive & ~(suppress & kept[..., None, :]).any(-1)
        if not bool((prev != kept).any()):  # one host sync per round
            return kept
        sweeps *= 2


def first_kept(kept: torch.Tensor, max_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kept: (B, N) bool -> the positions of each row's first `max_keep` kept items, (B, K) long in
    order with K = min(max_keep, N), and (B, K) bool which of those are real (no sync)."""
    n = kept.shape[1]
    pos = torch.arange(n, device=kept.device)
    key = torch.where(kept, n - pos, 0)  # the earliest kept item has the largest key
    top = torch.topk(key, min(max_keep, n), dim=1)
    return torch.where(top.values > 0, n - top.values, 0), top.values > 0


def box_nms(boxes: torch.Tensor, alive: torch.Tensor, iou_threshold: float, max_keep: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS on tight boxes in score order, every image at once.

    boxes: (B, N, 4) long (x0, y0, x1, y1); alive: (B, N) bool. Returns (B, K) positions of the kept
    items, best first, and (B, K) bool which are real (K = min(max_keep, N))."""
    return first_kept(greedy_keep(suppression(boxes, iou_threshold), alive), max_keep)
