"""The models this project trains and evaluates, by name: name -> module class, checkpoint kind,
whether it is windowed. Training, checkpoints and evaluation look a model up here instead of
branching on its name; what each does with a model lives with that job:

    spec = get("deepmask")
    model = spec.build(ModelConfig(backbone="vgg16_narrow"))
    loss, parts = ifcn.train.loss.loss_for(spec.name)(model, example, batch, device)   # training
    predictor = ifcn.inference.predictor.predictor_for(model, InferenceConfig())                  # inference

A checkpoint stores its kind (`spec.kind`); ifcn.models.checkpoint.load_model builds the model of that kind.
This module imports the networks only: no predictor, no loss, no training code.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .baseline import FCNBaseline
from .checkpoint_header import DEFAULT_KIND  # noqa: F401  (re-exported: the kind of files without one)
from ifcn.config import ModelConfig

from .deepmask import DeepMask
from .instancefcn import InstanceFCN


@dataclass(frozen=True)
class ModelSpec:
    """One model.

    module: its nn.Module class, built from a ModelConfig. windowed: forward gives per-window mask
    maps and objectness, so training samples windows and ifcn.Predictor (and the pipeline) runs it;
    the FCN baseline's one foreground map is run by its own predictor (connected components).
    """

    name: str
    module: type[nn.Module]
    windowed: bool
    about: str

    @property
    def kind(self) -> str:
        """What a checkpoint of this model stores as its kind."""
        return self.name

    def build(self, config: ModelConfig) -> nn.Module:
        return self.module(config)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model itself, also when DDP wraps it (DDP keeps it in `.module`)."""
    return model.module if hasattr(model, "module") else model


REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("instancefcn", InstanceFCN, True,
              "InstanceFCN (Dai et al. 2016): k*k instance-sensitive score maps + objectness"),
    ModelSpec("fcn-baseline", FCNBaseline, False,
              "one foreground map; its connected components are the instances"),
    ModelSpec("deepmask", DeepMask, True,
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
    core = unwrapped(model)
    for spec in REGISTRY.values():
        if type(core) is spec.module:
            return spec.kind
    for spec in REGISTRY.values():
        if isinstance(core, spec.module):
            return spec.kind
    raise ValueError(f"{type(core).__name__}: not a registered model; register it in ifcn.models.registry.REGISTRY "
                     f"(known: {[s.module.__name__ for s in REGISTRY.values()]})")


def head_parameters(model: nn.Module) -> int:
    """Parameters outside the trunk (`features.*`): what the methods' heads cost."""
    return sum(p.numel() for name, p in unwrapped(model).named_parameters() if not name.startswith("features."))
