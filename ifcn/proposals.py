"""Proposals of one image in compact form, and the two ways of making them from candidate windows.

    postprocess_numpy(Candidates)   the reference: numpy, one window at a time in score order (CPU)
    postprocess_device(Windows)     the same results as batched torch ops on the windows' device

Both return `Proposals`: per proposal score, box, area, scale and COCO *uncompressed* run
lengths; `encode` turns those into COCO compressed RLE strings (pycocotools), a CPU job the
pipeline runs after the inference actors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import device_ops as dev
from .config import InferenceConfig
from .ops import GreedyMaskNMS, crop_runs, encode_counts, paste_masks

if TYPE_CHECKING:  # predictor.py imports this module
    from .predictor import Candidates


@dataclass
class Proposals:
    """Kept proposals of one image, best first (all numpy).

    scores: (P,) float32; boxes: (P, 4) float32 tight boxes (x, y, w, h); areas: (P,) int64;
    scales: (P,) int32 short side of the proposal's scale; counts: (R,) uint32 every proposal's
    column-major run lengths back to back (background first); lengths: (P,) int32 runs per proposal.
    """

    image_size: tuple[int, int]
    scores: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    scales: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> "Proposals":
        return cls(tuple(image_size), np.zeros(0, np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                   np.zeros(0, np.int32), np.zeros(0, np.uint32), np.zeros(0, np.int32))

    def runs(self) -> list[np.ndarray]:
        """Each proposal's run lengths."""
        return np.split(self.counts, np.cumsum(self.lengths)[:-1]) if len(self) else []

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"image_size": np.asarray(self.image_size, np.int64), "scores": self.scores, "boxes": self.boxes,
                "areas": self.areas, "scales": self.scales, "counts": self.counts, "lengths": self.lengths}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Proposals":
        h, w = (int(v) for v in np.asarray(d["image_size"]).reshape(2))
        return cls((h, w), np.asarray(d["scores"], np.float32).reshape(-1), np.asarray(d["boxes"], np.float32).reshape(-1, 4),
                   np.asarray(d["areas"], np.int64).reshape(-1), np.asarray(d["scales"], np.int32).reshape(-1),
                   np.asarray(d["counts"], np.uint32).reshape(-1), np.asarray(d["lengths"], np.int32).reshape(-1))


def encode(p: Proposals) -> list[dict[str, Any]]:
    """Proposals -> [{score, rle (COCO compressed, str counts), bbox (x, y, w, h), area, scale}], best first."""
    return [{"score": float(s), "rle": encode_counts(r, p.image_size), "bbox": [float(v) for v in b], "area": int(a),
             "scale": int(sc)} for s, r, b, a, sc in zip(p.scores, p.runs(), p.boxes, p.areas, p.scales)]


def _from_rows(image_size: tuple[int, int], rows: list[tuple[float, np.ndarray, tuple, int, int]]) -> Proposals:
    if not rows:
        return Proposals.empty(image_size)
    scores, runs, boxes, areas, scales = zip(*rows)
    return Proposals(tuple(image_size), np.asarray(scores, np.float32), np.asarray(boxes, np.float32).reshape(-1, 4),
                     np.asarray(areas, np.int64), np.asarray(scales, np.int32),
                     np.concatenate(runs).astype(np.uint32), np.asarray([len(r) for r in runs], np.int32))


# --------------------------------------------------------------------------- numpy reference

# Windows pasted per round beyond the ones still needed: NMS drops some, and one round more
# costs more than a few spare windows.
SPARE_WINDOWS = 64


def postprocess_numpy(cands: Candidates, config: InferenceConfig) -> Proposals:
    """Paste, binarise, NMS and run lengths with numpy, one window at a time (the reference).

    Windows are pasted in score order, a round at a time, and NMS stops as soon as
    `max_proposals` are kept, so most low-ranked windows are never pasted; ties keep candidate order.
    """
    live = np.flatnonzero(cands.scores >= config.min_score)
    order = live[np.argsort(-cands.scores[live].astype(np.float64), kind="stable")]
    nms = GreedyMaskNMS(config.nms_iou, config.max_proposals, config.nms)
    rows: list[tuple[float, np.ndarray, tuple, int, int]] = []
    pos = 0
    while pos < len(order) and not nms.full:
        batch = order[pos:pos + config.max_proposals - len(rows) + SPARE_WINDOWS]
        pos += len(batch)
        for i, (top, left, crop) in zip(batch, _paste(cands, batch, config.mask_threshold)):
            if crop.size == 0:  # pasted crops are the masks' tight boxes: empty means no mask
                continue
            box = (float(left), float(top), float(crop.shape[1]), float(crop.shape[0]))
            area = int(np.count_nonzero(crop))
            if nms.offer((top, left, crop), box, area):  # only kept masks are run-length encoded
                rows.append((float(cands.scores[i]), crop_runs(top, left, crop, cands.image_size), box, area,
                             int(cands.scale[i])))
                if nms.full:
                    break
    return _from_rows(cands.image_size, rows)


def _paste(cands: Candidates, idx: np.ndarray, threshold: float) -> list[tuple[int, int, np.ndarray]]:
    """paste_masks for candidates `idx` (any scales), results in the order of `idx`."""
    out: list[tuple[int, int, np.ndarray]] = [None] * len(idx)  # type: ignore[list-item]
    scales = cands.scale[idx]
    for s in np.unique(scales):  # all windows of one scale share a factor: one batch each
        at = np.flatnonzero(scales == s)
        sel = idx[at]
        fy, fx = (float(v) for v in cands.factor[sel[0]])
        pasted = paste_masks(cands.masks[sel].astype(np.float32), cands.cells[sel].astype(np.int64), (fy, fx),
                             cands.image_size, cands.stride, threshold)
        for j, p in zip(at, pasted):
            out[j] = p
    return out


# --------------------------------------------------------------------------- on the device

def postprocess_device(groups: list[tuple[dev.Windows, tuple[float, float]]], image_size: tuple[int, int],
                       config: InferenceConfig, m: int, stride: int, dtype: torch.dtype = torch.float32) -> Proposals:
    """postprocess_numpy's results from batched torch ops on the windows' own device.

    groups: the image's windows, one group per scale with that scale's (fy, fx) factor as floats.
    Host syncs: a few per image (how many windows survive, kept boxes' sizes, run counts), none
    per window. With dtype=float64 the masks are the reference's bit for bit; float32 differs only
    for pixels within rounding of the threshold.
    """
    groups = [(w, f) for w, f in groups if len(w)]
    if not groups:
        return Proposals.empty(image_size)
    boxes = torch.cat([dev.tight_boxes(w, image_size, m, stride, config.mask_threshold, f, dtype) for w, f in groups])
    w = dev.Windows.cat([g for g, _ in groups])
    order = torch.argsort(-w.scores.double(), stable=True)  # ties keep candidate order, as the reference
    w, boxes = w.take(order), boxes[order]
    alive = (w.scores >= config.min_score) & (boxes[:, 2] > boxes[:, 0])  # empty masks take no part
    store = dev.CropStore(len(w), boxes.device)
    if config.nms == "box":
        keep = dev.box_nms(boxes, alive, config.nms_iou, config.max_proposals)
        _paste_into(store, w, keep, boxes, image_size, config, m, stride, dtype)  # only what NMS kept
    else:
        keep = _mask_nms(w, boxes, alive, store, image_size, config, m, stride, dtype)
    if len(keep) == 0:
        return Proposals.empty(image_size)
    w, boxes = w.take(keep), boxes[keep]
    areas = torch.zeros(len(keep), dtype=torch.long, device=boxes.device)
    parts = []
    for g in dev.size_groups(boxes):
        crops = store.read(keep[g], boxes[g], boxes[g])
        areas[g] = crops.sum((1, 2))
        parts.append((g, *dev.crop_runs(crops, boxes[g], image_size)))
    counts, lengths = dev.ragged_place(parts, len(keep))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    host = lambda t: t.cpu().numpy()  # noqa: E731
    return Proposals(tuple(image_size), host(w.scores.float()), host(xywh.float()), host(areas),
                     host(w.scale.int()), host(counts).astype(np.uint32), host(lengths).astype(np.int32))


def _paste_into(store: dev.CropStore, w: dev.Windows, idx: torch.Tensor, boxes: torch.Tensor,
                image_size: tuple[int, int], config: InferenceConfig, m: int, stride: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Pastes windows idx over their tight boxes into `store`, in groups of similar size; returns
    their areas (len(idx),)."""
    areas = torch.zeros(len(idx), dtype=torch.long, device=boxes.device)
    for g in dev.size_groups(boxes[idx]):
        sel = idx[g]
        crops = dev.paste_in_boxes(w.take(sel), boxes[sel], image_size, m, stride, config.mask_threshold, dtype)
        store.add(sel, crops, boxes[sel])
        areas[g] = crops.sum((1, 2))
    return areas


# Windows settled per step of mask NMS: each step pastes them and compares them with the kept masks
# and with each other only, so pairs of windows that NMS drops anyway are rarely compared.
MASK_NMS_BLOCK = 128


def _mask_nms(w: dev.Windows, boxes: torch.Tensor, alive: torch.Tensor, store: dev.CropStore,
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
        overlap = dev.box_overlap(boxes[block], boxes[group])  # (b, K + b)
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
        keep = dev.greedy_keep(suppress, free)
        room = config.max_proposals - k
        kept = torch.cat([kept, block[keep][:room]])
        kept_area = torch.cat([kept_area, area[keep][:room].long()])
    return kept
