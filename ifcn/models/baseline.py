"""Baseline: a plain FCN with one foreground map; its connected components are the instances.

Same VGG-16 trunk (stride 8) as InstanceFCN, a 1-map head, per-pixel logistic loss on the union
of instance masks, trained by the same loop with the same budget:

    python -m jobs.train --model fcn-baseline --images ... --annotations ... --output ...

It cannot split touching instances of one class (their union is one component), which is the
case InstanceFCN's instance-sensitive maps were built for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from ifcn.config import InferenceConfig, ModelConfig
from ifcn.ops.transforms import image_to_tensor, normalize, resize, scaled_size

from .instancefcn import InstanceFCN, _vgg16_trunk, init_weights

MODEL_NAME = "fcn-baseline"


class FCNBaseline(nn.Module):
    """images (N, 3, H, W) normalised -> foreground logits (N, 1, ceil(H/8), ceil(W/8))."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        c, h = config.widths[-1], config.head_width
        self.features = _vgg16_trunk(config.widths, config.use_batch_norm)
        self.head = nn.Sequential(nn.Conv2d(c, h, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(h, 1, 1))
        init_weights(self, (self.head[-1],))

    load_backbone_state_dict = InstanceFCN.load_backbone_state_dict  # same trunk, same ImageNet layout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FCNBaseline.forward: expected images (N, 3, H, W), got {tuple(images.shape)}")
        return self.head(self.features(images))


def baseline_loss(logits: torch.Tensor, example: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pixel logistic loss of (1, 1, h/8, w/8) logits, upsampled to the example's size, against
    the union of its non-crowd masks; crowd pixels carry no loss (as COCO ignores them)."""
    size = example.image.shape[-2:]
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0, 0]  # (h, w)
    masks = example.masks.to(up.device)
    crowd = example.iscrowd.to(up.device)
    union = (masks[~crowd] >= 0.5).any(0).float() if bool((~crowd).any()) else torch.zeros_like(up)
    weight = ~((masks[crowd] >= 0.5).any(0)) if bool(crowd.any()) else torch.ones_like(up, dtype=torch.bool)
    loss = F.binary_cross_entropy_with_logits(up, union, weight=weight.float())
    return loss, {"mask": float(loss.detach())}


def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """4-connected components of a (H, W) bool mask -> (labels (H, W) long, 0 = background, count).

    Label propagation: every pixel takes the largest index among its 4 neighbours until nothing
    changes; vectorised, no Python loop over pixels.
    """
    h, w = mask.shape
    idx = torch.arange(1, h * w + 1, dtype=torch.long).reshape(h, w)
    labels = torch.where(mask, idx, torch.zeros_like(idx))
    while True:
        p = F.pad(labels, (1, 1, 1, 1))
        nxt = torch.stack([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]).amax(0)
        nxt = torch.where(mask, nxt, torch.zeros_like(nxt))
        if torch.equal(nxt, labels):
            break
        labels = nxt
    uniq, dense = torch.unique(labels, return_inverse=True)
    if uniq[0] != 0:  # every pixel is foreground
        dense = dense + 1
    return dense.reshape(h, w), int((uniq > 0).sum())


@torch.inference_mode()
def foreground_probability(model: FCNBaseline, image: np.ndarray, config: InferenceConfig) -> torch.Tensor:
    """(H, W) foreground probability averaged over config.scales, at image size."""
    height, width = image.shape[:2]
    base = image_to_tensor(image)
    total = torch.zeros(height, width)
    for short in config.scales:
        x = normalize(resize(base, scaled_size(height, width, short, config.max_size)))
        logits = model(x)  # (1, 1, h, w)
        total += torch.sigmoid(F.interpolate(logits, size=(height, width), mode="bilinear",
                                             align_corners=False))[0, 0]
    return total / len(config.scales)


def predict(model: FCNBaseline, image: np.ndarray, config: InferenceConfig = InferenceConfig()) -> list[dict[str, Any]]:
    """image (H, W, 3) uint8 -> proposals like ifcn.Predictor.predict, best first.

    Each connected component of (probability > mask_threshold) is one proposal scored by its
    mean probability; `scale` is 0 (the map averages every scale).
    """
    model = model.eval()
    prob = foreground_probability(model, image, config)
    labels, count = connected_components(prob > config.mask_threshold)
    out = []
    for c in range(1, count + 1):
        comp = (labels == c).numpy()
        score = float(prob.numpy()[comp].mean())
        if score < config.min_score:
            continue
        rle = mask_utils.encode(np.asfortranarray(comp.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"score": score, "rle": rle, "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": int(comp.sum()), "scale": 0})
    out.sort(key=lambda d: -d["score"])
    return out[: config.max_proposals]


class BaselinePredictor:
    """`predict(image)` for the baseline, as ifcn.Predictor offers it for the windowed models (CPU)."""

    def __init__(self, model: FCNBaseline, config: InferenceConfig = InferenceConfig()) -> None:
        self.model, self.config = model.cpu().eval(), config

    def predict(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image (H, W, 3) uint8 -> proposals best first (see `predict`)."""
        return predict(self.model, image, self.config)
