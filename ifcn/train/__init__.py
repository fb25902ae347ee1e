"""Training: window sampling + targets (sampling), the loss (loss), the Ray Train loop (loop)."""
from .config import MODELS, PRESETS, TrainConfig
from .loop import build_model, train, train_local

__all__ = ["MODELS", "PRESETS", "TrainConfig", "build_model", "train", "train_local"]
