"""Greedy box-IoU NMS of every image of a batch at once, on the windows' device (box_nms_batch):
nms.box_nms_rounds over the tight boxes (ifcn.batch.tightboxes) of the score positions each of its rounds
reaches, so positions past the point where every image has max_proposals kept are never computed.

Shapes: B images, C windows each (WindowBatch), K = min(max_proposals, C) kept.
"""
from __future__ import annotations

import torch

from ifcn.config import InferenceConfig
from ifcn.ops.nms import box_nms_rounds
from ifcn.tools.opcount import stage

from .containers import WindowBatch
from .tightboxes import tight_boxes_at


def box_nms_batch(batch: WindowBatch, order: torch.Tensor, live: torch.Tensor, config: InferenceConfig, m: int,
                  stride: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """order: (B, C) candidate index of each position in score order, live (B, C) bool, the live ones
    first. Returns (B, K) positions of the kept windows, best first, (B, K) bool which are real and
    (B, K, 4) their tight boxes (zero where not real), as nms.box_nms_rounds. IoU in `dtype`, its
    integer terms in int16 where the images are under 2^15 pixels a side (nms.box_iou)."""
    b, c = order.shape

    def fetch(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tight boxes (B, R, 4) of score positions [lo, hi) and which are alive (B, R)."""
        with stage("tight_boxes"):
            rb = tight_boxes_at(batch, order[:, lo:hi], config, m, stride, dtype)
        return rb, live[:, lo:hi] & (rb[..., 2] > rb[..., 0])  # empty masks take no part

    coords = torch.int16 if max(max(s) for s in batch.image_sizes) < 2 ** 15 else torch.int64
    return box_nms_rounds(fetch, (b, c), config.nms_iou, config.max_proposals, dtype, limit=live.sum(1),
                          coords=coords)
