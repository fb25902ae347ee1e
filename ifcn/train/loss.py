"""The training losses, one per registered model (ifcn.models.registry), looked up by the model's name.

InstanceFCN's and DeepMask's are the paper's loss over sampled windows: objectness logistic loss +
per-pixel logistic loss on the positives' masks, unweighted; the FCN baseline's is its own
(ifcn.models.baseline.baseline_loss). Each takes (model, example, batch, device) -> (loss, parts); `model`
may be DDP-wrapped, `batch` is the example's sampled windows for windowed models, else None.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ifcn.models.baseline import baseline_loss
from ifcn.models.registry import REGISTRY, unwrapped
from ifcn.ops.assembling import assemble

if TYPE_CHECKING:
    from .sampling import Example, WindowBatch

Loss = Callable[[nn.Module, "Example", "WindowBatch | None", torch.device], tuple[torch.Tensor, dict[str, float]]]


def window_loss(masks: torch.Tensor, objectness: torch.Tensor, batch: "WindowBatch",
                *outputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's loss over sampled windows, for every windowed model alike.

    masks: (P, m, m) logits of the batch's positives; objectness: (S,) logits of all its windows;
    outputs: the model's raw outputs, so that an empty term (no windows, no positives) is
    0 * their sum and every parameter stays in the graph (DDP needs that). Objectness: mean
    logistic loss; mask: mean per-pixel logistic loss against the targets; unweighted sum.
    """
    zero = sum(o.sum() for o in outputs) * 0.0
    obj = (F.binary_cross_entropy_with_logits(objectness, batch.labels.to(objectness.device, objectness.dtype))
           if len(batch.labels) else zero)
    p = batch.num_positive
    mask = F.binary_cross_entropy_with_logits(masks, batch.targets.to(masks.device, masks.dtype)) if p else zero
    return obj + mask, {"objectness": float(obj.detach()), "mask": float(mask.detach())}


def _top_left(batch: "WindowBatch", m: int, count: int, device: torch.device) -> torch.Tensor:
    """(count, 3) long (image 0, y0, x0) of the batch's first `count` windows (centres - m // 2)."""
    cells = batch.cells[:count].to(device)
    return torch.cat([cells.new_zeros((len(cells), 1)), cells - m // 2], dim=1)


def instancefcn_loss(model: nn.Module, example: "Example", batch: "WindowBatch",
                     device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness at the sampled centres; masks assembled from the k*k score maps."""
    scores, objectness = model(example.image.to(device))  # (1, k*k, h, w), (1, 1, h, w)
    return instancefcn_map_loss(scores, objectness, batch, unwrapped(model).config.m)


def instancefcn_map_loss(scores: torch.Tensor, objectness: torch.Tensor, batch: "WindowBatch",
                         m: int) -> tuple[torch.Tensor, dict[str, float]]:
    """scores: (1, k*k, h, w), objectness: (1, 1, h, w) of one image -> `window_loss` of its windows."""
    ys, xs = batch.cells[:, 0].to(scores.device), batch.cells[:, 1].to(scores.device)
    masks = assemble(scores, _top_left(batch, m, batch.num_positive, scores.device), m)  # (P, m, m)
    return window_loss(masks, objectness[0, 0, ys, xs], batch, scores, objectness)


def deepmask_loss(model: nn.Module, example: "Example", batch: "WindowBatch",
                  device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """DeepMask's heads on the sampled windows only (the dense form gives the same numbers)."""
    m = unwrapped(model).config.m
    masks, objectness = model(example.image.to(device), _top_left(batch, m, len(batch.cells), device))
    return window_loss(masks[:batch.num_positive], objectness, batch, masks, objectness)


def fcn_baseline_loss(model: nn.Module, example: "Example", batch: None,
                      device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    return baseline_loss(model(example.image.to(device)), example)


LOSSES: dict[str, Loss] = {"instancefcn": instancefcn_loss, "fcn-baseline": fcn_baseline_loss,
                           "deepmask": deepmask_loss}


def loss_for(name: str) -> Loss:
    """The loss of the registered model `name`."""
    if name not in LOSSES:
        known = [n for n in REGISTRY if n in LOSSES]
        raise ValueError(f"model {name!r}: no training loss; choose one of {known}")
    return LOSSES[name]
