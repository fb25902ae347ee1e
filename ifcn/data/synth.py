"""Synthetic COCO-format data: one category whose instances touch, overlap and look alike.

Every instance of an image shares one colour and texture family (small jitter only) and is
shaded darker towards its rim, so what tells two touching instances apart is their shape and
position, which is exactly what instance-sensitive score maps model and a one-map FCN cannot.
Masks are exact (visible pixels after occlusion), stored as COCO compressed RLE.

    python -m jobs.synth --output file:///tmp/synth/train --num-images 200 --seed 0

Output is byte-identical for a seed (PNG + sorted JSON written through fsspec).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ifcn.io import filesystem, join, open_url

CATEGORY = {"id": 1, "name": "blob", "supercategory": "shape"}


@dataclass(frozen=True)
class SynthConfig:
    """Image and object sizes that suit a 168 px window at stride 8 (positives ~81-114 px at scale).

    Objects' larger sides span [min_object, max_object] * size, i.e. 56-128 px in 256 px images:
    inference scales of 0.75-1.5x the image side bring every object into the positive range.
    """

    size: int = 256
    min_objects: int = 3
    max_objects: int = 8
    min_object: float = 0.22  # larger side as a fraction of the image side
    max_object: float = 0.5
    touch_prob: float = 0.8  # chance that a new object is placed against an existing one
    min_visible: float = 0.55  # an occluded instance keeps at least this fraction of its pixels
    min_area: int = 150  # px; smaller visible remnants are not instances


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
                extent: float) -> tuple[np.ndarray, np.ndarray]:
    """A random star-convex blob (ellipse-like with smooth wobble) of larger side ~extent.

    Returns (mask (H, W) bool, normalised radius (H, W) float: 0 at the centre, 1 on the rim).
    """
    aspect = rng.uniform(0.55, 1.0)
    theta = rng.uniform(0, np.pi)
    a = extent / 2.0
    b = a * aspect
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the ellipse
    phi = np.arctan2(v / b, u / a)
    wobble = np.ones_like(r)
    for freq in (2, 3, 5):  # low-frequency lobes: shapes differ, yet stay blob-like
        wobble += rng.uniform(-0.08, 0.08) * np.cos(freq * phi + rng.uniform(0, 2 * np.pi))
    radius = r / wobble
    return radius <= 1.0, radius


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) smooth value noise in [-1, 1] (bilinear upsampling of a coarse grid)."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells + 1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render_image(rng: np.random.Generator, config: SynthConfig = SynthConfig()) -> tuple[np.ndarray, list[np.ndarray]]:
    """One image (H, W, 3) uint8 and its instances' visible masks, each (H, W) bool, in paint order."""
    size = config.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    bg_colour = rng.uniform(40, 110, 3)
    image = bg_colour[None, None, :] + 25 * _noise(rng, size, 6)[..., None] + rng.normal(0, 6, (size, size, 3))
    base = rng.uniform(120, 230, 3)  # the image's object colour family
    texture = _noise(rng, size, 24)  # one texture shared by all instances of the image
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    masks: list[np.ndarray] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(target * 8):  # placement attempts
        if len(masks) >= target:
            break
        extent = rng.uniform(config.min_object, config.max_object) * size
        if centres and rng.random() < config.touch_prob:
            py, px, pext = centres[int(rng.integers(len(centres)))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = (pext + extent) / 4.0 * rng.uniform(0.75, 1.1)  # touching to overlapping
            cy, cx = py + dist * np.sin(angle), px + dist * np.cos(angle)
        else:
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
        if not (0.05 * size <= cy <= 0.95 * size and 0.05 * size <= cx <= 0.95 * size):
            continue
        shape, radius = _shape_mask(rng, yy, xx, cy, cx, extent)
        visible = [mk & ~shape for mk in masks]
        if shape.sum() < config.min_area or any(
                v.sum() < max(config.min_area, config.min_visible * mk.sum()) for v, mk in zip(visible, masks)):
            continue
        colour = base * rng.uniform(0.93, 1.07) + rng.normal(0, 4, 3)
        shade = 1.0 - 0.45 * np.clip(radius, 0, 1) ** 3  # darker towards the rim
        body = colour[None, None, :] * shade[..., None] * (1 + 0.12 * texture[..., None])
        image = np.where(shape[..., None], body, image)
        masks = visible + [shape]
        centres.append((cy, cx, extent))
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, masks


def _annotation(mask: np.ndarray, ann_id: int, image_id: int) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY["id"], "iscrowd": 0,
            "area": int(mask.sum()), "bbox": [x, y, w, h],
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}


def write_synthetic_dataset(output: str, num_images: int, seed: int, config: SynthConfig = SynthConfig(),
                            storage_options: dict | None = None) -> dict[str, Any]:
    """Writes output/images/NNNNNN.png and output/annotations.json; returns the COCO dict."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: need at least 1")
    fs, root = filesystem(output, storage_options)
    fs.makedirs(join(root, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])  # per-image streams: image i is the same for any N
        image, masks = render_image(rng, config)
        name = f"{i:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        with open_url(join(output, "images", name), "wb", storage_options) as f:
            f.write(buf.getvalue())
        images.append({"id": i + 1, "file_name": name, "height": config.size, "width": config.size})
        for mask in masks:
            anns.append(_annotation(mask, len(anns) + 1, i + 1))
    coco = {"info": {"description": f"InstanceFCN synthetic touching blobs, seed {seed}"},
            "images": images, "annotations": anns, "categories": [CATEGORY]}
    with open_url(join(output, "annotations.json"), "w", storage_options) as f:
        f.write(json.dumps(coco, sort_keys=True))
    return coco
