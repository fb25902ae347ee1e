"""COCO run lengths of pasted masks, side by side:

    crop_runs, crop_to_rle, encode_counts   the numpy reference (one crop; pycocotools encodes)

(The device path reads its runs off paste.paste_dense's blocks: pasteruns._step_events, _counts.)
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def crop_to_rle(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> dict:
    """COCO compressed RLE of a full-image mask that is zero outside `crop`, without building it."""
    return encode_counts(crop_runs(top, left, crop, image_size), image_size)


def crop_runs(top: int, left: int, crop: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """COCO uncompressed run lengths (uint32, column-major, background first) of a full-image
    mask that is zero outside `crop`.

    Touches only the crop's pixels: O(h * w) rather than O(H * W). Runs are read off the crop's
    columns (column-major, as COCO counts), each followed by one zero that stands for the
    H - h background pixels between the crop's end in one column and its start in the next.
    """
    height, width = image_size
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return np.array([height * width], dtype=np.uint32)
    sep = 1 if h < height else 0  # a full-height crop's columns follow each other directly
    strip = np.zeros((w, h + sep), dtype=np.int8)  # (w, h [+1]) column-major crop + separators
    strip[:, :h] = crop.T
    flat = strip.reshape(-1)
    change = np.flatnonzero(np.diff(flat, prepend=0))  # runs start here (the image starts with background)
    if flat[-1]:  # only without separators: the run after the crop starts past its last pixel
        change = np.append(change, flat.size)
    col, row = np.divmod(change, h + sep)
    pos = (left + col) * height + top + row  # full-image column-major position
    bounds = np.concatenate(([0], pos[pos < height * width], [height * width]))
    return np.diff(bounds).astype(np.uint32)


def encode_counts(runs: list[int] | np.ndarray, image_size: tuple[int, int]) -> dict:
    """Uncompressed column-major run lengths -> COCO compressed RLE with str counts.

    A uint32 array goes to pycocotools without a Python-list round trip."""
    height, width = image_size
    rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rle
