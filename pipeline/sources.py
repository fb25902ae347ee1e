"""Inputs -> a sorted listing -> fixed shards with stable ids.

An input is either a prefix (listed recursively for image files) or a manifest: a `.txt` file of
URIs (one per line, `#` comments and blank lines skipped) or a `.parquet` file with a `uri` column.
The listing is sorted by image_id and cut into shards of `shard_size`; shard `i` holds items
[i * shard_size, (i + 1) * shard_size), so the same inputs and shard size always give the same
shards, which is what lets a re-run skip committed shards.
"""
from __future__ import annotations

import io
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ifcn.io import filesystem, open_url

from .config import SegmentError, digest
from ifcn.image import ImageError, decode_image, one_line, read_bytes

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
MANIFEST_EXTENSIONS = (".txt", ".parquet")
READ_ATTEMPTS = 3  # object stores drop the odd request; a file that fails 3 times becomes an error row


@dataclass(frozen=True)
class InputItem:
    image_id: str  # path relative to the prefix, or the URI itself for manifests
    uri: str  # full URL any fsspec filesystem opens


@dataclass(frozen=True)
class Shard:
    shard_id: str  # "000012": zero-padded index, sorts like the shards
    items: tuple[InputItem, ...]

    @property
    def digest(self) -> str:
        """Fingerprint of the shard's inputs: a commit marker must carry the same one."""
        return digest([[it.image_id, it.uri] for it in self.items])


def is_image_path(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_inputs(url: str, storage_options: dict[str, Any] | None = None,
                skipped: dict[str, int] | None = None) -> list[InputItem]:
    """Every input image of `url` (prefix or manifest), sorted by image_id, without duplicates.

    skipped: if given, counts the prefix's keys that are not images, by extension ("" for none),
    so a summary can say what was left out (.heic, .avif, ...). Raises SegmentError (one line)
    when the input is missing, unreachable or holds no images.
    """
    try:
        fs, path = filesystem(url, storage_options)
        path = path.rstrip("/") or path
        if fs.isfile(path):
            if path.lower().endswith(MANIFEST_EXTENSIONS):
                items = _read_manifest(url, storage_options)
            elif is_image_path(path):
                items = [InputItem(posixpath.basename(path), fs.unstrip_protocol(path))]
            else:
                raise SegmentError(f"--input {url}: a file that is neither a manifest "
                                   f"({', '.join(MANIFEST_EXTENSIONS)}) nor an image; "
                                   f"pass a prefix, a manifest or an image")
        elif fs.isdir(path):
            items = []
            for p in fs.find(path, withdirs=False):
                if is_image_path(p):
                    items.append(InputItem(posixpath.relpath(p, path), fs.unstrip_protocol(p)))
                elif skipped is not None:
                    ext = posixpath.splitext(p)[1].lower()
                    skipped[ext] = skipped.get(ext, 0) + 1
        else:
            raise SegmentError(f"--input {url}: no such file or prefix; check the URL (and credentials / "
                               f"AWS_ENDPOINT_URL for object stores)")
    except SegmentError:
        raise
    except Exception as e:  # botocore, network, permission errors of any fsspec backend
        raise SegmentError(f"--input {url}: cannot list it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL, network, credentials and --storage-options") from None
    if not items:
        raise SegmentError(f"--input {url}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                           f"any case); point it at the folder or manifest that holds them")
    unique = {it.image_id: it for it in items}
    if len(unique) < len(items):
        print(f"note: {len(items) - len(unique)} duplicate URIs in {url} were listed once", file=sys.stderr)
    return sorted(unique.values(), key=lambda it: it.image_id)


def make_shards(items: list[InputItem], shard_size: int) -> list[Shard]:
    """Consecutive runs of `shard_size` sorted items, ids = zero-padded index (stable across runs)."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    width = max(6, len(str(max(0, (len(items) - 1) // shard_size))))
    return [Shard(f"{i // shard_size:0{width}d}", tuple(items[i:i + shard_size]))
            for i in range(0, len(items), shard_size)]


def listing_digest(items: list[InputItem]) -> str:
    return digest([[it.image_id, it.uri] for it in items])


def read_images(batch: pa.Table, storage_options: dict[str, Any] | None, max_pixels: int,
                min_side: int) -> pa.Table:
    """Read stage (CPU tasks): (image_id, uri, shard_id) rows -> + status, error, width, height,
    read_ms, decode_ms and `pixels`, the (height, width, 3) uint8 RGB bytes (empty for errors).

    Any failure becomes status "error" with a one-line reason, never an exception: each input
    must end as exactly one images row.
    """
    out: dict[str, list] = {k: [] for k in ("status", "error", "width", "height", "read_ms", "decode_ms", "pixels")}
    for uri in batch.column("uri").to_pylist():
        t0 = time.perf_counter()
        image, error = None, None
        data = _read_with_retries(uri, storage_options)
        t1 = time.perf_counter()
        if isinstance(data, str):
            error = data
        else:
            try:
                image = decode_image(data, uri, max_pixels, min_side)  # (H, W, 3) uint8
            except ImageError as e:
                error = e.reason
            except Exception as e:  # a decoder bug must not stop the job either
                error = f"image {uri}: decoding failed ({type(e).__name__}: {one_line(e)})"
        t2 = time.perf_counter()
        out["status"].append("error" if error else "ok")
        out["error"].append(error)
        out["height"].append(image.shape[0] if image is not None else None)
        out["width"].append(image.shape[1] if image is not None else None)
        out["read_ms"].append((t1 - t0) * 1e3)
        out["decode_ms"].append((t2 - t1) * 1e3 if not isinstance(data, str) else None)
        out["pixels"].append(np.ascontiguousarray(image).tobytes() if image is not None else b"")
    types = {"status": pa.string(), "error": pa.string(), "width": pa.int32(), "height": pa.int32(),
             "read_ms": pa.float32(), "decode_ms": pa.float32(), "pixels": pa.large_binary()}
    table = batch.select(["image_id", "uri", "shard_id"])
    for name, values in out.items():
        table = table.append_column(pa.field(name, types[name]), pa.array(values, types[name]))
    return table


def image_from_row(pixels: bytes, height: int, width: int) -> np.ndarray:
    """The read stage's `pixels` bytes -> (height, width, 3) uint8 (a writable copy, as torch wants)."""
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3).copy()


def _read_with_retries(uri: str, storage_options: dict[str, Any] | None) -> bytes | str:
    """The file's bytes, or the one-line reason it could not be read after READ_ATTEMPTS."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read_bytes(uri, storage_options)
        except ImageError as e:  # missing file, directory: retrying will not help
            return e.reason
        except Exception as e:  # network, throttling, credentials
            if attempt == READ_ATTEMPTS - 1:
                return (f"image {uri}: reading failed {READ_ATTEMPTS} times ({type(e).__name__}: {one_line(e)}); "
                        f"check access to it and re-run with a new --output to retry")
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _read_manifest(url: str, storage_options: dict[str, Any] | None) -> list[InputItem]:
    """URIs of a manifest; image_id is the full URI (relative local paths made absolute)."""
    with open_url(url, "rb", storage_options) as f:
        data = f.read()
    if url.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        if "uri" not in table.column_names:
            raise SegmentError(f"--input {url}: parquet manifest has no 'uri' column (columns: {table.column_names})")
        uris = [u for u in table.column("uri").to_pylist() if u]
    else:
        lines = (line.strip() for line in data.decode("utf-8").splitlines())
        uris = [line for line in lines if line and not line.startswith("#")]
    return [InputItem(u, u) for u in map(_canonical_uri, uris)]


def _canonical_uri(uri: str) -> str:
    """A URI with its protocol, so workers on other machines open the same object."""
    if "://" in uri:
        return uri
    fs, path = filesystem(uri)
    return fs.unstrip_protocol(path)
