"""InstanceFCN (Dai et al., ECCV 2016): instance-sensitive fully convolutional networks."""
from .checkpoint import checkpoint_digest, load_checkpoint, load_model, save_checkpoint
from .config import BACKBONES, PAPER_SCALES, InferenceConfig, ModelConfig
from .deepmask import DeepMask
from .model import InstanceFCN, load_vgg16_weights
from .ops import assemble
from .predictor import Candidates, Predictor, postprocess
from .proposals import Proposals, encode, postprocess_device, postprocess_numpy

__all__ = [
    "BACKBONES", "PAPER_SCALES", "Candidates", "DeepMask", "InferenceConfig", "InstanceFCN", "ModelConfig",
    "Predictor", "Proposals", "assemble", "checkpoint_digest", "encode", "load_checkpoint", "load_model",
    "load_vgg16_weights", "postprocess",
    "postprocess_device", "postprocess_numpy", "save_checkpoint",
]
