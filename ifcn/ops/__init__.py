"""One module per operation, its numpy reference beside its torch version: assembling, paste, boxes,
nms, runs, and rle (numpy only). Pure functions on arrays and tensors; imports nothing of ifcn above it
but ifcn.config. The names below load their module on first use (PEP 562), so `ifcn.ops.rle`
imports without torch (the pipeline's encoding workers use it).
"""
from __future__ import annotations

from ifcn.lazy import lazy_names

_LAZY = {
    "BACKGROUND_LOGIT": "assembling", "assemble": "assembling", "cell_to_map": "assembling",
    "crop_bbox": "boxes",
    "NMS_MODES": "nms", "GreedyMaskNMS": "nms", "Mask": "nms", "mask_nms": "nms",
    "paste_masks": "paste", "window_pixel_span": "paste",
    "crop_runs": "runs", "crop_to_rle": "runs", "encode_counts": "runs",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
