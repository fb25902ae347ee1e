"""The data that flows through inference, one container per stage (no torch ops of their own beyond
moving and slicing):

    WindowBatch   every image's top windows of a batch, padded to one (B, C) layout on the device
    Windows       one image's windows of one scale, on the device (a slice of a WindowBatch)
    Candidates    one image's windows on the host (numpy), what the numpy reference postprocesses
    Proposals     one image's kept proposals, compact (numpy), what the actor hands on
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch


@dataclass
class Windows:
    """Candidate windows of one image, on one device.

    scores: (C,) objectness probability; cells: (C, 2) long top-left feature cell (y0, x0);
    probs: (C, m, m) assembled probabilities; factor: (C, 2) float64 resized/original (fy, fx);
    scale: (C,) long short side of the window's scale.
    """

    scores: torch.Tensor
    cells: torch.Tensor
    probs: torch.Tensor
    factor: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, idx: torch.Tensor) -> "Windows":
        return Windows(self.scores[idx], self.cells[idx], self.probs[idx], self.factor[idx], self.scale[idx])

    @staticmethod
    def cat(parts: list["Windows"]) -> "Windows":
        return Windows(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("scores", "cells", "probs", "factor", "scale")))


# One image's windows as Predictor.windows gave them before batching: per scale (Windows, (fy, fx)).
Groups = list[tuple[Windows, tuple[float, float]]]


@dataclass
class WindowBatch:
    """Every image's top windows of a batch in one padded layout, on the device: the batched
    postprocess runs one chain of ops over it whatever the number of images or windows.

    scores: (B, C) objectness probability; valid: (B, C) bool (False = padding); cells: (B, C, 2)
    long; probs: (B, C, m, m); factor: (B, C, 2) float64; scale: (B, C) long short side. An image's
    valid windows come first, in candidate order: scale by scale, best first within a scale.
    image_sizes: (H, W) per image; factors: per image, per scale (short side, (fy, fx)) on the host.
    Indexing and iterating give the per-image, per-scale `Groups` (a host sync each).
    """

    scores: torch.Tensor
    valid: torch.Tensor
    cells: torch.Tensor
    probs: torch.Tensor
    factor: torch.Tensor
    scale: torch.Tensor
    image_hw: torch.Tensor  # (B, 2) long (H, W) of each image, on the device
    image_sizes: list[tuple[int, int]]
    factors: list[list[tuple[int, tuple[float, float]]]]

    def __len__(self) -> int:
        return len(self.image_sizes)

    def __getitem__(self, i: int) -> Groups:
        out = []
        for short, factor in self.factors[i]:
            idx = torch.nonzero(self.valid[i] & (self.scale[i] == short)).reshape(-1)
            out.append((Windows(self.scores[i, idx], self.cells[i, idx], self.probs[i, idx], self.factor[i, idx],
                                self.scale[i, idx]), factor))
        return out

    def __iter__(self) -> Iterator[Groups]:
        return (self[i] for i in range(len(self)))

    @property
    def min_factor(self) -> float:
        """Smallest resized/original factor of any window's axis (host float: sizes the searches)."""
        return min((min(f) for per in self.factors for _, f in per), default=1.0)

    @classmethod
    def from_groups(cls, groups_per_image: list[Groups], image_sizes: list[tuple[int, int]]) -> "WindowBatch":
        """Pads per-image groups into one batch (ops per image: for callers holding groups)."""
        wins = [Windows.cat([w for w, _ in g]) if g else None for g in groups_per_image]
        ref = next((w for w in wins if w is not None), None)
        if ref is None:
            raise ValueError("WindowBatch.from_groups: every image has no scale; pass at least one group")
        c = max(len(w) if w is not None else 0 for w in wins)
        m, dev = ref.probs.shape[-1], ref.scores.device
        b = len(wins)
        zeros = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        batch = cls(zeros(b, c, dtype=ref.scores.dtype), zeros(b, c, dtype=torch.bool), zeros(b, c, 2),
                    zeros(b, c, m, m, dtype=ref.probs.dtype), torch.ones((b, c, 2), dtype=torch.float64, device=dev),
                    zeros(b, c), torch.tensor(image_sizes, dtype=torch.long, device=dev).reshape(b, 2),
                    [tuple(s) for s in image_sizes],
                    [[(int(w.scale[0]) if len(w) else 0, f) for w, f in g] for g in groups_per_image])
        for i, w in enumerate(wins):
            if w is None or not len(w):
                continue
            n = len(w)
            batch.scores[i, :n], batch.valid[i, :n], batch.cells[i, :n] = w.scores, True, w.cells.long()
            batch.probs[i, :n], batch.factor[i, :n], batch.scale[i, :n] = w.probs, w.factor.double(), w.scale.long()
        return batch

    def candidates(self, stride: int) -> list["Candidates"]:
        """Each image's windows on the host (one copy per field for the whole batch)."""
        host = {f: getattr(self, f).cpu().numpy() for f in ("scores", "valid", "cells", "probs", "factor", "scale")}
        out = []
        for i, size in enumerate(self.image_sizes):
            keep = host["valid"][i]
            pick = {f: v[i][keep] for f, v in host.items()}
            out.append(Candidates(tuple(size), pick["scores"].astype(np.float32), pick["cells"].astype(np.int32),
                                  pick["probs"].astype(np.float32), pick["scale"].astype(np.int32),
                                  pick["factor"].astype(np.float32), stride))
        return out


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
    def from_windows(cls, groups: Groups, image_size: tuple[int, int], stride: int) -> "Candidates":
        host = lambda t: t.cpu().numpy()  # noqa: E731
        w = Windows.cat([g for g, _ in groups])
        return cls(tuple(image_size), host(w.scores).astype(np.float32), host(w.cells).astype(np.int32),
                   host(w.probs).astype(np.float32), host(w.scale).astype(np.int32),
                   host(w.factor).astype(np.float32), stride)


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
