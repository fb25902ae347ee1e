"""The run's listing in key-ordered parts: listed, snapshotted and read back.

A run's listing snapshot is a folder `_runs/<run_id>/listing/` of `part-NNNNN.parquet` files
(Listing.COLUMNS). Part n holds the images whose keys lie in (after, until] of the input; its
file's metadata names both ends (`until` absent: the last part). A part is written, atomically,
before any of its shards can commit, so a run killed while it lists leaves a prefix of the
listing that the next run continues: it reads the parts back and lists only keys after the last
`until` (S3 `StartAfter`), and ends with the listing an uninterrupted run would have had.

An S3 or GCS prefix comes in parts of PART_ROWS images while the listing runs (`RangeLister.parts`);
every other input (local or Azure prefixes, manifests, inventories, one image) is listed in one
call and comes as one part. Runs of the previous layout left one `listing.parquet` file:
it reads back as one last part.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ifcn.io import filesystem, put_atomic

from pipeline.config import SegmentError
from pipeline.tables.parquet_io import parquet_bytes

from .inventory import is_inventory
from .listers import range_lister
from .listing import PART_ROWS
from .sources import Listing, cannot_list, list_inputs, no_images

PARTS_DIR = "listing"  # _runs/<run_id>/listing/part-NNNNN.parquet
_AFTER, _UNTIL = b"ifcn_after", b"ifcn_until"  # part file metadata: the key range the part covers


@dataclass(frozen=True)
class ListingPart:
    """Part `index` of a run's listing: the images with keys in (after, until] (until None: the last).
    A part read back from a snapshot holds only its file's footer (`rows`, the key range) until its
    listing is asked for: a resumed run of 100 parts holds one part's rows at a time, not all."""

    index: int
    source: Listing | Callable[[], Listing]  # the listing, or what reads it from the snapshot
    after: str
    until: str | None
    snapshotted: bool = False  # read back from the snapshot folder (not to be written again)
    rows: int | None = None  # images in it (known without reading a snapshotted part's rows)

    @property
    def listing(self) -> Listing:
        return self.source if isinstance(self.source, Listing) else self.source()

    def __len__(self) -> int:
        return self.rows if self.rows is not None else len(self.listing)

    @property
    def last(self) -> bool:
        return self.until is None


def part_path(folder: str, index: int) -> str:
    return f"{folder}/part-{index:05d}.parquet"


def write_part(store: Any, folder: str, part: ListingPart) -> None:
    """The part's snapshot (put_atomic: a reader sees all of it or nothing)."""
    meta = {_AFTER: part.after.encode(), **({_UNTIL: part.until.encode()} if part.until is not None else {})}
    table = part.listing.to_table().replace_schema_metadata(meta)
    put_atomic(store.fs, store.path(part_path(folder, part.index)), parquet_bytes(table, None))


def read_parts(store: Any, folder: str) -> list[ListingPart]:
    """The snapshotted parts of `folder` in order, up to the first one missing or not following its
    predecessor (its `after` is not the previous `until`): the listing's prefix they prove.
    A `listing.parquet` file (a run of the previous layout) is one last part."""
    if folder.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(store.fs.cat_file(store.path(folder))))
        except FileNotFoundError:
            return []
        return [ListingPart(0, Listing.from_table(table), "", None, True)]
    parts: list[ListingPart] = []
    after = ""
    while True:
        path = store.path(part_path(folder, len(parts)))
        try:
            with store.fs.open(path, "rb") as f:
                footer = pq.ParquetFile(f).metadata  # (the footer only: the rows are read when planned)
        except FileNotFoundError:
            return parts
        meta = footer.metadata or {}
        if meta.get(_AFTER, b"").decode() != after:
            return parts  # not the continuation of what came before (a stale writer's file)
        until = meta[_UNTIL].decode() if _UNTIL in meta else None
        parts.append(ListingPart(len(parts), partial(_read_part, store.fs, path), after, until, True,
                                 footer.num_rows))
        if until is None:
            return parts
        after = until


def _read_part(fs: Any, path: str) -> Listing:
    table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    return Listing.from_table(table.replace_schema_metadata(None))


def listing_parts(url: str, storage_options: dict[str, Any] | None, skipped: dict[str, int] | None,
                  resumed: list[ListingPart] = (), part_rows: int = PART_ROWS) -> Iterator[ListingPart]:
    """The run's listing, part by part: the snapshotted parts `resumed` first, then the rest of
    the input listed after them (nothing if the last of them ends the listing). Raises
    SegmentError (one line) when listing fails or the input holds no images at all."""
    yield from resumed
    if resumed and resumed[-1].last:
        return
    index = len(resumed)
    after = resumed[-1].until if resumed else ""
    images = sum(len(p) for p in resumed)
    last_id = next((p.listing.image_ids[-1].as_py() for p in reversed(resumed) if len(p)), None)
    try:
        for listing, a, until in _list(url, storage_options, skipped, after or "", last_id, part_rows):
            images += len(listing)
            if until is None and not images:
                break
            yield ListingPart(index, listing, a, until)
            index += 1
    except SegmentError:
        raise
    except Exception as e:  # botocore, network, permission errors of any fsspec backend
        raise cannot_list(url, e) from None
    if not images:
        raise no_images(url)


def _list(url: str, storage_options: dict[str, Any] | None, skipped: dict[str, int] | None, after: str,
          last_id: str | None, part_rows: int) -> Iterator[tuple[Listing, str, str | None]]:
    """(listing, after, until) of each part of `url` after key `after` (image ids after `last_id`):
    S3 prefixes in parts as they are listed (`StartAfter`), anything else in one part (list_inputs)."""
    fs, path = filesystem(url, storage_options)
    path = path.rstrip("/") or path
    lister = range_lister(fs)
    if lister is not None and not is_inventory(url) and not fs.isfile(path) and fs.isdir(path):
        for part in lister(fs).parts(path, skipped, after, part_rows):
            yield Listing(*part.columns), part.after, part.until
        return
    listing = list_inputs(url, storage_options, skipped)
    if last_id is not None:  # a one-part input never leaves a part that does not end it; kept general
        listing = listing.take(pc.indices_nonzero(pc.greater(listing.image_ids, last_id)))
    yield listing, after, None


def record_of(parts: int, last: ListingPart) -> dict[str, Any]:
    """What the run's record says about its snapshot so far: `parts` parts, the last one `last`."""
    return {"listing_parts": parts, "listed_until": last.until}
