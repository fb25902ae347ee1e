"""Inputs -> a sorted listing -> fixed shards with stable ids.

An input is a prefix (listed recursively for image files, pipeline/planning/listing.py), a manifest: a
`.txt` file of URIs (one per line, `#` comments and blank lines skipped) or a `.parquet` file with
a `uri` column, or an S3 Inventory `manifest.json` (pipeline/planning/inventory.py).
The listing is sorted by image_id and cut into shards of `shard_size`; shard `i` holds items
[i * shard_size, (i + 1) * shard_size), so the same inputs and shard size always give the same
shards, which is what lets a re-run skip committed shards.

A listing is two Arrow string columns (`Listing`), ~60 bytes per image rather than a Python
object each: 10M inputs fit a driver. Shards are spans of it until a publish task needs their
items (`Listing.shard`).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ifcn.image import one_line
from ifcn.io import filesystem, open_url

from pipeline.config import SegmentError, digest

from .inventory import is_inventory, read_inventory
from .listers import list_prefix
from .listing import IMAGE_EXTENSIONS, is_image_path, version

MANIFEST_EXTENSIONS = (".txt", ".parquet")
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
        raise cannot_list(url, e) from None
    if not len(listing):
        raise no_images(url)
    return listing


def cannot_list(url: str, e: Exception) -> SegmentError:
    """A listing that failed (botocore, network, permission errors of any fsspec backend), in one line."""
    return SegmentError(f"--input {url}: cannot list it ({type(e).__name__}: {one_line(e)}); "
                        f"check the URL, network, credentials and --storage-options")


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
