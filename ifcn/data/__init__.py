"""Datasets: a COCO-format reader over fsspec URLs and a synthetic touching-instances generator."""
from .coco import CocoDataset, Sample
from .synth import SynthConfig, render_image, write_synthetic_dataset

__all__ = ["CocoDataset", "Sample", "SynthConfig", "render_image", "write_synthetic_dataset"]
