"""Multi-scale inference for whole batches of images, with every per-pixel step on the model's device:

    Predictor.windows(images)    every scale's forward (same-size images batched), top windows
                                 by objectness, assembling; no host sync between scales
    postprocess_device(...)      paste, binarise, tight boxes, NMS, run lengths (torch, same device)
    proposals.encode(...)        COCO compressed RLE strings (pycocotools; CPU, after the actor)

On CPU the per-pixel half defaults to the numpy reference (`postprocess_numpy`), which is the
faster of the two there; `postprocess_on="device"` runs the torch path on CPU too (CI does).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import InferenceConfig
from .device_ops import Windows
from .model import InstanceFCN
from .ops import BACKGROUND_LOGIT, assemble
from .proposals import Proposals, encode, postprocess_device, postprocess_numpy
from .transforms import image_to_tensor, normalize, resize, scaled_size

# Input pixels per forward: 16 images of 480x640 at the paper's largest scale (900 x 1200 px), whose
# VGG-16 activations take ~7 GB in bf16; larger groups run in several forwards of even size.
BATCH_PIXELS = 18_000_000
POSTPROCESS_ON = ("auto", "device", "numpy")


@dataclass
class Candidates:
    """Top windows of every scale for one image, before pasting (all numpy).

    scores: (C,) float32 objectness probability; cells: (C, 2) int32 window top-left feature
    cell (y0, x0) at its scale; masks: (C, m, m) float32 (or float16) assembled probabilities;
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

    @classmethod
    def from_windows(cls, groups: list[tuple[Windows, tuple[float, float]]], image_size: tuple[int, int],
                     stride: int) -> "Candidates":
        host = lambda t: t.cpu().numpy()  # noqa: E731
        w = Windows.cat([g for g, _ in groups])
        return cls(tuple(image_size), host(w.scores).astype(np.float32), host(w.cells).astype(np.int32),
                   host(w.probs).astype(np.float32), host(w.scale).astype(np.int32),
                   host(w.factor).astype(np.float32), stride)


def postprocess(cands: Candidates, config: InferenceConfig) -> list[dict[str, Any]]:
    """Paste, binarise, NMS and encode with the numpy reference: proposals best first,
    {score, rle (COCO compressed, str counts), bbox (x, y, w, h), area, scale}."""
    return encode(postprocess_numpy(cands, config))


class Predictor:
    """Runs a trained InstanceFCN on images at every scale of an InferenceConfig (or any windowed
    model of ifcn.models, e.g. DeepMask: forward -> (per-window mask maps, objectness), and
    `window_logits(maps, windows)` -> the windows' (n, m, m) mask logits; for InstanceFCN, assembling).

    amp_dtype: autocast dtype for the forward (torch.bfloat16 on GPUs; None = full precision).
    postprocess_on: "device" (torch ops where the model runs), "numpy" (the reference, on the
    host) or "auto" (device on CUDA, numpy on CPU). compile: torch.compile the model (pays on
    long GPU jobs: its warm-up is tens of seconds per input shape).
    """

    def __init__(self, model: InstanceFCN, config: InferenceConfig = InferenceConfig(),
                 device: str | torch.device | None = None, amp_dtype: torch.dtype | None = None,
                 postprocess_on: str = "auto", compile: bool = False) -> None:
        if postprocess_on not in POSTPROCESS_ON:
            raise ValueError(f"Predictor postprocess_on={postprocess_on!r}: choose one of {POSTPROCESS_ON}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels_last: the conv layout oneDNN (CPU) and cuDNN tensor cores run fastest
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.config = config
        self.amp_dtype = amp_dtype
        self.on_device = postprocess_on == "device" or (postprocess_on == "auto" and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # few distinct input shapes (one per scale and batch)
        self.forward = torch.compile(self.model) if compile else self.model

    def _window_logits(self, maps: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(n, m, m) mask logits of `windows` (n, 3): the model's own `window_logits` (DeepMask), else
        assembling k*k score maps (InstanceFCN, and any model with its forward's outputs)."""
        read = getattr(self.model, "window_logits", None)
        return read(maps, windows) if read is not None else assemble(maps, windows, self.model.config.m)

    @torch.inference_mode()
    def windows(self, images: list[np.ndarray]) -> list[list[tuple[Windows, tuple[float, float]]]]:
        """images: (H, W, 3) uint8 RGB each -> per image, per scale: its top windows (on the
        device) and the scale's (fy, fx) resized/original factor.

        Windows are ranked across scales: an image keeps its windows_per_scale * len(scales) best
        by objectness wherever they come from, so no window is dropped while a lower-scored one of
        another scale is kept. Images whose resized size (padded up to `pad_to`) is equal share a
        forward; padding is set to background before windows are picked, so it yields no window
        and no mask pixel. No host sync until every scale's forward is queued."""
        cfg = self.config
        total = cfg.windows_per_scale * len(cfg.scales)
        bases = [image_to_tensor(image, self.device) for image in images]  # (1, 3, H, W) each
        found: list[list[tuple[int, tuple[float, float], _Top]]] = [[] for _ in images]
        for short in cfg.scales:
            sizes = [scaled_size(*image.shape[:2], short, cfg.max_size) for image in images]
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, size in enumerate(sizes):
                groups[_padded(size, cfg.pad_to)].append(i)
            for padded, members in groups.items():
                forwards = math.ceil(len(members) * padded[0] * padded[1] / BATCH_PIXELS)
                per = math.ceil(len(members) / forwards)  # even forwards: fewer shapes for cudnn / compile
                for lo in range(0, len(members), per):
                    chunk = members[lo:lo + per]
                    tops = self._top_at_scale([bases[i] for i in chunk], [sizes[i] for i in chunk], padded, total)
                    for i, top in zip(chunk, tops):
                        height, width = images[i].shape[:2]
                        # float32-rounded as the numpy path stores it, so both paste the same pixels
                        factor = (float(np.float32(sizes[i][0] / height)), float(np.float32(sizes[i][1] / width)))
                        found[i].append((short, factor, top))
        out = []
        for per_scale in found:
            logits = torch.cat([top.logits for _, _, top in per_scale])
            floor = torch.topk(logits, total).values[-1] if len(logits) > total else None  # the cross-scale cut
            groups_out = []
            for short, factor, top in per_scale:
                keep = torch.nonzero(top.logits >= floor).reshape(-1) if floor is not None else None
                logit, cells = (top.logits, top.cells) if keep is None else (top.logits[keep], top.cells[keep])
                windows = torch.cat([torch.zeros_like(cells[:, :1]), cells], 1)  # (n, 3): one map, top-left cells
                n = len(cells)
                masks = torch.sigmoid(self._window_logits(top.scores[None], windows))  # (n, m, m)
                groups_out.append((Windows(torch.sigmoid(logit), cells, masks,
                                           # filled on the device: a host-to-device copy would wait for the GPU
                                           torch.stack([torch.full((n,), f, dtype=torch.float64, device=self.device)
                                                        for f in factor], 1),
                                           torch.full((n,), short, dtype=torch.long, device=self.device)), factor))
            out.append(groups_out)
        return out

    def _top_at_scale(self, bases: list[torch.Tensor], sizes: list[tuple[int, int]], padded: tuple[int, int],
                      total: int) -> list["_Top"]:
        """One batched forward at one scale -> each image's best `total` windows there (no host sync)."""
        mcfg = self.model.config
        half, stride = mcfg.m // 2, mcfg.stride
        x = torch.cat([F.pad(normalize(resize(b, s)), (0, padded[1] - s[1], 0, padded[0] - s[0]))
                       for b, s in zip(bases, sizes)]).contiguous(memory_format=torch.channels_last)  # (B, 3, h, w)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext())
        with amp:
            scores, objectness = self.forward(x)  # (B, k*k, fh, fw), (B, 1, fh, fw)
        scores, objectness = scores.float(), objectness.float()
        batch, _, fh, fw = objectness.shape
        feats = [(math.ceil(s[0] / stride), math.ceil(s[1] / stride)) for s in sizes]  # each image's own map
        if any(f != (fh, fw) for f in feats):  # padding: background scores, never a window
            inside = torch.zeros((batch, 1, fh, fw), dtype=torch.bool, device=self.device)
            for b, (h, w) in enumerate(feats):
                inside[b, :, :h, :w] = True
            scores = scores.masked_fill(~inside, BACKGROUND_LOGIT)
            objectness = objectness.masked_fill(~inside, -math.inf)
        counts = [min(total, h * w) for h, w in feats]
        top = torch.topk(objectness.reshape(batch, -1), max(counts), dim=1)  # (B, T)
        cells = torch.stack([top.indices // fw - half, top.indices % fw - half], dim=2)  # (B, T, 2) top-left cells
        return [_Top(top.values[b, :n], cells[b, :n], scores[b]) for b, n in enumerate(counts)]

    def proposals(self, images: list[np.ndarray]) -> list[Proposals]:
        """images: (H, W, 3) uint8 RGB each -> each image's proposals, best first (compact form)."""
        return [self.postprocess(groups, image.shape[:2]) for image, groups in zip(images, self.windows(images))]

    @torch.inference_mode()
    def postprocess(self, groups: list[tuple[Windows, tuple[float, float]]], image_size: tuple[int, int]) -> Proposals:
        """One image's windows (from `windows`) -> its proposals, on the device or with numpy."""
        mcfg = self.model.config
        if self.on_device:
            return postprocess_device(groups, image_size, self.config, mcfg.m, mcfg.stride)
        return postprocess_numpy(Candidates.from_windows(groups, image_size, mcfg.stride), self.config)

    def candidates(self, image: np.ndarray) -> Candidates:
        """image: (H, W, 3) uint8 RGB -> top windows of every scale, on the host."""
        return Candidates.from_windows(self.windows([image])[0], image.shape[:2], self.model.config.stride)

    def predict(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB -> proposals best first (see `postprocess`)."""
        return encode(self.proposals([image])[0])


@dataclass
class _Top:
    """One image's best windows at one scale: logits (n,), cells (n, 2) top-left feature cells,
    scores (k*k, fh, fw) its score maps, or DeepMask's (m*m, fh, fw) mask maps (the windows that
    survive the cross-scale cut read their masks from them)."""

    logits: torch.Tensor
    cells: torch.Tensor
    scores: torch.Tensor


def _padded(size: tuple[int, int], pad_to: int) -> tuple[int, int]:
    if not pad_to:
        return size
    return (-(-size[0] // pad_to) * pad_to, -(-size[1] // pad_to) * pad_to)
