"""Training: window sampling + targets (sampling), the loss (loss), the Ray Train loop (loop)."""
from .config import MODELS, TrainConfig
from .loop import build_model, train, train_local

__all__ = ["MODELS", "TrainConfig", "build_model", "train", "train_local"]
