"""COCO run lengths of pasted masks, side by side:

    crop_runs, crop_to_rle, encode_counts   the numpy reference (one crop; pycocotools encodes)
    flat_runs                               torch: every mask of a flat paste (paste.paste_flat) at once
"""
from __future__ import annotations

import numpy as np
import torch
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


def flat_runs(values: torch.Tensor, owner: torch.Tensor, row: torch.Tensor, col: torch.Tensor, boxes: torch.Tensor,
              image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO uncompressed run lengths of full-image masks zero outside their boxes, from `paste_flat`.

    boxes: (n, 4); image_sizes: (n, 2) (H, W) of each window's image. Returns (counts (R,) long,
    lengths (n,) long): mask i's column-major runs, background first, are the lengths[i] counts
    after those of masks < i. One sync (nonzero: the number of runs). Masks must not be empty."""
    dev = values.device
    n = len(boxes)
    h, width = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    height = image_sizes[:, 0]
    # Per pixel only bool tests and two int gathers (the pixels are the bulk of the bytes written);
    # full-image positions only at the run events, after nonzero.
    full = (h == height)[owner]  # a full-height box's columns follow each other directly
    last_col = col == (width - 1).to(col.dtype)[owner]
    prev_in = (row > 0) | (full & (col > 0))
    prev = torch.cat([values.new_zeros(1), values[:-1]]) & prev_in
    starts = values != prev  # a run starts at this pixel
    last_row = row == (h - 1).to(row.dtype)[owner]
    # the pixel after it starts a background run, unless the next column continues it (full height)
    # or it is the image's last pixel (a box ending at the image's bottom-right corner)
    corner = ((boxes[:, 2] == image_sizes[:, 1]) & (boxes[:, 3] == height))[owner]
    ends = values & last_row & ~(full & ~last_col) & ~(corner & last_col)
    events = torch.stack([starts, ends], 1).reshape(-1)  # (2T,): per pixel its start, then its end
    e = torch.nonzero(events).reshape(-1)  # in order: by window, then position
    pix, kind = e // 2, e % 2
    o = owner[pix].long()
    pixels = image_sizes[:, 0] * image_sizes[:, 1]
    where = (boxes[o, 0] + col[pix]) * height[o] + boxes[o, 1] + row[pix] + kind  # full-image column-major
    who = o
    changes = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, who, torch.ones_like(who))
    lengths = changes + 1
    first = torch.ones_like(who, dtype=torch.bool)
    first[1:] = who[1:] != who[:-1]
    before = torch.cat([where.new_zeros(1), where[:-1]])
    runs = where - torch.where(first, 0, before)
    counts = torch.empty(len(e) + n, dtype=torch.long, device=dev)
    counts[torch.arange(len(e), device=dev) + who] = runs  # event g of window o sits at g + o
    last_at = torch.cumsum(changes, 0) + torch.arange(n, device=dev)  # each window's final count
    last_pos = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, who, where, "amax", include_self=False)
    counts[last_at] = pixels - torch.where(changes > 0, last_pos, 0)
    return counts, lengths

