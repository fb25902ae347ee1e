"""InstanceFCN (Dai et al., ECCV 2016): instance-sensitive fully convolutional networks.

The names below load their modules on first use (PEP 562), so `ifcn.io`, `ifcn.image` and
`ifcn.config` import without torch: Ray's read and publish workers then start in a fraction of a
second and ~500 MB lighter, instead of importing torch beside the actors they share cores with.
"""
from __future__ import annotations

from .lazy import lazy_names

_LAZY = {
    "checkpoint_digest": "models.checkpoint", "load_checkpoint": "models.checkpoint", "load_model": "models.checkpoint",
    "save_checkpoint": "models.checkpoint", "load_baseline": "models.checkpoint", "save_baseline": "models.checkpoint",
    "BACKBONES": "config", "PAPER_SCALES": "config", "InferenceConfig": "config", "ModelConfig": "config",
    "DeepMask": "models.deepmask",
    "InstanceFCN": "models.instancefcn", "load_vgg16_weights": "models.instancefcn",
    "assemble": "ops.assembling",
    "Candidates": "batch.containers", "Proposals": "batch.containers", "WindowBatch": "batch.containers", "Windows": "batch.containers",
    "NMS_MODES": "config",
    "Predictor": "inference.predictor",
    "encode": "inference.proposals", "postprocess": "inference.proposals", "postprocess_device": "inference.proposals",
    "postprocess_numpy": "inference.proposals",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
