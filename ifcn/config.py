"""Frozen configs with the paper's defaults (Dai et al., ECCV 2016, arXiv:1603.08678)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Backbone name -> channel widths of VGG-16's five conv stages. "vgg16" is the paper's;
# "vgg16_narrow" keeps the topology (13 convs, same strides/dilations) at 1/4 width so a
# 2-core CPU can train and run it in minutes.
BACKBONE_WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "vgg16": (64, 128, 256, 512, 512),
    "vgg16_narrow": (16, 32, 64, 128, 128),
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_WIDTHS)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are the paper's: VGG-16, k = 5, m = 21 cells (168 px)."""

    backbone: str = "vgg16"
    k: int = 5  # instance-sensitive score maps are k*k; k = 5 for all reported results
    m: int = 21  # window side in feature cells (21 * 8 = 168 px)
    stride: int = 8  # pool4 stride 1 + dilated conv5 -> stride 8
    head_channels: int | None = None  # None -> the backbone's last width (512 for VGG-16)
    batch_norm: bool | None = None  # None -> only the narrow variant (trains from scratch)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_WIDTHS:
            raise ValueError(
                f"ModelConfig.backbone={self.backbone!r}: unknown; choose one of {list(BACKBONES)}"
            )
        if self.stride != 8:
            raise ValueError(f"ModelConfig.stride={self.stride}: only 8 is supported (VGG-16 pool4/conv5 hole algorithm)")
        if self.k < 1 or self.m < self.k:
            raise ValueError(f"ModelConfig: need 1 <= k <= m, got k={self.k}, m={self.m}")

    @property
    def widths(self) -> tuple[int, int, int, int, int]:
        return BACKBONE_WIDTHS[self.backbone]

    @property
    def head_width(self) -> int:
        return self.head_channels or self.widths[-1]

    @property
    def use_batch_norm(self) -> bool:
        return self.backbone != "vgg16" if self.batch_norm is None else self.batch_norm

    @property
    def window_px(self) -> int:
        """Window side in pixels of the resized image (168 for m = 21)."""
        return self.m * self.stride

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# NMS modes, defined once (CLIs take their choices from here): "box", IoU of the masks' tight boxes
# (the paper's); "mask", IoU of the masks themselves (stricter).
NMS_MODES: tuple[str, ...] = ("box", "mask")

# 600 * 1.5 ** e for e in -4..1, rounded: the paper's six inference scales.
PAPER_SCALES: tuple[int, ...] = tuple(int(round(600 * 1.5**e)) for e in range(-4, 2))


@dataclass(frozen=True)
class InferenceConfig:
    """Multi-scale inference. Defaults follow the paper (6 scales, box NMS at 0.8, top 1000)."""

    scales: tuple[int, ...] = PAPER_SCALES  # short side in pixels per scale
    max_size: int = 2000  # cap on the long side after resizing (keeps huge aspect ratios bounded)
    # Windows assembled: the best windows_per_scale * len(scales) by objectness across all scales
    # (a global ranking, so a scale with many good windows may give more than its share).
    windows_per_scale: int = 1000
    mask_threshold: float = 0.5  # probability threshold that binarises pasted masks
    nms: str = "box"  # "box": IoU of the masks' tight boxes (the paper's); "mask": IoU of the masks (stricter)
    nms_iou: float = 0.8  # IoU (per `nms`) above which the lower-scored proposal is dropped
    max_proposals: int = 1000  # kept after NMS (the paper's AR@1000)
    min_score: float = 0.0  # objectness probability floor; 0 keeps everything
    # Batching: each resized image is padded up to a multiple of `pad_to` px so that differently
    # sized images share a forward; 0 batches only images of identical size. Padding never makes a
    # window or a mask pixel, and an image's result never depends on its batch mates.
    pad_to: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if not self.scales or min(self.scales) < 8:
            raise ValueError(f"InferenceConfig.scales={self.scales}: need at least one short side >= 8 px")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"InferenceConfig.mask_threshold={self.mask_threshold}: must be in (0, 1)")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"InferenceConfig.nms_iou={self.nms_iou}: must be in (0, 1]")
        if self.nms not in NMS_MODES:
            raise ValueError(f"InferenceConfig.nms={self.nms!r}: choose one of {list(NMS_MODES)} ('box' is the paper's)")
        if self.pad_to < 0 or self.pad_to % 8:
            raise ValueError(f"InferenceConfig.pad_to={self.pad_to}: must be 0 or a multiple of 8 px (the stride)")
        if self.max_proposals < 1 or self.windows_per_scale < 1:
            raise ValueError("InferenceConfig: max_proposals and windows_per_scale must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InferenceConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
