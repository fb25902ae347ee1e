"""InstanceFCN: VGG-16 trunk at stride 8 + instance-sensitive score and objectness heads.

    images (N, 3, H, W) -> scores (N, k*k, ceil(H/8), ceil(W/8)), objectness (N, 1, same)
"""
from __future__ import annotations

import torch
from torch import nn

from ifcn.config import ModelConfig
from ifcn.ops.assembling import assemble

# torchvision's vgg16 "features" indices of the 13 convs; keeping them lets an ImageNet
# state dict load key for key (features.0.weight ... features.28.bias).
_CONVS_PER_STAGE = (2, 2, 3, 3, 3)


def _vgg16_trunk(widths: tuple[int, ...], batch_norm: bool) -> nn.Sequential:
    """VGG-16's 13 convs; pools 1-3 halve (ceil), pool4 has stride 1, conv5 is dilated by 2."""
    layers: list[nn.Module] = []
    in_ch = 3
    for stage, (n_convs, width) in enumerate(zip(_CONVS_PER_STAGE, widths)):
        dilation = 2 if stage == 4 else 1  # the "hole algorithm" keeps conv5's field of view
        for _ in range(n_convs):
            layers.append(nn.Conv2d(in_ch, width, 3, padding=dilation, dilation=dilation))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            in_ch = width
        if stage < 3:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: features are ceil(H/8)
        elif stage == 3:
            layers.append(nn.MaxPool2d(3, 1, padding=1))  # pool4, stride 1
    return nn.Sequential(*layers)


class InstanceFCN(nn.Module):
    """The paper's network. Parameters live in `features`, `score_head`, `objectness_head`."""

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        c, h, kk = config.widths[-1], config.head_width, config.k * config.k
        self.features = _vgg16_trunk(config.widths, config.use_batch_norm)
        # Instance-sensitive score maps: 1x1 conv + ReLU, then 3x3 conv to k*k maps.
        self.score_head = nn.Sequential(nn.Conv2d(c, h, 1), nn.ReLU(inplace=True), nn.Conv2d(h, kk, 3, padding=1))
        # Objectness: 3x3 conv + ReLU, then 1x1 conv to one logit per window centre.
        self.objectness_head = nn.Sequential(nn.Conv2d(c, h, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(h, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, (self.score_head[-1], self.objectness_head[-1]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) normalised -> (scores (N, k*k, h, w), objectness (N, 1, h, w))."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InstanceFCN.forward: expected images (N, 3, H, W), got {tuple(images.shape)}")
        feats = self.features(images)  # (N, C, ceil(H/8), ceil(W/8))
        return self.score_head(feats), self.objectness_head(feats)

    def window_logits(self, scores: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """scores (N, k*k, h, w) from forward, windows (n, 3) long (image, y0, x0) -> (n, m, m) mask
        logits by assembling (the Predictor's per-window masks; DeepMask has its own)."""
        return assemble(scores, windows, self.config.m)

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies torchvision-layout `features.*` weights; other keys (classifier.*) are ignored."""
        own = self.features.state_dict()
        given = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
        missing = sorted(set(own) - set(given), key=_key_order)
        unexpected = sorted(set(given) - set(own), key=_key_order)
        if missing or unexpected:
            raise ValueError(
                f"backbone weights do not match backbone {self.config.backbone!r} "
                f"(batch_norm={self.config.use_batch_norm}): missing {['features.' + k for k in missing][:6]}, "
                f"unexpected {['features.' + k for k in unexpected][:6]}; expected torchvision's "
                f"vgg16 layout (features.0.weight ... features.28.bias)"
            )
        bad = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in own.items() if given[k].shape != v.shape]
        if bad:
            k, got, want = bad[0]
            raise ValueError(
                f"backbone weights do not match backbone {self.config.backbone!r}: features.{k} has shape "
                f"{got}, model needs {want} ({len(bad)} tensors differ); use --backbone vgg16 for ImageNet VGG-16"
            )
        self.features.load_state_dict(given)


def init_weights(module: nn.Module, outputs: tuple[nn.Conv2d, ...]) -> None:
    """He init for ReLU convs, identity BatchNorm; output convs start near zero (std 0.01) so
    early logits are ~0 and neither loss term swamps the other."""
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    for last in outputs:
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)


def _key_order(key: str) -> tuple[int, str]:
    head, _, tail = key.partition(".")
    return (int(head) if head.isdigit() else -1, tail)


def load_vgg16_weights(model: InstanceFCN, url: str, storage_options: dict | None = None) -> InstanceFCN:
    """Initialises the trunk from an ImageNet VGG-16 state dict (torchvision layout) at any fsspec URL."""
    from ifcn.io import open_url

    with open_url(url, "rb", storage_options) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"VGG-16 weights {url}: expected a state dict, got {type(state).__name__}")
    model.load_backbone_state_dict(state)
    return model
