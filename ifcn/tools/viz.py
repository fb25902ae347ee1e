"""Pictures of proposals: translucent masks, outlines, boxes and score labels (PIL only).

    from ifcn.tools.viz import draw_proposals
    draw_proposals(image, predictor.predict(image), top=20).save("proposals.png")
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from ifcn.io import write_bytes

# Distinct, saturated colours (matplotlib's tab10 without its grey), cycled by rank.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)
MASK_ALPHA = 0.45  # enough colour to see the mask, enough image to see what it covers


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (str or bytes counts) -> (H, W) bool mask."""
    return mask_utils.decode(rle).astype(bool)


def _outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: mask pixels with a 4-neighbour outside the mask (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_proposals(image: np.ndarray, proposals: list[dict[str, Any]], top: int | None = 20) -> Image.Image:
    """image: (H, W, 3) uint8 RGB; proposals best first, each {rle, bbox (x, y, w, h), score}.

    Draws the `top` best (all if None); the best is drawn last so it stays on top. Returns an RGB image.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_proposals: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    shown = list(proposals[:top] if top is not None else proposals)
    canvas = image.astype(np.float32)
    for rank in reversed(range(len(shown))):
        mask = decode_rle(shown[rank]["rle"])
        if mask.shape != (height, width):
            raise ValueError(f"draw_proposals: proposal {rank} has mask size {mask.shape}, image is {(height, width)}")
        color = np.array(PALETTE[rank % len(PALETTE)], np.float32)
        canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * color
        canvas[_outline(mask)] = color
    out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for rank in reversed(range(len(shown))):  # all boxes first, so no box line crosses a label
        x, y, w, h = (float(v) for v in shown[rank]["bbox"])
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=PALETTE[rank % len(PALETTE)], width=1)
    font = _font(height, width)
    for rank in reversed(range(len(shown))):
        p = shown[rank]
        color = PALETTE[rank % len(PALETTE)]
        x, y = float(p["bbox"][0]), float(p["bbox"][1])
        label = f"{rank}: {float(p['score']):.2f}"
        left, top_, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top_
        ty = y - th - 2 if y - th - 2 >= 0 else y  # above the box, or inside it at the image's top edge
        draw.rectangle([x, ty, x + tw + 2, ty + th + 2], fill=color)
        ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else (255, 255, 255)
        draw.text((x + 1 - left, ty + 1 - top_), label, fill=ink, font=font)
    return out


def _font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, larger on large images so labels stay readable (~1/60 of the short side)."""
    try:
        return ImageFont.load_default(size=max(11, min(height, width) // 60))
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_png(image: Image.Image, url: str, storage_options: dict | None = None) -> None:
    """Writes `image` as PNG to any fsspec URL, creating parent folders where the filesystem has them."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(url, buf.getvalue(), storage_options)
