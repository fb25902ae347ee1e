"""Multi-scale inference, split in two so a pipeline can run the halves on different machines:

    Predictor.candidates(image)  GPU: every scale's forward, top windows, assembling
    postprocess(candidates)      CPU: paste, binarise, mask NMS, top N, COCO RLE
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import InferenceConfig
from .model import InstanceFCN
from .ops import GreedyMaskNMS, assemble, crop_to_rle, paste_masks
from .transforms import image_to_tensor, normalize, resize, scaled_size


@dataclass
class Candidates:
    """Top windows of every scale for one image, before pasting (all numpy).

    scores: (C,) float32 objectness probability; cells: (C, 2) int32 window top-left feature
    cell (y0, x0) at its scale; masks: (C, m, m) float16 assembled probabilities;
    scale: (C,) int32 short side; factor: (C, 2) float32 resized/original size (fy, fx).
    """

    image_size: tuple[int, int]
    scores: np.ndarray
    cells: np.ndarray
    masks: np.ndarray
    scale: np.ndarray
    factor: np.ndarray
    stride: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": np.asarray(self.image_size, dtype=np.int64), "scores": self.scores,
                "cells": self.cells, "masks": self.masks, "scale": self.scale, "factor": self.factor,
                "stride": np.int64(self.stride)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidates":
        h, w = (int(v) for v in np.asarray(d["image_size"]).reshape(2))
        m = np.asarray(d["masks"])
        return cls((h, w), np.asarray(d["scores"], np.float32).reshape(-1), np.asarray(d["cells"], np.int32).reshape(-1, 2),
                   m.reshape(-1, *m.shape[-2:]) if m.size else m.reshape(0, 0, 0),
                   np.asarray(d["scale"], np.int32).reshape(-1), np.asarray(d["factor"], np.float32).reshape(-1, 2),
                   int(d.get("stride", 8)))


# Windows pasted per round beyond the ones still needed: NMS drops some, and one round more
# costs more than a few spare windows.
_SPARE_WINDOWS = 64


def postprocess(cands: Candidates, config: InferenceConfig) -> list[dict[str, Any]]:
    """Paste, binarise, mask-NMS and encode: the CPU half of inference.

    Returns proposals best first: {score, rle (COCO compressed, str counts), bbox (x, y, w, h),
    area, scale}. Windows are pasted in score order, a round at a time, and NMS stops as soon as
    `max_proposals` are kept, so most low-ranked windows are never pasted; ties keep candidate order.
    """
    live = np.flatnonzero(cands.scores >= config.min_score)
    order = live[np.argsort(-cands.scores[live].astype(np.float64), kind="stable")]
    nms = GreedyMaskNMS(config.nms_iou, config.max_proposals)
    out: list[dict[str, Any]] = []
    pos = 0
    while pos < len(order) and not nms.full:
        batch = order[pos:pos + config.max_proposals - len(out) + _SPARE_WINDOWS]
        pos += len(batch)
        for i, (top, left, crop) in zip(batch, _paste(cands, batch, config.mask_threshold)):
            if crop.size == 0:  # pasted crops are the masks' tight boxes: empty means no mask
                continue
            box = (float(left), float(top), float(crop.shape[1]), float(crop.shape[0]))
            area = int(np.count_nonzero(crop))
            if nms.offer((top, left, crop), box, area):  # only kept masks are RLE-encoded
                out.append({"score": float(cands.scores[i]), "rle": crop_to_rle(top, left, crop, cands.image_size),
                            "bbox": list(box), "area": area, "scale": int(cands.scale[i])})
                if nms.full:
                    break
    return out


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


class Predictor:
    """Runs a trained InstanceFCN on one image at every scale of an InferenceConfig."""

    def __init__(self, model: InstanceFCN, config: InferenceConfig = InferenceConfig(),
                 device: str | torch.device | None = None, amp_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels_last: the conv layout oneDNN (CPU) and cuDNN tensor cores run fastest
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.config = config
        self.amp_dtype = amp_dtype  # e.g. torch.bfloat16 on GPUs; None = full precision

    @torch.inference_mode()
    def candidates(self, image: np.ndarray) -> Candidates:
        """image: (H, W, 3) uint8 RGB -> top windows of every scale (GPU half)."""
        mcfg = self.model.config
        m, half = mcfg.m, mcfg.m // 2
        height, width = image.shape[:2]
        base = image_to_tensor(image, self.device)  # (1, 3, H, W)
        parts: list[tuple[np.ndarray, ...]] = []
        for short in self.config.scales:
            size = scaled_size(height, width, short, self.config.max_size)
            x = normalize(resize(base, size)).contiguous(memory_format=torch.channels_last)
            amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                   else contextlib.nullcontext())
            with amp:
                scores, objectness = self.model(x)  # (1, k*k, h, w), (1, 1, h, w)
            scores, objectness = scores.float(), objectness.float()
            fw = objectness.shape[-1]
            flat = objectness.reshape(-1)
            top = torch.topk(flat, min(self.config.windows_per_scale, flat.numel()))
            ys, xs = top.indices // fw, top.indices % fw
            cells = torch.stack([ys - half, xs - half], dim=1)  # (T, 2) window top-left cells
            windows = torch.cat([torch.zeros_like(ys)[:, None], cells], dim=1)  # (T, 3)
            probs = torch.sigmoid(assemble(scores, windows, m))  # (T, m, m)
            n = len(ys)
            parts.append((torch.sigmoid(top.values).cpu().numpy().astype(np.float32),
                           cells.cpu().numpy().astype(np.int32), probs.half().cpu().numpy(),
                           np.full(n, short, np.int32),
                           np.tile(np.array([size[0] / height, size[1] / width], np.float32), (n, 1))))
        cols = [np.concatenate(c) for c in zip(*parts)]
        return Candidates((height, width), *cols, stride=mcfg.stride)

    def predict(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB -> proposals best first (see `postprocess`)."""
        return postprocess(self.candidates(image), self.config)
