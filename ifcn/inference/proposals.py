"""The two ways of making one image's Proposals (ifcn.batch.containers) from candidate windows.

    postprocess_numpy(Candidates)   the reference: numpy, one window at a time in score order (CPU)
    postprocess_device(Windows)     the same results as batched torch ops on the windows' device

Both return `Proposals`: per proposal score, box, area, scale and COCO *uncompressed* run
lengths; `encode` turns those into COCO compressed RLE strings (pycocotools), a CPU job the
pipeline runs after the inference actors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ifcn.batch.containers import Candidates, Groups, Proposals, WindowBatch
from ifcn.batch.postprocessing import postprocess_batch
from ifcn.config import InferenceConfig
from ifcn.ops.nms import GreedyMaskNMS
from ifcn.ops.paste import paste_masks
from ifcn.ops.runs import crop_runs, encode_counts


def encode(p: Proposals) -> list[dict[str, Any]]:
    """Proposals -> [{score, rle (COCO compressed, str counts), bbox (x, y, w, h), area, scale}], best first."""
    return [{"score": float(s), "rle": encode_counts(r, p.image_size), "bbox": [float(v) for v in b], "area": int(a),
             "scale": int(sc)} for s, r, b, a, sc in zip(p.scores, p.runs(), p.boxes, p.areas, p.scales)]


def postprocess(cands: Candidates, config: InferenceConfig) -> list[dict[str, Any]]:
    """Paste, binarise, NMS and encode with the numpy reference: proposals best first,
    {score, rle (COCO compressed, str counts), bbox (x, y, w, h), area, scale}."""
    return encode(postprocess_numpy(cands, config))


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

def postprocess_device(groups: Groups, image_size: tuple[int, int], config: InferenceConfig, m: int, stride: int,
                       dtype: torch.dtype = torch.float32) -> Proposals:
    """postprocess_numpy's results from batched torch ops on the windows' own device (one image;
    `postprocess.postprocess_batch` runs a whole batch at once).

    groups: the image's windows, one group per scale with that scale's (fy, fx) factor as floats.
    With dtype=float64 the masks are the reference's bit for bit; float32 differs only for pixels
    within rounding of the threshold.
    """
    groups = [(w, f) for w, f in groups if len(w)]
    if not groups:
        return Proposals.empty(image_size)
    return postprocess_batch(WindowBatch.from_groups([groups], [image_size]), config, m, stride, dtype)[0]
