"""Read stage (CPU tasks): a block of (image_id, uri, shard_id) rows -> the images' pixels, decoded
in one call into one Arrow buffer, or an error row per image that cannot be read or decoded.

JPEGs decode with simplejpeg (libjpeg-turbo, ~1.5x Pillow) unless they carry an EXIF rotation;
everything else with Pillow (ifcn.image). Storage failures are retried; what stays failing is a
'retry' row (redone by the next run), what cannot succeed an 'error' row naming the cause.
Imports no torch (tests/test_stage_imports.py).
"""
from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ifcn.image import ImageError, decode_image, one_line, read_bytes

from pipeline.errors import RETRY, classify, with_retries

try:  # the fastest JPEG decoder installed (pyproject pins it); Pillow otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

READ_ATTEMPTS = 5  # a storage failure is retried 4 times, 0.5 + 1 + 2 + 4 s apart (beyond s3fs's own retries)
READ_BACKOFF_S = 0.5


def read_images(batch: pa.Table, storage_options: dict[str, Any] | None, max_pixels: int,
                min_side: int) -> pa.Table:
    """Read stage (CPU tasks): (image_id, uri, shard_id) rows -> + status, error, width, height,
    read_ms, decode_ms and `pixels`, the (height, width, 3) uint8 RGB bytes (empty for errors).

    Any failure becomes a status with a one-line reason, never an exception: "error" for the
    input's own faults (a final images row), "retry" for storage failures that outlived the
    retries (pipeline/errors.py: the image's shard is left for a re-run). JPEGs that simplejpeg
    decodes (`_fast_jpeg_size`) are decoded straight into the `pixels` column's buffer once every
    image's size is known (no copy); other images are decoded first and copied into it once.
    """
    out: dict[str, list] = {k: [] for k in ("status", "error", "width", "height", "read_ms", "decode_ms")}
    images: list[np.ndarray | bytes | None] = []  # decoded image, or the JPEG's bytes to decode into the buffer
    for uri in batch.column("uri").to_pylist():
        t0 = time.perf_counter()
        image, error, status, shape = None, None, "error", None
        data = _read_with_retries(uri, storage_options)
        t1 = time.perf_counter()
        if isinstance(data, tuple):
            status, error = data
        else:
            try:
                shape = _fast_jpeg_size(data, max_pixels, min_side)
                image = data if shape else decode_image(data, uri, max_pixels, min_side)  # (H, W, 3) uint8
                shape = shape or image.shape[:2]
            except Exception as e:  # an ImageError, or a decoder bug: neither stops the job
                error = decode_error(e, uri)
        t2 = time.perf_counter()
        out["status"].append(status if error else "ok")
        out["error"].append(error)
        out["height"].append(shape[0] if image is not None else None)
        out["width"].append(shape[1] if image is not None else None)
        out["read_ms"].append((t1 - t0) * 1e3)
        out["decode_ms"].append((t2 - t1) * 1e3 if not isinstance(data, tuple) else None)
        images.append(image)
    pixels = _pixels_into_one_buffer(images, batch.column("uri").to_pylist(), out, max_pixels, min_side)
    types = {"status": pa.string(), "error": pa.string(), "width": pa.int32(), "height": pa.int32(),
             "read_ms": pa.float32(), "decode_ms": pa.float32()}
    table = batch.select(["image_id", "uri", "shard_id"])
    for name, values in out.items():
        table = table.append_column(pa.field(name, types[name]), pa.array(values, types[name]))
    return table.append_column(pa.field("pixels", pa.large_binary()), pixels)


def _pixels_into_one_buffer(images: list[np.ndarray | bytes | None], uris: list[str], out: dict[str, list],
                            max_pixels: int, min_side: int) -> pa.Array:
    """The `pixels` column: JPEG bytes decoded in place, decoded images copied in, None as empty rows.
    A JPEG that simplejpeg then fails on goes through the reference decoder (`decode`), and the
    column is built by concatenation instead (rare: the header read fine)."""
    sizes = np.array([h * w * 3 if h is not None else 0 for h, w in zip(out["height"], out["width"])], np.int64)
    offsets = np.zeros(len(images) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    views: list[np.ndarray] = []
    intact = True
    for i, image in enumerate(images):
        view = data[offsets[i]:offsets[i + 1]]
        if isinstance(image, bytes):
            t0 = time.perf_counter()
            try:
                _simplejpeg.decode_jpeg(image, colorspace="RGB", buffer=view)
            except Exception:  # its errors name no file: the reference path decides, and names it
                intact, view = False, _decode_or_fail(image, uris[i], out, i, max_pixels, min_side)
            out["decode_ms"][i] += (time.perf_counter() - t0) * 1e3
        elif image is not None:
            view[:] = image.reshape(-1)
        views.append(view)
    if not intact:
        return pixels_column(views)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images), [None, pa.py_buffer(offsets),
                                                                                pa.py_buffer(data)])


def _decode_or_fail(data: bytes, uri: str, out: dict[str, list], i: int, max_pixels: int,
                    min_side: int) -> np.ndarray:
    """Row i decoded by the reference path (its size set from the result), or made an error row."""
    try:
        image = decode_image(data, uri, max_pixels, min_side)
        out["height"][i], out["width"][i] = image.shape[:2]
        return image.reshape(-1)
    except Exception as e:
        out["status"][i] = "error"
        out["error"][i] = decode_error(e, uri)
        out["height"][i] = out["width"][i] = None
        return np.zeros(0, np.uint8)


def decode_error(e: Exception, uri: str) -> str:
    """An error row's reason for an image that did not decode: the decoder's own one line for the
    input's faults (ImageError), the exception named for anything else (a decoder bug)."""
    if isinstance(e, ImageError):
        return e.reason
    return f"image {uri}: decoding failed ({type(e).__name__}: {one_line(e)})"


def pixels_column(images: list[np.ndarray]) -> pa.Array:
    """Decoded images -> one large_binary array whose values buffer is their bytes back to back
    (one copy; the actor reads each row back as a view)."""
    sizes = np.array([im.size for im in images], np.int64)
    offsets = np.zeros(len(images) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(images), [None, pa.py_buffer(offsets),
                                                                                pa.py_buffer(data)])


def _fast_jpeg_size(data: bytes, max_pixels: int, min_side: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG that simplejpeg decodes as the reference path would (installed, no
    EXIF rotation, YCbCr or gray, within the size limits); None: the reference path decodes it."""
    if _simplejpeg is None or data[:2] != b"\xff\xd8" or _exif_rotated(data):
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    if height * width <= max_pixels and min(height, width) >= min_side and colorspace in ("YCbCr", "Gray"):
        return height, width
    return None


def decode(data: bytes, uri: str, max_pixels: int, min_side: int) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB: JPEGs with simplejpeg (libjpeg-turbo, ~1.5x Pillow) when it
    is installed and the file needs no EXIF rotation, everything else (and anything simplejpeg
    cannot decode, and CMYK, whose conversion Pillow owns) with ifcn.image.decode_image, whose checks and messages are the reference."""
    if _fast_jpeg_size(data, max_pixels, min_side) is not None:
        try:
            return _simplejpeg.decode_jpeg(data, colorspace="RGB")  # (H, W, 3) uint8, writable
        except Exception:  # simplejpeg's errors are ValueErrors without the file's name: the reference path names it
            pass
    return decode_image(data, uri, max_pixels, min_side)


def _exif_rotated(data: bytes) -> bool:
    """Whether a JPEG carries an EXIF orientation other than 1 (then Pillow's path rotates it)."""
    if data.find(b"Exif\x00\x00", 0, 65_536) < 0:
        return False
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) != 1
    except Exception:
        return True  # unreadable EXIF: let the reference path decide


def image_from_row(pixels: bytes, height: int, width: int) -> np.ndarray:
    """The read stage's `pixels` bytes -> (height, width, 3) uint8 (a writable copy, as torch wants)."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3).copy()


def _read_with_retries(uri: str, storage_options: dict[str, Any] | None) -> bytes | tuple[str, str]:
    """The file's bytes, or (status, one-line reason): ("error", ...) when the object is missing
    or not a file, ("retry", ...) when storage kept failing for READ_ATTEMPTS."""
    try:
        return with_retries(lambda: read_bytes(uri, storage_options), READ_ATTEMPTS, READ_BACKOFF_S)
    except ImageError as e:  # missing file, directory: retrying will not help
        return "error", e.reason
    except Exception as e:  # network, throttling, credentials (or a permanent storage answer)
        transient, reason = classify(e)
        if not transient:
            return "error", f"image {uri}: {reason}"
        return RETRY, f"image {uri}: reading failed {READ_ATTEMPTS} times ({reason}); left for a re-run"
