"""The per-pixel half of inference for a whole batch at once, on the windows' device (torch):

    tight boxes of the windows NMS reaches (ifcn.batch.tightboxes: boxes.tight_boxes, from the m x m grids, no pasting)
    NMS of every image at once: box IoU (ifcn.batch.boxnms: nms.box_nms_rounds) or mask IoU (ifcn.batch.masknms, in rounds;
        its pair bounds and intersections in ifcn.batch.maskpairs)
    the kept windows pasted dense in blocks of similar box sizes, their areas and run lengths
        (ifcn.batch.pasteplan plans the blocks and steps on the host, ifcn.batch.pasteruns pastes and reads the runs)

This module strings them together (postprocess_steps); each step's memory is bounded by
ifcn.batch.budgets. One chain of ops per batch: its length does not grow with the number of images,
windows or kept masks, except one more step per memory budget (`pixel_budget` pixels pasted,
IOU_BLOCK pair bounds, PAIR_PIXEL_BUDGET intersection pixels) and, for mask NMS, one more round per
MASK_ROUND windows of the score order that an image needs before it has `max_proposals` kept (or
per share of STORE_PIXEL_BUDGET box pixels, and one chunk step per such share of kept masks past
half of it). Host syncs per batch: the NMS convergence checks (a few), one read of the kept boxes
(to plan the pasting), one per paste step (the number of run events) and two reads of results;
mask NMS adds one read of the first round's boxes (to plan its pasting) and four a round (the
candidate pairs left by the projection bound, their intersections, the greedy rule's check, the
kept windows with the next round's boxes), one more a chunk where its kept masks pass half of
STORE_PIXEL_BUDGET and are pasted again in chunks. float64 gives the numpy reference's proposals
exactly; float32 (the default) differs only for pixels within rounding of the threshold. The host
planning between device steps (paste plans, mask NMS's rounds and chunks, the per-image arrays) is
yielded (`postprocess_steps`, ifcn.batch.hostwork), so the actor runs it on its calling thread and its
device thread only launches device work.
"""
from __future__ import annotations

import torch

from ifcn.config import InferenceConfig
from ifcn.tools.opcount import stage

from .boxnms import box_nms_batch
from .budgets import PIXEL_BUDGET, device_budget
from .containers import Proposals, WindowBatch
from .hostwork import Steps, drive
from .masknms import mask_nms
from .pasteruns import paste_proposals


def postprocess_batch(batch: WindowBatch, config: InferenceConfig, m: int, stride: int,
                      dtype: torch.dtype = torch.float32, pixel_budget: int | None = None) -> list[Proposals]:
    """Every image's proposals, best first (what ops.paste_masks + GreedyMaskNMS + crop_runs give).
    pixel_budget: pixels pasted per step (None: PIXEL_BUDGET of the device type). Everything on this
    thread; `postprocess_steps` is the same routine with its host planning handed out (ifcn.batch.hostwork)."""
    return drive(postprocess_steps(batch, config, m, stride, dtype, pixel_budget))


def postprocess_steps(batch: WindowBatch, config: InferenceConfig, m: int, stride: int,
                      dtype: torch.dtype = torch.float32, pixel_budget: int | None = None) -> Steps[list[Proposals]]:
    """postprocess_batch as a device routine (ifcn.batch.hostwork): it yields its host planning (paste blocks
    and steps, mask NMS's rounds, the per-image arrays) as Host items, so a driver can run them on
    another thread than the one launching the device work."""
    c = batch.scores.shape[1]
    if c == 0:
        return [Proposals.empty(s) for s in batch.image_sizes]
    if pixel_budget is None:
        pixel_budget = device_budget(PIXEL_BUDGET, batch.scores.device)
    live = batch.valid & (batch.scores >= config.min_score)
    # score order, ties in candidate order (as the reference's stable argsort); the rest at the end
    order = torch.argsort(torch.where(live, -batch.scores.double(), torch.inf), dim=1, stable=True)
    live = live.gather(1, order)  # (B, C) in score order
    with stage("nms"):
        if config.nms == "mask":
            pos, real, kept_boxes = yield from mask_nms(batch, order, live, config, m, stride, dtype, pixel_budget)
        else:
            pos, real, kept_boxes = box_nms_batch(batch, order, live, config, m, stride, dtype)
    idx = order.gather(1, pos)
    with stage("paste_runs"):
        return (yield from paste_proposals(batch, idx, real, kept_boxes, m, stride, config.mask_threshold, dtype,
                                           pixel_budget))
