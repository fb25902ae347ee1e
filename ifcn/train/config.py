"""Training configuration: one frozen dataclass; a preset fills what the caller leaves unset.

Paper (preset "paper", Dai et al., ECCV 2016): VGG-16, SGD, lr 0.001 for 32k iterations then
0.0001 for 8k, momentum 0.9, weight decay 5e-4, one image per GPU, 256 windows per image sampled
1:1, short side drawn from 600 x 1.5^{-4..1}. Preset "small" (the default): the narrow trunk at
short sides 192-384 for 2000 steps, which a 2-core CPU trains to a useful model in ~10 minutes.
With max_minutes the schedule (warm-up, lr drop) follows whichever of steps and time runs out first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ifcn.config import BACKBONES, PAPER_SCALES, InferenceConfig
from ifcn.models.registry import names as model_names

MODELS: tuple[str, ...] = model_names()  # the registry's (ifcn/models/registry.py): instancefcn, fcn-baseline, deepmask

# The narrow BatchNorm trunk trains from scratch in minutes on a CPU, which the paper's lr 0.001
# (tuned for an ImageNet-initialised VGG-16 over 40k iterations) is far too slow for. These
# apply only when --lr / --warmup-steps are not given; --backbone vgg16 keeps the paper's values.
NARROW_DEFAULTS: dict[str, Any] = {"lr": 0.02, "warmup_steps": 100}
PAPER_DEFAULTS: dict[str, Any] = {"lr": 0.001, "warmup_steps": 0}

# What a preset sets when the field is None. "small": the README's CPU recipe (AR@100 ~0.7 on the
# synthetic benchmark in 10 CPU-minutes); "paper": the paper's VGG-16 schedule and scales.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"backbone": "vgg16_narrow", "scales": (192, 256, 320, 384), "steps": 2000, "lr_step": 1600},
    "paper": {"backbone": "vgg16", "scales": PAPER_SCALES, "steps": 40000, "lr_step": 32000},
}
AMP: tuple[str, ...] = ("bf16",)  # autocast dtypes; bf16 needs no loss scaling
# Training resizes exactly as inference does, so every inference scale is one the model trained at.
INFERENCE_MAX_SIZE: int = InferenceConfig().max_size


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `to_dict`/`from_dict` carry it to Ray workers and checkpoints."""

    images: str  # folder URL holding the COCO file_name entries
    annotations: str  # COCO instances JSON URL
    output: str  # folder URL: checkpoint.pt (resume), model.pt (final), loss.csv, loss.png
    model: str = "instancefcn"  # ifcn.models.registry registry: "instancefcn", "deepmask" or "fcn-baseline"
    preset: str = "small"  # fills backbone, scales, steps, lr_step left None (PRESETS)
    backbone: str | None = None  # None -> the preset's
    num_workers: int = 1  # Ray Train workers (DDP; gloo on CPU)
    cpus_per_worker: int = 1  # torch threads per worker
    use_gpu: bool = False
    lr: float | None = None  # None -> backbone default (paper 0.001 for vgg16, see NARROW_DEFAULTS)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    steps: int | None = None  # schedule length (paper: 40k iterations); None -> the preset's
    lr_step: int | None = None  # lr *= lr_gamma from this step on (paper: 32k); None -> the preset's
    lr_gamma: float = 0.1
    warmup_steps: int | None = None  # linear warmup; None -> backbone default
    windows_per_image: int = 256
    positive_fraction: float = 0.5  # 1:1 positives:negatives; negatives fill when positives are few
    scales: tuple[int, ...] | None = None  # training short sides, one drawn per image; None -> the preset's
    max_size: int = INFERENCE_MAX_SIZE  # cap on the resized long side (inference's, so scales match)
    flip: bool = True  # random horizontal flip
    vgg16_weights: str | None = None  # ImageNet VGG-16 state dict URL (torchvision layout)
    max_minutes: float | None = None  # training-time budget over all resumed runs; the schedule follows it
    max_steps: int | None = None  # stop (and save) at this absolute step (the schedule keeps `steps`)
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable checkpoints
    log_every: int = 20  # steps between progress lines / loss-curve points
    storage_options: dict[str, Any] | None = None  # fsspec options for every URL
    amp: str | None = None  # "bf16": autocast the forward and loss (CUDA; CPU works too, slowly)
    data_workers: int = 2  # DataLoader processes per Ray Train worker decoding ahead; 0: in the step
    prefetch: int = 2  # steps each data worker keeps ready
    val_images: str | None = None  # validation image folder URL (with val_annotations)
    val_annotations: str | None = None  # validation COCO JSON: AR@100 every val_every steps
    val_every: int = 500  # steps between validations (and at the last step)
    val_max_images: int = 20  # the first N validation images (keeps validation a small share of the run)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"TrainConfig.preset={self.preset!r}: choose one of {list(PRESETS)}")
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if self.model not in MODELS:
            raise ValueError(f"TrainConfig.model={self.model!r}: choose one of {list(MODELS)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"TrainConfig.backbone={self.backbone!r}: choose one of {list(BACKBONES)}")
        if not self.scales or min(self.scales) < 32:
            raise ValueError(f"TrainConfig.scales={self.scales}: need at least one short side >= 32 px")
        if self.steps < 1 or self.windows_per_image < 2 or self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError("TrainConfig: steps >= 1, windows_per_image >= 2, num_workers >= 1 and "
                             "cpus_per_worker >= 1 are required")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"TrainConfig: checkpoint_every={self.checkpoint_every} and log_every={self.log_every} "
                             f"must be >= 1")
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ValueError(f"TrainConfig.positive_fraction={self.positive_fraction}: must be in (0, 1]")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr}: must be > 0")
        if self.amp is not None and self.amp not in AMP:
            raise ValueError(f"TrainConfig.amp={self.amp!r}: choose one of {list(AMP)} or None (fp32)")
        if self.data_workers < 0 or self.prefetch < 1:
            raise ValueError(f"TrainConfig: data_workers={self.data_workers} must be >= 0 and "
                             f"prefetch={self.prefetch} >= 1")
        if (self.val_images is None) != (self.val_annotations is None):
            raise ValueError("TrainConfig: give both val_images and val_annotations, or neither")
        if self.val_every < 1 or self.val_max_images < 1:
            raise ValueError(f"TrainConfig: val_every={self.val_every} and val_max_images={self.val_max_images} "
                             f"must be >= 1")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes}: must be >= 0")

    def _default(self, name: str) -> Any:
        return (PAPER_DEFAULTS if self.backbone == "vgg16" else NARROW_DEFAULTS)[name]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self._default("lr")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self._default("warmup_steps")

    def position(self, step: int, elapsed_s: float = 0.0) -> float:
        """Where the run is in its schedule, in steps: step, or further when the time budget runs faster.

        With max_minutes, elapsed_s / budget of the way through the time budget counts as that share
        of `steps`, so warm-up and the lr drop land at the same fractions of whichever ends first.
        """
        if self.max_minutes is None:
            return float(step)
        budget = 60.0 * self.max_minutes
        return max(float(step), self.steps * (elapsed_s / budget if budget > 0 else 1.0))

    def lr_at(self, step: int, elapsed_s: float = 0.0) -> float:
        """Step schedule with optional linear warmup: the paper's 0.001 -> 0.0001 at 32k (of 40k).

        elapsed_s: training time so far (all resumed runs); it matters only with max_minutes.
        """
        at = self.position(step, elapsed_s)
        lr = self.learning_rate * (self.lr_gamma if at >= self.lr_step else 1.0)
        if at < self.warmup:
            lr *= (at + 1) / self.warmup
        return lr

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
