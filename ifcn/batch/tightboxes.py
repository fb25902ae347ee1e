"""Tight boxes of chosen windows of a batch, on the windows' device: boxes.tight_boxes from their m x m
grids (no pasting), WINDOW_BLOCK windows a call; and `take`, the per-image gather of a batch's
per-window fields (scores, grids, boxes) at chosen positions, which every step of the postprocess uses.

Shapes: B images, C windows each (WindowBatch), R chosen positions per image.
"""
from __future__ import annotations

import torch

from ifcn.config import InferenceConfig
from ifcn.ops.boxes import search_steps, tight_boxes

from .containers import WindowBatch

# Windows whose tight boxes one call computes (~1.5 kB each in float32): bounds that memory.
WINDOW_BLOCK = 1 << 16


def tight_boxes_at(batch: WindowBatch, idx: torch.Tensor, config: InferenceConfig, m: int, stride: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, R, 4) long tight boxes of the windows idx (B, R), WINDOW_BLOCK windows a call."""
    b, r = idx.shape
    steps = search_steps(batch.min_factor, stride)
    probs, cells, factor = (take(t, idx).reshape(b * r, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor))
    hw = batch.image_hw[:, None, :].expand(b, r, 2).reshape(-1, 2)
    return torch.cat([tight_boxes(probs[lo:lo + WINDOW_BLOCK], cells[lo:lo + WINDOW_BLOCK], factor[lo:lo + WINDOW_BLOCK],
                                  hw[lo:lo + WINDOW_BLOCK], m, stride, config.mask_threshold, steps, dtype)
                      for lo in range(0, b * r, WINDOW_BLOCK)]).reshape(b, r, 4)


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t: (B, C, ...) -> (B, K, ...) at each row's indices idx (B, K)."""
    b, k = idx.shape
    return t.gather(1, idx.reshape(b, k, *([1] * (t.dim() - 2))).expand(b, k, *t.shape[2:]))
