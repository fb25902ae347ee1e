"""COCO-format instance dataset over fsspec URLs (annotations JSON + an image folder).

Segmentations may be polygons, uncompressed RLE (iscrowd regions) or compressed RLE; they are
decoded the way pycocotools' COCO.annToRLE does. Crowd instances come back flagged, so the
window sampler can ignore windows on them rather than call them negatives (as COCO does).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ifcn.image import ImageError, decode_image
from ifcn.io import join, open_url


@dataclass
class Sample:
    """One image and its instances.

    image: (H, W, 3) uint8 RGB; masks: (N, H, W) uint8 in {0, 1}; boxes: (N, 4) float32 COCO
    (x, y, w, h); iscrowd: (N,) bool.
    """

    image_id: int
    file_name: str
    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    iscrowd: np.ndarray


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygon list / uncompressed RLE / compressed RLE -> compressed RLE (pycocotools annToRLE)."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} does not match the image's [height, width] "
                             f"= [{height}, {width}]")
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__} "
                     f"(expected a polygon list or an RLE dict with 'size' and 'counts')")


class CocoDataset:
    """Indexable COCO dataset: `ds[i]` reads and decodes image i (in the JSON's image order)."""

    def __init__(self, images: str, annotations: str, storage_options: dict | None = None) -> None:
        self.images_url = images
        self.annotations_url = annotations
        self.storage_options = storage_options
        try:
            with open_url(annotations, "r", storage_options) as f:
                coco = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"annotations {annotations}: no such file; pass the COCO JSON with "
                                    f"--annotations") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"annotations {annotations}: not valid JSON ({e})") from e
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ValueError(f"annotations {annotations}: not a COCO instances file (needs 'images' and "
                             f"'annotations' lists)")
        self.images: list[dict[str, Any]] = list(coco["images"])
        self.categories: list[dict[str, Any]] = list(coco.get("categories", []))
        by_id = {img["id"]: img for img in self.images}
        self._anns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for ann in coco["annotations"]:
            if ann.get("image_id") not in by_id:
                raise ValueError(f"annotations {annotations}: annotation id {ann.get('id')} refers to "
                                 f"image_id {ann.get('image_id')!r}, which is not in 'images'")
            self._anns[ann["image_id"]].append(ann)
        self.coco = coco

    def __len__(self) -> int:
        return len(self.images)

    def annotations(self, index: int) -> list[dict[str, Any]]:
        return self._anns[self.images[index]["id"]]

    def read_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image `index`, checked against its declared size."""
        info = self.images[index]
        url = join(self.images_url, info["file_name"])
        try:
            with open_url(url, "rb", self.storage_options) as f:
                data = f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image {info['file_name']!r} not found at {url}; is --images the folder "
                                    f"that holds the annotations' file_name entries?") from e
        try:  # the pipeline's decoder: EXIF orientation, alpha on white, 16-bit scaled, CMYK
            image = decode_image(data, url)
        except ImageError as e:
            raise ValueError(f"image {url}: {e.problem}") from None
        if "height" in info and "width" in info and image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"image {url} is {image.shape[1]}x{image.shape[0]} (WxH) but {self.annotations_url} "
                             f"says {info['width']}x{info['height']}: annotations do not match this image")
        return image

    def __getitem__(self, index: int) -> Sample:
        info = self.images[index]
        image = self.read_image(index)
        height, width = image.shape[:2]
        anns = self.annotations(index)
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for j, ann in enumerate(anns):
            try:
                rle = segmentation_to_rle(ann["segmentation"], height, width)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"annotation id {ann.get('id')} of image {info['file_name']!r} "
                                 f"({self.annotations_url}): {e}") from e
            masks[j] = mask_utils.decode(rle)
            boxes[j] = ann["bbox"] if "bbox" in ann else mask_utils.toBbox(rle)
        iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        return Sample(info["id"], info["file_name"], image, masks, boxes, iscrowd)
