"""Training windows and their targets, as the paper (DeepMask's rule scaled to a 168 px window).

A window is centred on a feature cell (y, x): at stride s with m cells its centre sits at resized
pixel (s*y + c, s*x + c), c = s*(m - 2*(m//2))/2 (4 px for odd m). It is
  positive  when an instance's box centre is within `pos_shift` px of it (per axis) and the
            instance's larger side is within `pos_scale`^±1 of `object_px`;
  negative  when for every instance the centre is off by >= `neg_shift` px or the size by
            >= `neg_scale`^±1, and the centre is not on a crowd region;
  ignored   otherwise (also whenever a crowd instance would make it positive or ambiguous).
Its mask target is the instance's mask cropped to the window and reduced to m x m cells
(a cell is foreground when >= half of it is covered).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ifcn.ops import assemble
from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1

# DeepMask's rule is stated for a 224 px window; InstanceFCN's is 168 px, so it scales by 168/224.
_DEEPMASK_WINDOW = 224.0


@dataclass(frozen=True)
class WindowRule:
    """Positive/negative thresholds in resized pixels (defaults: DeepMask's x 168/224)."""

    pos_shift: float = 16 * 168 / 224  # 12 px
    neg_shift: float = 32 * 168 / 224  # 24 px
    object_px: float = 128 * 168 / 224  # 96 px
    pos_scale: float = 2 ** 0.25
    neg_scale: float = 2.0

    @classmethod
    def for_window(cls, window_px: int) -> "WindowRule":
        f = window_px / _DEEPMASK_WINDOW
        return cls(16 * f, 32 * f, 128 * f)


@dataclass
class Example:
    """One augmented image at its training scale.

    image: (1, 3, h, w) normalised; masks: (N, h, w) float in [0, 1] at the resized size;
    boxes: (N, 4) float (x, y, w, h) in resized pixels; iscrowd: (N,) bool; scale: short side.
    """

    image: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    iscrowd: torch.Tensor
    scale: int


def augment(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, iscrowd: np.ndarray,
            rng: np.random.Generator, scales: tuple[int, ...], max_size: int, flip: bool) -> Example:
    """Random horizontal flip + short side drawn from `scales` (the paper's scale jitter).

    image: (H, W, 3) uint8; masks: (N, H, W) {0, 1}; boxes: (N, 4) xywh in image pixels.
    """
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    if flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
    short = int(scales[int(rng.integers(len(scales)))])
    size = scaled_size(height, width, short, max_size)
    fy, fx = size[0] / height, size[1] / width
    x = normalize(resize(image_to_tensor(np.ascontiguousarray(image)), size))  # (1, 3, h, w)
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]  # (N, 1, H, W)
    m = resize(m, size)[:, 0] if m.shape[0] else m.new_zeros((0, *size))  # (N, h, w)
    scaled = torch.from_numpy(boxes * np.array([fx, fy, fx, fy], dtype=np.float32))
    return Example(x, m, scaled, torch.from_numpy(np.asarray(iscrowd, dtype=bool)), short)


def cell_fractions(masks: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """(N, h, w) masks -> (N, ceil(h/s), ceil(w/s)) fraction of each stride x stride cell covered."""
    n, h, w = masks.shape
    ph, pw = -h % stride, -w % stride
    padded = F.pad(masks, (0, pw, 0, ph))  # outside the image is background
    return F.avg_pool2d(padded[:, None], stride)[:, 0] if n else masks.new_zeros((0, (h + ph) // stride,
                                                                                   (w + pw) // stride))


def window_centres(size: tuple[int, int], m: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized-pixel centres (cy (h,), cx (w,)) of the windows centred on each feature cell."""
    offset = stride * (m - 2 * (m // 2)) / 2.0
    return (torch.arange(size[0]) * stride + offset, torch.arange(size[1]) * stride + offset)


def window_labels(boxes: torch.Tensor, iscrowd: torch.Tensor, crowd_cells: torch.Tensor, feat_size: tuple[int, int],
                  m: int, stride: int, rule: WindowRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Label every window centre.

    boxes: (N, 4) xywh resized px; iscrowd: (N,) bool; crowd_cells: (h, w) bool, cells covered by
    a crowd region. Returns labels (h, w) int8 in {POSITIVE, NEGATIVE, IGNORE} and instance
    (h, w) long: the positive window's instance (nearest centre), -1 elsewhere.
    """
    h, w = feat_size
    cy, cx = window_centres(feat_size, m, stride)
    if boxes.shape[0] == 0:
        labels = torch.where(crowd_cells, IGNORE, NEGATIVE).to(torch.int8)
        return labels, torch.full((h, w), -1, dtype=torch.long)
    bx, by, bw, bh = boxes.float().unbind(1)  # (N,) each
    dy = (by + bh / 2)[:, None, None] - cy[None, :, None]  # (N, h, 1)
    dx = (bx + bw / 2)[:, None, None] - cx[None, None, :]  # (N, 1, w)
    shift = torch.maximum(dy.abs(), dx.abs())  # (N, h, w)
    log_ratio = torch.log2(torch.maximum(bw, bh).clamp(min=1e-6) / rule.object_px).abs()[:, None, None]  # (N, 1, 1)
    pos = (shift <= rule.pos_shift) & (log_ratio <= math.log2(rule.pos_scale))  # (N, h, w)
    near = (shift < rule.neg_shift) & (log_ratio < math.log2(rule.neg_scale))  # not negative
    crowd = iscrowd[:, None, None]
    pos_any = (pos & ~crowd).any(0)
    blocked = (near & crowd).any(0) | crowd_cells  # crowd makes a window ignored, never negative
    labels = torch.full((h, w), IGNORE, dtype=torch.int8)
    labels[~near.any(0) & ~crowd_cells] = NEGATIVE
    labels[pos_any & ~blocked] = POSITIVE
    cost = torch.where(pos & ~crowd, shift + log_ratio, torch.full_like(shift, float("inf")))
    instance = torch.where(labels == POSITIVE, cost.argmin(0), torch.full((h, w), -1, dtype=torch.long))
    return labels, instance


def sample_windows(labels: torch.Tensor, count: int, positive_fraction: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cell indices (positives, negatives): all positives up to count*fraction, negatives fill."""
    flat = labels.reshape(-1)
    pos = torch.nonzero(flat == POSITIVE).reshape(-1)
    neg = torch.nonzero(flat == NEGATIVE).reshape(-1)
    n_pos = min(len(pos), int(count * positive_fraction))
    n_neg = min(len(neg), count - n_pos)
    pos = pos[torch.randperm(len(pos), generator=generator)[:n_pos]]
    neg = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
    return pos, neg


def mask_targets(fractions: torch.Tensor, instance: torch.Tensor, centres: torch.Tensor, m: int) -> torch.Tensor:
    """(P, m, m) float {0, 1}: each positive window's instance mask, cropped and reduced to cells.

    fractions: (N, h, w) cell coverage per instance; instance: (P,) long; centres: (P, 2) long
    (y, x) feature cells. Cropping m x m cells with zeros outside the map is what `assemble`
    does with one score map per "image", so it is reused here (outside reads a negative logit).
    """
    windows = torch.cat([instance[:, None], centres - m // 2], dim=1)  # (P, 3): (instance, y0, x0)
    return (assemble(fractions[:, None], windows, m) >= 0.5).float()


@dataclass
class WindowBatch:
    """Sampled windows of one example: cells (S, 2) long (y, x) centres, labels (S,) float {0, 1};
    the first P are positives, with mask targets (P, m, m)."""

    cells: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor

    @property
    def num_positive(self) -> int:
        return self.targets.shape[0]


def sample_example(example: Example, m: int, stride: int, count: int, positive_fraction: float,
                   generator: torch.Generator, rule: WindowRule | None = None) -> WindowBatch:
    """Labels, samples and builds targets for one example's windows."""
    rule = rule or WindowRule.for_window(m * stride)
    fractions = cell_fractions(example.masks, stride)  # (N, h, w)
    feat = (math.ceil(example.image.shape[-2] / stride), math.ceil(example.image.shape[-1] / stride))
    crowd_cells = (fractions[example.iscrowd] > 0).any(0) if bool(example.iscrowd.any()) else torch.zeros(
        feat, dtype=torch.bool)
    labels, instance = window_labels(example.boxes, example.iscrowd, crowd_cells, feat, m, stride, rule)
    pos, neg = sample_windows(labels, count, positive_fraction, generator)
    flat = torch.cat([pos, neg])
    cells = torch.stack([flat // feat[1], flat % feat[1]], dim=1)  # (S, 2)
    targets = mask_targets(fractions, instance.reshape(-1)[pos], cells[: len(pos)], m)
    lab = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    return WindowBatch(cells, lab, targets)
