"""InstanceFCN's training loss: objectness logistic loss + per-pixel logistic loss on assembled masks.

The two terms are unweighted (as the paper); the mask term covers positive windows only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import assemble
from .sampling import WindowBatch


def instance_fcn_loss(scores: torch.Tensor, objectness: torch.Tensor, batch: WindowBatch,
                      m: int) -> tuple[torch.Tensor, dict[str, float]]:
    """scores: (1, k*k, h, w), objectness: (1, 1, h, w) for one image -> (loss, parts).

    Objectness: mean logistic loss over all sampled windows. Mask: mean per-pixel logistic loss
    of the assembled (P, m, m) logits against the targets; 0 when the image has no positives.
    """
    ys, xs = batch.cells[:, 0], batch.cells[:, 1]
    if len(ys):
        obj = F.binary_cross_entropy_with_logits(objectness[0, 0, ys, xs], batch.labels.to(objectness.dtype))
    else:
        obj = objectness.sum() * 0.0
    p = batch.num_positive
    if p:
        cells = batch.cells[:p].to(scores.device)
        windows = torch.cat([cells.new_zeros((p, 1)), cells - m // 2], dim=1)  # (P, 3), on the scores' device
        logits = assemble(scores, windows, m)  # (P, m, m)
        mask = F.binary_cross_entropy_with_logits(logits, batch.targets.to(logits.device, logits.dtype))
    else:
        mask = scores.sum() * 0.0  # keeps every parameter in the graph (DDP needs that)
    return obj + mask, {"objectness": float(obj.detach()), "mask": float(mask.detach())}
