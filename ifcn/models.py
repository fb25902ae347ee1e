"""The models this project trains and evaluates, in one registry: name -> module, training loss,
checkpoint kind, predictor. Training, checkpoints and evaluation look a model up here instead of
branching on its name.

    spec = get("deepmask")
    model = spec.build(ModelConfig(backbone="vgg16_narrow"))
    loss, parts = spec.loss(model, example, batch, device)   # batch: sampled windows (spec.windowed) or None
    predictor = spec.predictor(model, InferenceConfig(), None) # .predict(image (H, W, 3) uint8) -> proposals

A checkpoint stores its kind (`spec.kind`); ifcn.checkpoint.load_model builds the model of that kind.
This module imports no training code (ifcn.train imports it), so the two never import each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .baseline import BaselinePredictor, FCNBaseline, baseline_loss
from .checkpoint_header import DEFAULT_KIND  # noqa: F401  (re-exported: the kind of files without one)
from .config import InferenceConfig, ModelConfig
from .deepmask import DeepMask
from .model import InstanceFCN
from .assembling import assemble
from .predictor import Predictor

if TYPE_CHECKING:
    from .train.sampling import Example, WindowBatch

Loss = Callable[[nn.Module, "Example", "WindowBatch | None", torch.device], tuple[torch.Tensor, dict[str, float]]]
MakePredictor = Callable[[nn.Module, InferenceConfig, "str | torch.device | None"], Any]


@dataclass(frozen=True)
class ModelSpec:
    """One model.

    module: its nn.Module class, built from a ModelConfig. loss: (model, example, batch, device) ->
    (loss, parts); `model` may be DDP-wrapped, `batch` is the example's sampled windows when
    `windowed`, else None. predictor: (model, InferenceConfig, device) -> an object whose
    `predict(image)` gives proposals best first. windowed: forward gives per-window mask maps and
    objectness, so training samples windows and ifcn.Predictor (and the pipeline) runs it.
    """

    name: str
    module: type[nn.Module]
    loss: Loss
    predictor: MakePredictor
    windowed: bool
    about: str

    @property
    def kind(self) -> str:
        """What a checkpoint of this model stores as its kind."""
        return self.name

    def build(self, config: ModelConfig) -> nn.Module:
        return self.module(config)


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


def _core(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DDP keeps the model in .module


def _top_left(batch: "WindowBatch", m: int, count: int, device: torch.device) -> torch.Tensor:
    """(count, 3) long (image 0, y0, x0) of the batch's first `count` windows (centres - m // 2)."""
    cells = batch.cells[:count].to(device)
    return torch.cat([cells.new_zeros((len(cells), 1)), cells - m // 2], dim=1)


def instancefcn_loss(model: nn.Module, example: "Example", batch: "WindowBatch",
                     device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness at the sampled centres; masks assembled from the k*k score maps."""
    scores, objectness = model(example.image.to(device))  # (1, k*k, h, w), (1, 1, h, w)
    return instancefcn_map_loss(scores, objectness, batch, _core(model).config.m)


def instancefcn_map_loss(scores: torch.Tensor, objectness: torch.Tensor, batch: "WindowBatch",
                         m: int) -> tuple[torch.Tensor, dict[str, float]]:
    """scores: (1, k*k, h, w), objectness: (1, 1, h, w) of one image -> `window_loss` of its windows."""
    ys, xs = batch.cells[:, 0].to(scores.device), batch.cells[:, 1].to(scores.device)
    masks = assemble(scores, _top_left(batch, m, batch.num_positive, scores.device), m)  # (P, m, m)
    return window_loss(masks, objectness[0, 0, ys, xs], batch, scores, objectness)


def deepmask_loss(model: nn.Module, example: "Example", batch: "WindowBatch",
                  device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """DeepMask's heads on the sampled windows only (the dense form gives the same numbers)."""
    m = _core(model).config.m
    masks, objectness = model(example.image.to(device), _top_left(batch, m, len(batch.cells), device))
    return window_loss(masks[:batch.num_positive], objectness, batch, masks, objectness)


def fcn_baseline_loss(model: nn.Module, example: "Example", batch: None,
                      device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    return baseline_loss(model(example.image.to(device)), example)


def _shared_predictor(model: nn.Module, config: InferenceConfig, device: str | torch.device | None) -> Predictor:
    return Predictor(model, config, device=device)


def _baseline_predictor(model: nn.Module, config: InferenceConfig,
                        device: str | torch.device | None) -> BaselinePredictor:
    return BaselinePredictor(model, config)


REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("instancefcn", InstanceFCN, instancefcn_loss, _shared_predictor, True,
              "InstanceFCN (Dai et al. 2016): k*k instance-sensitive score maps + objectness"),
    ModelSpec("fcn-baseline", FCNBaseline, fcn_baseline_loss, _baseline_predictor, False,
              "one foreground map; its connected components are the instances"),
    ModelSpec("deepmask", DeepMask, deepmask_loss, _shared_predictor, True,
              "DeepMask's heads (Pinheiro et al. 2015): per-window FC mask regression + score"),
)}


def names() -> tuple[str, ...]:
    """Every registered model name, InstanceFCN first."""
    return tuple(REGISTRY)


def get(name: str) -> ModelSpec:
    """The spec registered as `name`; a ValueError that lists the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"model {name!r}: unknown; choose one of {list(REGISTRY)}") from None


def for_kind(kind: str, source: str = "checkpoint") -> ModelSpec:
    """The spec of a checkpoint's kind; `source` names the checkpoint in the error."""
    if kind not in REGISTRY:
        raise ValueError(f"{source}: holds a model of unknown kind {kind!r}; this version knows "
                         f"{list(REGISTRY)} (a newer ifcn may have written it)")
    return REGISTRY[kind]


def kind_of(model: nn.Module) -> str:
    """The kind of a built model (by its class; subclasses count as their base)."""
    core = _core(model)
    for spec in REGISTRY.values():
        if type(core) is spec.module:
            return spec.kind
    for spec in REGISTRY.values():
        if isinstance(core, spec.module):
            return spec.kind
    raise ValueError(f"{type(core).__name__}: not a registered model; register it in ifcn.models.REGISTRY "
                     f"(known: {[s.module.__name__ for s in REGISTRY.values()]})")


def head_parameters(model: nn.Module) -> int:
    """Parameters outside the trunk (`features.*`): what the methods' heads cost."""
    return sum(p.numel() for name, p in _core(model).named_parameters() if not name.startswith("features."))
