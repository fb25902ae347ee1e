"""The per-operation modules' public names in one place (older imports: `from ifcn.ops import ...`).

Each operation lives in its own module with its numpy reference beside its torch version:
ifcn.assembling, ifcn.paste, ifcn.boxes, ifcn.nms, ifcn.runs.
"""
from __future__ import annotations

from .assembling import BACKGROUND_LOGIT, assemble, cell_to_map  # noqa: F401
from .boxes import crop_bbox  # noqa: F401
from .nms import NMS_MODES, GreedyMaskNMS, Mask, mask_nms  # noqa: F401
from .paste import paste_masks, window_pixel_span  # noqa: F401
from .runs import crop_runs, crop_to_rle, encode_counts  # noqa: F401
