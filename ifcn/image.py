"""Bytes -> (H, W, 3) uint8 RGB, or an ImageError whose one-line reason goes in the images table.

The one decoder of the project: the pipeline, training (ifcn.data.CocoDataset), jobs.evaluate
and jobs.show all see the same pixels for the same file.

Buckets hold whatever people uploaded: HTML error pages saved as .jpg, half-written files,
palette GIFs, 16-bit PNGs, CMYK JPEGs from print workflows, phone photos that are stored
sideways with an EXIF orientation tag, and the occasional 40 000 x 40 000 scan. Every one
of them must end as one row; none may stop the job or exhaust an actor's memory.

Conversions (what a viewer would show):
- EXIF orientation is applied (PIL.ImageOps.exif_transpose), so masks line up with the
  image as people see it; width/height are those of the transposed image.
- Alpha (RGBA, LA, palette with transparency) is composited on WHITE, not dropped:
  dropping alpha exposes whatever colour the encoder left under transparent pixels.
- 16-bit grayscale (I;16*, and 32-bit I holding 0..65535) is scaled to 8 bit with
  round(v * 255 / 65535); 16-bit RGB PNGs are reduced to 8 bit by Pillow itself.
- CMYK (Adobe-inverted or not, Pillow reads both) and YCbCr convert to RGB; 1, L, P
  expand to three equal channels.
- Multi-frame files (GIF, TIFF) use their first frame.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .io import open_url

MAX_PIXELS = 50_000_000  # ~200 MB as decoded RGB: bigger inputs are almost always scans or bombs
MIN_SIDE = 16  # below this even the smallest scale's window is mostly padding

# Modes Pillow converts to RGB directly (no alpha, 8 bits per channel).
_DIRECT_MODES = frozenset({"RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(Exception):
    """An input that cannot become an RGB array; `reason` is one line for the images table."""

    def __init__(self, uri: str, problem: str) -> None:
        self.uri, self.problem = uri, problem
        self.reason = f"image {uri}: {problem}; recorded as error row".replace("\n", " ")
        super().__init__(self.reason)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at `uri` (any fsspec URL). A missing object is an ImageError (it
    was listed, then deleted: an error row); other failures (credentials, network) raise as
    they are, so the caller can retry them (pipeline.stages.read retries READ_ATTEMPTS times,
    then records an error row)."""
    try:
        with open_url(uri, "rb", storage_options) as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageError(uri, "no such file (listed, then removed before it was read)") from e
    except IsADirectoryError as e:
        raise ImageError(uri, "is a directory, not an image file") from e


def decode_image(data: bytes, uri: str, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB, oriented as EXIF says.

    The size is checked from the header before any pixel is decoded, so an oversized file
    costs a few bytes of parsing, not gigabytes of memory. Raises ImageError (never
    anything else for bad data) with a reason naming `uri` and the fix.
    """
    if not data:
        raise ImageError(uri, "empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our max_pixels replaces PIL's global MAX_IMAGE_PIXELS warning; PIL still raises
        # DecompressionBombError past twice its limit, which we catch below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            # Pillow refuses past 2 * MAX_IMAGE_PIXELS while parsing the header, before we see the size.
            pil_limit = 2 * Image.MAX_IMAGE_PIXELS
            limit = (f"max_pixels={max_pixels}" if max_pixels < pil_limit
                     else f"Pillow's decompression-bomb limit ({pil_limit} px)")
            raise ImageError(uri, f"header size exceeds {limit} (Pillow: {one_line(e, 200)}); "
                                  f"downscale it before processing") from None
        except MemoryError:
            raise
        except Exception as e:  # UnidentifiedImageError, or a header parser choking on junk
            raise ImageError(uri, f"not a decodable image (got {data[:4]!r})") from e
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(uri, f"{width}x{height} px = {width * height} px exceeds max_pixels={max_pixels} "
                                  f"(checked from the header before decoding); downscale it or raise max_pixels")
        try:
            im.load()
            im = ImageOps.exif_transpose(im) or im
        except Image.DecompressionBombError:
            raise ImageError(uri, f"decoded size exceeds Pillow's decompression-bomb limit "
                                  f"({2 * Image.MAX_IMAGE_PIXELS} px)") from None
        except MemoryError:
            raise
        except Exception as e:
            # Truncated or corrupt pixel data: Pillow raises OSError, SyntaxError, EOFError...
            raise ImageError(uri, f"{im.format or 'image'} data is corrupt or truncated "
                                  f"({type(e).__name__}: {one_line(e, 200)}); re-encode or remove the file") from e
    rgb = _to_rgb(im, uri)
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(uri, f"{w}x{h} px is smaller than min_side={min_side} px on its short side")
    return rgb


def _to_rgb(im: Image.Image, uri: str) -> np.ndarray:
    """A loaded PIL image of any supported mode -> (H, W, 3) uint8."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _DIRECT_MODES:
        return np.array(im.convert("RGB"), dtype=np.uint8)  # writable (torch.from_numpy warns otherwise)
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        gray = np.asarray(im).astype(np.int64)  # (H, W); I;16B etc. come back native-endian
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ImageError(uri, f"32-bit integer image with values {gray.min()}..{gray.max()} outside 0..65535; "
                                  f"convert it to 8 or 16 bit")
        eight = ((gray * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return np.repeat(eight[:, :, None], 3, axis=2)
    raise ImageError(uri, f"unsupported pixel mode {mode!r} ({im.format or 'unknown format'}); "
                          f"convert it to 8-bit RGB, grayscale or 16-bit grayscale")


def one_line(e: BaseException, limit: int = 300) -> str:
    """First line of an exception's message, bounded: error rows and CLI errors are one line."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else ""
