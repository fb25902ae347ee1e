"""Inputs -> a sorted listing -> fixed shards with stable ids.

An input is a prefix (listed recursively for image files, pipeline/listing.py), a manifest: a
`.txt` file of URIs (one per line, `#` comments and blank lines skipped) or a `.parquet` file with
a `uri` column, or an S3 Inventory `manifest.json` (pipeline/inventory.py).
The listing is sorted by image_id and cut into shards of `shard_size`; shard `i` holds items
[i * shard_size, (i + 1) * shard_size), so the same inputs and shard size always give the same
shards, which is what lets a re-run skip committed shards.

A listing is two Arrow string columns (`Listing`), ~60 bytes per image rather than a Python
object each: 10M inputs fit a driver. Shards are spans of it until a publish task needs their
items (`Listing.shard`).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ifcn.io import filesystem, open_url

from .config import SegmentError, digest
from .errors import RETRY, classify, with_retries
from .inventory import is_inventory, read_inventory
from .listers import list_prefix
from .listing import IMAGE_EXTENSIONS, is_image_path, version
from ifcn.image import ImageError, decode_image, one_line, read_bytes

try:  # the fastest JPEG decoder installed (pyproject pins it); Pillow otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

MANIFEST_EXTENSIONS = (".txt", ".parquet")
READ_ATTEMPTS = 5  # a storage failure is retried 4 times, 0.5 + 1 + 2 + 4 s apart (beyond s3fs's own retries)
READ_BACKOFF_S = 0.5
DIGEST_CHUNK = 65_536  # rows turned into Python strings at a time (digests, iteration)
_NEEDS_ESCAPE = r'[^ -~]|["\\]'  # what json.dumps escapes (ensure_ascii): outside printable ASCII, " and \


@dataclass(frozen=True)
class InputItem:
    image_id: str  # path relative to the prefix, or the URI itself for manifests
    uri: str  # full URL any fsspec filesystem opens
    etag: str | None = None  # the object's version when listed (S3 ETag, 'mtime:<ns>' locally; None: unknown)
    size: int | None = None


@dataclass(frozen=True)
class Shard:
    shard_id: str  # "000012": zero-padded index, sorts like the shards
    items: tuple[InputItem, ...]

    @property
    def digest(self) -> str:
        """Fingerprint of the shard's inputs (ids and URIs)."""
        return digest([[it.image_id, it.uri] for it in self.items])


@dataclass(frozen=True)
class Span:
    """A shard as the driver plans it: rows [start, stop) of the listing."""

    shard_id: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Listing:
    """The sorted, unique inputs: image_ids[i], uris[i] and the objects' versions etags[i], sizes[i]
    (Arrow arrays; versions null where the source gives none, e.g. manifests)."""

    image_ids: pa.Array
    uris: pa.Array
    etags: pa.Array | None = None
    sizes: pa.Array | None = None

    COLUMNS = ("image_id", "uri", "etag", "size")  # as a table (`to_table`, the run's listing snapshot)

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.etags is None:
            object.__setattr__(self, "etags", pa.nulls(n, pa.string()))
        if self.sizes is None:
            object.__setattr__(self, "sizes", pa.nulls(n, pa.int64()))

    @classmethod
    def build(cls, image_ids: pa.Array | list[str], uris: pa.Array | list[str], url: str = "",
              etags: pa.Array | list | None = None, sizes: pa.Array | list | None = None) -> "Listing":
        """Sorted by image_id; a repeated image_id is listed once (with a note naming `url`)."""
        n = len(image_ids)
        table = pa.table({"image_id": pa.array(image_ids, pa.string()), "uri": pa.array(uris, pa.string()),
                          "etag": pa.array(etags, pa.string()) if etags is not None else pa.nulls(n, pa.string()),
                          "size": pa.array(sizes, pa.int64()) if sizes is not None else pa.nulls(n, pa.int64())})
        return cls.from_table(table, url)

    @classmethod
    def from_table(cls, table: pa.Table, url: str = "") -> "Listing":
        """A table of COLUMNS (any order of rows) -> the sorted, unique listing."""
        table = sorted_unique(table, url)
        return cls(*(whole(table.column(c)) for c in cls.COLUMNS))

    @classmethod
    def of_uris(cls, uris: pa.Array, url: str = "") -> "Listing":
        """A manifest's URIs (any order) -> the listing whose image_id is the URI: one sorted array
        serves both columns."""
        ids = whole(sorted_unique(pa.table({"image_id": uris}), url).column("image_id"))
        return cls(ids, ids)

    @classmethod
    def empty(cls) -> "Listing":
        return cls(pa.array([], pa.string()), pa.array([], pa.string()))

    @classmethod
    def concat(cls, parts: list["Listing"]) -> "Listing":
        """Listings of consecutive key ranges, in order, as one (a single one as it is: no copy)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(*(pa.concat_arrays([getattr(p, c) for p in parts])
                     for c in ("image_ids", "uris", "etags", "sizes")))

    def to_table(self) -> pa.Table:
        return pa.table(dict(zip(self.COLUMNS, (self.image_ids, self.uris, self.etags, self.sizes))))

    def take(self, indices: pa.Array) -> "Listing":
        """Rows `indices` (already in order) as a listing."""
        return Listing(*(a.take(indices) for a in (self.image_ids, self.uris, self.etags, self.sizes)))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self):
        for start in range(0, len(self), DIGEST_CHUNK):
            yield from map(InputItem, *(a[start:start + DIGEST_CHUNK].to_pylist()
                                        for a in (self.image_ids, self.uris, self.etags, self.sizes)))

    def spans(self, shard_size: int, first: int = 0) -> list[Span]:
        """Consecutive runs of `shard_size` rows, ids = zero-padded index from `first` (a listing
        part's shards follow those of the parts before it)."""
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: must be >= 1")
        n = len(self)
        width = max(6, len(str(first + max(0, (n - 1) // shard_size))))
        return [Span(f"{first + i // shard_size:0{width}d}", i, min(n, i + shard_size))
                for i in range(0, n, shard_size)]

    def shard(self, span: Span) -> Shard:
        """A span's items as Python objects (what a publish task checks a shard against)."""
        cols = [a[span.start:span.stop].to_pylist() for a in (self.image_ids, self.uris, self.etags, self.sizes)]
        return Shard(span.shard_id, tuple(map(InputItem, *cols)))

    def digest(self, start: int = 0, stop: int | None = None) -> str:
        """sha256 of rows [start, stop) exactly as `config.digest([[image_id, uri], ...])` gives it,
        streamed in chunks: no JSON string of the whole listing is ever held."""
        stop = len(self) if stop is None else stop
        h = hashlib.sha256(b"[")
        for a in range(start, stop, DIGEST_CHUNK):
            b = min(stop, a + DIGEST_CHUNK)
            h.update((b"," if a > start else b"") + _json_pairs(self.image_ids[a:b], self.uris[a:b]))
        h.update(b"]")
        return h.hexdigest()


def whole(column: pa.ChunkedArray) -> pa.Array:
    """One array of a column: its only chunk as it is (`combine_chunks` copies even that)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def sorted_unique(table: pa.Table, url: str = "") -> pa.Table:
    """`table` sorted by image_id, each image_id once (a note naming `url` says how many repeats
    were dropped). Rows already strictly increasing, as most manifests are, are kept as they
    are: no copy of a 10M-row listing."""
    ids = table.column("image_id")
    if len(ids) < 2 or pc.all(pc.greater(ids[1:], ids[:-1])).as_py():
        return table
    table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
    ids = table.column("image_id").combine_chunks()
    keep = pa.concat_arrays([pa.array([True]), pc.not_equal(ids[1:], ids[:-1])])
    if not pc.all(keep).as_py():
        table = table.filter(keep)
        print(f"note: {len(ids) - table.num_rows} duplicate URIs in {url} were listed once", file=sys.stderr)
    return table


def _json_pairs(ids: pa.Array, uris: pa.Array) -> bytes:
    """`json.dumps` of each [id, uri] pair (compact separators), joined by ",". Strings of printable
    ASCII without quote or backslash need no escaping, so those chunks are joined in Arrow; any
    other chunk goes through json.dumps row by row."""
    if pc.any(pc.match_substring_regex(ids, _NEEDS_ESCAPE)).as_py() or \
            pc.any(pc.match_substring_regex(uris, _NEEDS_ESCAPE)).as_py():
        return ",".join(json.dumps([i, u], separators=(",", ":"))
                        for i, u in zip(ids.to_pylist(), uris.to_pylist())).encode()
    rows = pc.binary_join_element_wise('["', ids, '","', uris, '"]', "")
    whole = pa.ListArray.from_arrays(pa.array([0, len(rows)], pa.int32()), rows)
    return pc.binary_join(whole, ",")[0].as_py().encode()


def list_inputs(url: str, storage_options: dict[str, Any] | None = None,
                skipped: dict[str, int] | None = None) -> Listing:
    """Every input image of `url` (prefix or manifest), sorted by image_id, without duplicates.

    skipped: if given, counts the prefix's keys that are not images, by extension ("" for none),
    so a summary can say what was left out (.heic, .avif, ...). Raises SegmentError (one line)
    when the input is missing, unreachable or holds no images.
    """
    try:
        fs, path = filesystem(url, storage_options)
        path = path.rstrip("/") or path
        if is_inventory(url):
            ids, uris, etags, sizes = read_inventory(url, storage_options, skipped)
            listing = Listing.build(ids, uris, url, etags, sizes)
        elif fs.isfile(path):
            if path.lower().endswith(MANIFEST_EXTENSIONS):
                listing = _read_manifest(url, storage_options)
            elif is_image_path(path):
                etag, size = version(fs.info(path))
                listing = Listing.build([posixpath.basename(path)], [fs.unstrip_protocol(path)], url, [etag], [size])
            else:
                raise SegmentError(f"--input {url}: a file that is neither a manifest "
                                   f"({', '.join(MANIFEST_EXTENSIONS)}) nor an image; "
                                   f"pass a prefix, a manifest or an image")
        elif fs.isdir(path):
            ids, uris, etags, sizes = list_prefix(fs, path, skipped)
            listing = Listing.build(ids, uris, url, etags, sizes)
        else:
            raise SegmentError(f"--input {url}: no such file or prefix; check the URL (and credentials / "
                               f"AWS_ENDPOINT_URL for object stores)")
    except SegmentError:
        raise
    except Exception as e:  # botocore, network, permission errors of any fsspec backend
        raise SegmentError(f"--input {url}: cannot list it ({type(e).__name__}: {one_line(e)}); "
                           f"check the URL, network, credentials and --storage-options") from None
    if not len(listing):
        raise no_images(url)
    return listing


def no_images(url: str) -> SegmentError:
    return SegmentError(f"--input {url}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                        f"any case); point it at the folder or manifest that holds them")


def make_shards(items: list[InputItem] | Listing, shard_size: int) -> list[Shard]:
    """Every shard with its items (small listings: tests, tools; the job plans with `Listing.spans`)."""
    if not isinstance(items, Listing):  # already sorted: keep the order given
        items = Listing(*(pa.array([getattr(it, f) for it in items], t) for f, t in
                          (("image_id", pa.string()), ("uri", pa.string()), ("etag", pa.string()),
                           ("size", pa.int64()))))
    return [items.shard(span) for span in items.spans(shard_size)]


def listing_digest(items: list[InputItem] | Listing) -> str:
    if isinstance(items, Listing):
        return items.digest()
    return digest([[it.image_id, it.uri] for it in items])


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


def _read_manifest(url: str, storage_options: dict[str, Any] | None) -> Listing:
    """URIs of a manifest; image_id is the full URI (relative local paths made absolute). A
    Parquet manifest's `uri` column is read alone, and copied only where rows must go (nulls,
    empty strings, relative paths, disorder): 10M URIs cost ~2x their bytes at peak."""
    if url.lower().endswith(".parquet"):
        with open_url(url, "rb", storage_options) as f:
            names = pq.ParquetFile(f).schema_arrow.names
            if "uri" not in names:
                raise SegmentError(f"--input {url}: parquet manifest has no 'uri' column (columns: {names})")
            uris = pq.read_table(f, columns=["uri"]).column("uri")
        uris = whole(uris).cast(pa.string())
        if uris.null_count or not pc.all(pc.not_equal(uris, "")).as_py():
            uris = uris.filter(pc.and_(pc.is_valid(uris), pc.not_equal(uris, "")))
        relative = pc.invert(pc.match_substring(uris, "://"))
        if pc.any(relative).as_py():  # rare in bucket manifests: canonicalise those few in Python
            uris = pa.array([_canonical_uri(u) for u in uris.to_pylist()], pa.string())
    else:
        with open_url(url, "rb", storage_options) as f:
            data = f.read()
        lines = (line.strip() for line in data.decode("utf-8").splitlines())
        uris = pa.array([_canonical_uri(line) for line in lines if line and not line.startswith("#")], pa.string())
    return Listing.of_uris(uris, url)


def _canonical_uri(uri: str) -> str:
    """A URI with its protocol, so workers on other machines open the same object."""
    if "://" in uri:
        return uri
    fs, path = filesystem(uri)
    return fs.unstrip_protocol(path)
