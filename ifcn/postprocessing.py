"""The per-pixel half of inference for a whole batch at once, on the windows' device (torch):

    tight boxes of every window (boxes.tight_boxes, from the m x m grids: no pasting)
    box NMS of every image at once (nms.box_nms)             | mask NMS: image by image (_mask_nms)
    the kept windows pasted flat, their areas and run lengths (runs.paste_flat, runs.flat_runs)

One chain of ops per batch for box NMS: its length does not grow with the number of images,
windows or kept masks, except one more paste-and-runs step per `pixel_budget` kept-mask pixels
(memory stays bounded). Host syncs per batch: the NMS convergence checks (a few), one read of the
kept boxes (to plan the pasting), one per paste step (the number of runs) and two reads of results.
float64 gives the numpy reference's proposals exactly; float32 (the default) differs only for
pixels within rounding of the threshold.
"""
from __future__ import annotations

import numpy as np
import torch

from . import device_ops as dev
from .boxes import search_steps, tight_boxes
from .config import InferenceConfig
from .containers import Proposals, WindowBatch, Windows
from .nms import box_nms, box_overlap, greedy_keep
from .paste import paste_flat, paste_in_boxes
from .runs import flat_runs, padded_crop_runs

# Kept-mask pixels pasted per step (per batch), by device type: bounds the flat buffers (~100 bytes
# per pixel at the peak) whatever the images; a batch beyond it pastes in several steps. 480x640
# images keep ~25-30 k pixels per proposal at the paper's defaults (~30 M per image), so a batch of
# 16 takes four steps on a GPU.
PIXEL_BUDGET = {"cuda": 1 << 27, "cpu": 1 << 24}
# Windows whose tight boxes one call computes (~1.5 kB each in float32): bounds that memory.
WINDOW_BLOCK = 1 << 16


def postprocess_batch(batch: WindowBatch, config: InferenceConfig, m: int, stride: int,
                      dtype: torch.dtype = torch.float32, pixel_budget: int | None = None) -> list[Proposals]:
    """Every image's proposals, best first (what ops.paste_masks + GreedyMaskNMS + crop_runs give).
    pixel_budget: kept-mask pixels per paste step (None: PIXEL_BUDGET of the device type)."""
    b, c = batch.scores.shape
    if c == 0:
        return [Proposals.empty(s) for s in batch.image_sizes]
    hw = batch.image_hw[:, None, :].expand(b, c, 2).reshape(-1, 2)
    steps = search_steps(batch.min_factor, stride)
    flat = [t.reshape(b * c, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor)]
    boxes = torch.cat([tight_boxes(flat[0][lo:lo + WINDOW_BLOCK], flat[1][lo:lo + WINDOW_BLOCK],
                                   flat[2][lo:lo + WINDOW_BLOCK], hw[lo:lo + WINDOW_BLOCK], m, stride,
                                   config.mask_threshold, steps, dtype)
                       for lo in range(0, b * c, WINDOW_BLOCK)]).reshape(b, c, 4)
    live = batch.valid & (batch.scores >= config.min_score)
    # score order, ties in candidate order (as the reference's stable argsort); the rest at the end
    order = torch.argsort(torch.where(live, -batch.scores.double(), torch.inf), dim=1, stable=True)
    boxes = boxes.gather(1, order[..., None].expand(b, c, 4))
    alive = live.gather(1, order) & (boxes[..., 2] > boxes[..., 0])  # empty masks take no part
    if config.nms == "mask":
        return [_mask_one(batch, i, order[i], boxes[i], alive[i], config, m, stride, dtype) for i in range(b)]
    pos, real = box_nms(boxes, alive, config.nms_iou, config.max_proposals)  # (B, K)
    idx = order.gather(1, pos)
    kept_boxes = torch.where(real[..., None], boxes.gather(1, pos[..., None].expand(*pos.shape, 4)), 0)
    if pixel_budget is None:
        pixel_budget = PIXEL_BUDGET.get(batch.scores.device.type, PIXEL_BUDGET["cuda"])
    return _finish(batch, idx, real, kept_boxes, m, stride, config.mask_threshold, dtype, pixel_budget)


def _finish(batch: WindowBatch, idx: torch.Tensor, real: torch.Tensor, boxes: torch.Tensor, m: int, stride: int,
            threshold: float, dtype: torch.dtype, pixel_budget: int) -> list[Proposals]:
    """Kept windows idx (B, K) (real: (B, K) bool) with tight boxes (B, K, 4) -> Proposals: pastes them
    flat, `pixel_budget` pixels a step, for their areas and run lengths."""
    b, k = idx.shape
    take = lambda t: t.gather(1, idx.reshape(b, k, *([1] * (t.dim() - 2))).expand(b, k, *t.shape[2:]))  # noqa: E731
    scores, scale = take(batch.scores), take(batch.scale)
    head = torch.cat([real[..., None].double(), scores[..., None].double(), boxes.double(), scale[..., None].double()], 2)
    head = head.numpy(force=True)  # (B, K, 7): one host read plans the pasting
    n = b * k
    boxes_f = boxes.reshape(n, 4)
    probs, cells, factor = (take(t).reshape(n, *t.shape[2:]) for t in (batch.probs, batch.cells, batch.factor))
    hw = batch.image_hw[:, None, :].expand(b, k, 2).reshape(n, 2)
    area = (head[..., 4] - head[..., 2]) * (head[..., 5] - head[..., 3])
    area = area.reshape(-1).astype(np.int64)
    counts, lengths, pixels = [], [], []
    side = np.stack([head[..., 5] - head[..., 3], head[..., 4] - head[..., 2]], -1).reshape(-1, 2).astype(np.int64)
    for lo, hi in _steps(area, pixel_budget):
        totals = (int(area[lo:hi].sum()), *(int(v) for v in side[lo:hi].sum(0)))
        sl = slice(lo, hi)
        values, owner, row, col = paste_flat(probs[sl], cells[sl], factor[sl], boxes_f[sl], totals, m, stride,
                                             threshold, dtype)
        pixels.append(torch.zeros(hi - lo, dtype=torch.long, device=values.device).index_add_(0, owner, values.long()))
        cnt, ln = flat_runs(values, owner, row, col, boxes_f[sl], hw[sl])
        counts.append(cnt)
        lengths.append(ln)
    tail = torch.stack([torch.cat(pixels), torch.cat(lengths)], 1).numpy(force=True)  # (n, 2)
    runs = torch.cat(counts).numpy(force=True)
    runs_at = np.concatenate([[0], np.cumsum(tail[:, 1])])
    out = []
    for i, size in enumerate(batch.image_sizes):
        nk = int((head[i, :, 0] > 0).sum())  # real ones first (nms.first_kept)
        h, ln = head[i, :nk], tail[i * k:i * k + nk, 1]
        rows = slice(i * k, i * k + nk)
        counts_i = runs[runs_at[i * k]:runs_at[i * k + nk]]
        xywh = np.concatenate([h[:, 2:4], h[:, 4:6] - h[:, 2:4]], 1)
        out.append(Proposals(tuple(size), h[:, 1].astype(np.float32), xywh.astype(np.float32), tail[rows, 0].astype(np.int64),
                             h[:, 6].astype(np.int32), counts_i.astype(np.uint32), ln.astype(np.int32)))
    return out


def _steps(area: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges of items whose areas sum within `budget` (an item larger than it alone)."""
    out, lo, acc = [], 0, 0
    for i, a in enumerate(area.tolist()):
        if acc and acc + a > budget:
            out.append((lo, i))
            lo, acc = i, 0
        acc += a
    if acc or not out:
        out.append((lo, len(area)))
    return out


# --------------------------------------------------------------------------- mask NMS, image by image

def _mask_one(batch: WindowBatch, i: int, order: torch.Tensor, boxes: torch.Tensor, alive: torch.Tensor,
              config: InferenceConfig, m: int, stride: int, dtype: torch.dtype) -> Proposals:
    """Image i's mask NMS (order, boxes, alive: its windows in score order) and results."""
    image_size = batch.image_sizes[i]
    n = int(batch.valid[i].sum())
    order, boxes, alive = order[:n], boxes[:n], alive[:n]
    w = Windows(batch.scores[i, order], batch.cells[i, order], batch.probs[i, order], batch.factor[i, order],
                batch.scale[i, order])
    store = dev.CropStore(len(w), boxes.device)
    keep = _mask_nms(w, boxes, alive, store, image_size, config, m, stride, dtype)
    if len(keep) == 0:
        return Proposals.empty(image_size)
    w, boxes = w.take(keep), boxes[keep]
    areas = torch.zeros(len(keep), dtype=torch.long, device=boxes.device)
    parts = []
    for g in dev.size_groups(boxes):
        crops = store.read(keep[g], boxes[g], boxes[g])
        areas[g] = crops.sum((1, 2))
        parts.append((g, *padded_crop_runs(crops, boxes[g], image_size)))
    counts, lengths = dev.ragged_place(parts, len(keep))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    host = lambda t: t.cpu().numpy()  # noqa: E731
    return Proposals(tuple(image_size), host(w.scores.float()), host(xywh.float()), host(areas),
                     host(w.scale.int()), host(counts).astype(np.uint32), host(lengths).astype(np.int32))


def _paste_into(store: dev.CropStore, w: Windows, idx: torch.Tensor, boxes: torch.Tensor,
                image_size: tuple[int, int], config: InferenceConfig, m: int, stride: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Pastes windows idx over their tight boxes into `store`, in groups of similar size; returns
    their areas (len(idx),)."""
    areas = torch.zeros(len(idx), dtype=torch.long, device=boxes.device)
    for g in dev.size_groups(boxes[idx]):
        sel = idx[g]
        crops = paste_in_boxes(w.take(sel), boxes[sel], image_size, m, stride, config.mask_threshold, dtype)
        store.add(sel, crops, boxes[sel])
        areas[g] = crops.sum((1, 2))
    return areas


# Windows settled per step of mask NMS: each step pastes them and compares them with the kept masks
# and with each other only, so pairs of windows that NMS drops anyway are rarely compared.
MASK_NMS_BLOCK = 128


def _mask_nms(w: Windows, boxes: torch.Tensor, alive: torch.Tensor, store: dev.CropStore,
              image_size: tuple[int, int], config: InferenceConfig, m: int, stride: int,
              dtype: torch.dtype) -> torch.Tensor:
    """Greedy mask-IoU NMS in score order, a block of windows at a time, stopping once
    `max_proposals` are kept. Per block: paste it into `store` (areas); judge each window against
    the kept masks whose box/area bound can pass the threshold, its best-ranked such mask first
    (usually the one that suppresses it, as in the reference's early exit); then the survivors
    against each other with the greedy rule. Exact intersections are read from the store.
    Returns kept indices, in order."""
    device = boxes.device
    order = torch.nonzero(alive).reshape(-1)
    kept = torch.zeros(0, dtype=torch.long, device=device)
    kept_area = torch.zeros(0, dtype=torch.long, device=device)

    def suppresses(gi: torch.Tensor, gj: torch.Tensor, ai: torch.Tensor, aj: torch.Tensor) -> torch.Tensor:
        """(P,) bool: mask IoU of windows gi, gj (areas ai, aj) above the threshold."""
        region = torch.cat([torch.maximum(boxes[gi, :2], boxes[gj, :2]), torch.minimum(boxes[gi, 2:], boxes[gj, 2:])], 1)
        inter = torch.zeros(len(gi), dtype=torch.float64, device=device)
        for g in dev.size_groups(region):
            inter[g] = (store.read(gi[g], boxes[gi[g]], region[g]) & store.read(gj[g], boxes[gj[g]], region[g])
                        ).sum((1, 2)).double()
        return inter / (ai + aj - inter) > config.nms_iou

    for lo in range(0, len(order), MASK_NMS_BLOCK):
        if len(kept) >= config.max_proposals:
            break
        block = order[lo:lo + MASK_NMS_BLOCK]
        area = _paste_into(store, w, block, boxes, image_size, config, m, stride, dtype).double()
        group, areas = torch.cat([kept, block]), torch.cat([kept_area.double(), area])  # (K + b,)
        overlap = box_overlap(boxes[block], boxes[group])  # (b, K + b)
        bound_inter = torch.minimum(overlap, torch.minimum(area[:, None], areas[None, :]))
        near = bound_inter / (area[:, None] + areas[None, :] - bound_inter).clamp(min=1) > config.nms_iou
        k = len(kept)
        near_kept, near_block = near[:, :k], near[:, k:].tril(diagonal=-1)
        # Against kept masks: each window's best-ranked near kept mask first, the rest only if it survives.
        hit = torch.zeros(len(block), dtype=torch.long, device=device)
        i = torch.nonzero(near_kept.any(1)).reshape(-1)
        if len(i):
            j = near_kept[i].to(torch.int8).argmax(1)
            hit[i] = suppresses(block[i], kept[j], area[i], areas[j]).long()
            rest = near_kept & (hit == 0)[:, None]
            rest[i, j] = False
            i, j = torch.nonzero(rest, as_tuple=True)
            if len(i):
                hit.index_add_(0, i, suppresses(block[i], kept[j], area[i], areas[j]).long())
        free = hit == 0
        # Among the block's survivors: the greedy rule over their exact suppressions.
        i, j = torch.nonzero(near_block & free[:, None] & free[None, :], as_tuple=True)
        suppress = torch.zeros((len(block), len(block)), dtype=torch.bool, device=device)
        if len(i):
            suppress[i, j] = suppresses(block[i], block[j], area[i], area[j])
        keep = greedy_keep(suppress, free)
        room = config.max_proposals - k
        kept = torch.cat([kept, block[keep][:room]])
        kept_area = torch.cat([kept_area, area[keep][:room].long()])
    return kept
