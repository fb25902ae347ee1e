"""The table's data files, read and written by whoever holds them: one Parquet file per shard with
its stats (what the log's add action says), files rewritten without images, and reads that check
every file against the log (its size, then its rows and image ids against the stats) so a swapped
or damaged file is a one-line error naming it and `jobs.check --repair`, never silently read.
The commits themselves are pipeline/tables/delta.py's.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.config import SegmentError

from .parquet_io import parquet_bytes
from .schema import IMAGES_SCHEMA, SEGMENTS_ROW_GROUP_ROWS, SEGMENTS_SCHEMA, VIEWS, masks_view

TABLE = "segments"
# Columns whose min/max go into a file's stats (short strings and numbers: what readers prune on).
STATS_COLUMNS = frozenset({"image_id", "shard_id", "run_id", "status", "height", "width", "num_proposals", "size"})
FILE_COLUMN = "__filename"  # pyarrow's scan field: the data file a row came from


class TableDamagedError(SegmentError, OSError):
    """A data file the log names is missing, of another size, or does not hold what the log says."""


def delta_storage_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """fsspec storage options (and AWS_* env) -> delta-rs object-store options.

    S3 commits need a conditional put (`conditional_put: etag`): two writers of one version must
    not both win. A plain-http endpoint (a local S3 server) needs AWS_ALLOW_HTTP."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    so = storage_options or {}
    kwargs = so.get("client_kwargs", {}) or {}
    endpoint = (kwargs.get("endpoint_url") or so.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    out = {"conditional_put": "etag"}
    region = kwargs.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    for key, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", so.get("key")),
                       ("AWS_SECRET_ACCESS_KEY", so.get("secret")), ("AWS_SESSION_TOKEN", so.get("token")),
                       ("AWS_REGION", region)):
        if value:
            out[key] = str(value)
    if endpoint and endpoint.startswith("http://"):
        out["AWS_ALLOW_HTTP"] = "true"
    return out


def table_uri(output: str, name: str) -> str:
    """`output`/`name` as deltalake opens it (local paths made absolute)."""
    if "://" not in output:
        output = os.path.abspath(output)
    return f"{output.rstrip('/')}/{name}"


def file_stats(table: pa.Table) -> str:
    """Delta add-action stats of a data file: numRecords, and min/max/nullCount of STATS_COLUMNS."""
    mins, maxs, nulls = {}, {}, {}
    for name in table.column_names:
        if name not in STATS_COLUMNS:
            continue
        col = table.column(name)
        nulls[name] = col.null_count
        if col.null_count < len(col):
            mm = pc.min_max(col)
            mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def write_data_file(fs, root: str, table: pa.Table, shard_id: str, run_id: str) -> dict[str, Any]:
    """Writes SEGMENTS_SCHEMA rows into the table folder (`root`/segments, no protocol) as
    `part-<shard>-<run>-<uuid>.parquet`; returns the add action's facts (the driver commits them)."""
    from ifcn.io import put_atomic

    data = parquet_bytes(table, SEGMENTS_ROW_GROUP_ROWS)
    file = f"part-{shard_id}-{run_id}-{uuid.uuid4().hex}.parquet"
    put_atomic(fs, f"{root}/{TABLE}/{file}", data)
    return {"path": file, "size": len(data), "modification_time": int(time.time() * 1000),
            "stats": file_stats(table)}


def rewrite(fs, root: str, path: str, drop: Sequence[str], run_id: str) -> dict[str, Any] | None:
    """The data file `path` (relative to the table) written again without the rows of the images
    `drop` (a worker's half of replacing or pruning them); returns the new file's add facts, or
    None when no row is left (the commit then only removes `path`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(fs.cat_file(f"{root}/{TABLE}/{path}")), schema=SEGMENTS_SCHEMA)
    kept = table.filter(pc.invert(pc.is_in(table.column("image_id"), pa.array(list(drop), pa.string()))))
    if kept.num_rows == 0:
        return None
    shard = path.split("-")[1] if path.startswith("part-") else "rewrite"
    return write_data_file(fs, root, kept, shard, run_id)


def _damaged(uri: str, path: str, what: str) -> TableDamagedError:
    output = uri.rsplit("/", 1)[0]
    return TableDamagedError(f"{uri}: data file {path} {what}; nothing was read from it. Run "
                             f"`python -m jobs.check --output {output} --repair` (it drops that file's images, "
                             f"which the next run then redoes)")


def table_dataset(dt: Any, table: str = TABLE, options: dict[str, str] | None = None,
                  image_ids: Sequence[str] | None = None, verify: bool = True) -> ds.Dataset:
    """The active data files of the DeltaTable `dt` as one pyarrow dataset of `table`'s schema
    (a view's name: "segments", "images"; "masks" is read as "segments" and flattened by the
    caller); with `image_ids`, only the files whose image_id min/max can hold one of them.

    verify: each file's size on the store must be the size its add action logged (one listing
    of the table folder): a missing, truncated or swapped file is a TableDamagedError naming it,
    never silently read. (Row counts and id ranges are checked where whole files are read:
    `read_verified`.)"""
    import pyarrow.fs as pafs
    from deltalake.fs import DeltaStorageHandler

    adds = pa.table(dt.get_add_actions(flatten=True))
    keep = np.ones(adds.num_rows, dtype=bool)
    if image_ids is not None and adds.num_rows and "min.image_id" in adds.column_names:
        ids = np.unique(np.asarray(list(image_ids), dtype=object))
        lo = adds.column("min.image_id").to_numpy(zero_copy_only=False)
        hi = adds.column("max.image_id").to_numpy(zero_copy_only=False)
        no_stats = np.array([a is None or b is None for a, b in zip(lo, hi)], dtype=bool)
        lo, hi = np.where(no_stats, "", lo), np.where(no_stats, "", hi)
        # a file can hold an id when some sorted id falls in [min, max]
        keep = (np.searchsorted(ids, hi, side="right") > np.searchsorted(ids, lo, side="left")) | no_stats
    adds = adds.filter(pa.array(keep))
    paths = adds.column("path").to_pylist()
    fs = pafs.PyFileSystem(DeltaStorageHandler(dt.table_uri, options or None))
    if verify and paths:
        _verify_sizes(dt.table_uri, fs, paths, adds.column("size_bytes").to_pylist())
    schema = SEGMENTS_SCHEMA if table == "masks" else VIEWS[table]
    return ds.FileSystemDataset.from_paths(paths, schema=schema, format=ds.ParquetFileFormat(), filesystem=fs)


def _verify_sizes(uri: str, fs: Any, paths: list[str], sizes: list[int]) -> None:
    """Each path's size on the store equals its logged size (one folder listing; HEADs for a few)."""
    import pyarrow.fs as pafs

    if len(paths) <= 8:
        infos = fs.get_file_info(paths)
    else:
        listed = {i.path.rsplit("/", 1)[-1]: i for i in fs.get_file_info(pafs.FileSelector("", recursive=False))}
        infos = [listed.get(p) for p in paths]
    for path, size, info in zip(paths, sizes, infos):
        if info is None or info.type == pafs.FileType.NotFound:
            raise _damaged(uri, path, "is missing from the store")
        if info.size != size:
            raise _damaged(uri, path, f"has {info.size} bytes, the log says {size}")


def read_verified(dt: Any, dataset: ds.Dataset, columns: list[str], filter: Any = None,
                  adds: pa.Table | None = None) -> pa.Table:
    """`dataset.to_table` that turns an unreadable file into one TableDamagedError naming it and,
    when whole files are read (no filter), checks each file's rows against its logged count and
    image_id range: a file swapped for another table file of the same size is caught here.
    adds: `dt`'s add actions (flattened), when the caller holds them already."""
    cols = list(dict.fromkeys([*columns, *(["image_id", FILE_COLUMN] if filter is None else [])]))
    try:
        table = dataset.to_table(columns=cols, filter=filter)
    except (OSError, pa.ArrowException) as e:
        raise _first_unreadable(dt.table_uri, dataset, e) from None
    if filter is None and table.num_rows:
        _verify_rows(dt, table, adds)
    return table.select(columns)


class StateRanges:
    """The images table's planning columns (`columns` and FILE_COLUMN) at one version, read one
    image-id range at a time: a run planning part by part holds the rows of one part's range, not
    the whole table (issue 22). The files' sizes are checked once, here (one listing); each range
    reads the whole files whose id span meets it, checks their rows against the log, then keeps the
    rows in the range, so a file across two ranges is read by both."""

    def __init__(self, dt: Any, columns: Sequence[str], options: dict[str, str] | None = None) -> None:
        """dt: a DeltaTable at the version to read (None: no table yet, no rows)."""
        self.dt, self.columns, self.options = dt, list(columns), options
        adds = pa.table(dt.get_add_actions(flatten=True)) if dt is not None else pa.table({"path": pa.array([], pa.string())})
        self.adds = adds  # read once: each range's rows are checked against them
        self.paths = adds.column("path").to_pylist()
        if self.paths:
            import pyarrow.fs as pafs
            from deltalake.fs import DeltaStorageHandler

            self.fs = pafs.PyFileSystem(DeltaStorageHandler(dt.table_uri, options or None))
            _verify_sizes(dt.table_uri, self.fs, self.paths, adds.column("size_bytes").to_pylist())
        stats = "min.image_id" in adds.column_names
        # (files,) id spans; a file without stats spans everything
        self.lo = pc.fill_null(adds.column("min.image_id"), "") if stats else pa.array([""] * len(self.paths))
        self.hi = pc.fill_null(adds.column("max.image_id"), "\U0010ffff") if stats \
            else pa.array(["\U0010ffff"] * len(self.paths))

    def rows(self, after: str | None, until: str | None) -> pa.Table:
        """The rows with after < image_id <= until (None: unbounded), sorted by image_id."""
        keep = pa.array(np.ones(len(self.paths), bool))
        if after is not None:
            keep = pc.and_(keep, pc.greater(self.hi, after))
        if until is not None:
            keep = pc.and_(keep, pc.less_equal(self.lo, until))
        paths = [p for p, k in zip(self.paths, keep.to_pylist()) if k]
        cols = [*self.columns, FILE_COLUMN]
        if not paths:
            return pa.table({c: pa.array([], pa.string() if c == FILE_COLUMN else IMAGES_SCHEMA.field(c).type)
                             for c in cols})
        dataset = ds.FileSystemDataset.from_paths(paths, schema=VIEWS["images"], format=ds.ParquetFileFormat(),
                                                  filesystem=self.fs)
        table = read_verified(self.dt, dataset, cols, adds=self.adds)
        ids = table.column("image_id")
        inside = pa.array(np.ones(table.num_rows, bool))
        if after is not None:
            inside = pc.and_(inside, pc.greater(ids, after))
        if until is not None:
            inside = pc.and_(inside, pc.less_equal(ids, until))
        table = table.filter(inside)
        return table.take(pc.sort_indices(table.column("image_id")))


def _first_unreadable(uri: str, dataset: ds.Dataset, error: Exception) -> TableDamagedError:
    for fragment in dataset.get_fragments():
        try:
            fragment.to_table(columns=["image_id"])
            fragment.to_table()
        except (OSError, pa.ArrowException) as e:
            return _damaged(uri, fragment.path.rsplit("/", 1)[-1], f"cannot be read ({str(e).splitlines()[0][:120]})")
    return TableDamagedError(f"{uri}: reading failed ({str(error).splitlines()[0][:200]})")


def _verify_rows(dt: Any, table: pa.Table, adds: pa.Table | None = None) -> None:
    adds = adds if adds is not None else pa.table(dt.get_add_actions(flatten=True))
    logged = {p: (n, lo, hi) for p, n, lo, hi in zip(
        adds.column("path").to_pylist(), adds.column("num_records").to_pylist(),
        *(adds.column(c).to_pylist() if c in adds.column_names else [None] * adds.num_rows
          for c in ("min.image_id", "max.image_id")))}
    per_file = table.group_by(FILE_COLUMN).aggregate([("image_id", "count"), ("image_id", "min"), ("image_id", "max")])
    for name, n, lo, hi in zip(*(per_file.column(c).to_pylist() for c in (FILE_COLUMN, "image_id_count",
                                                                          "image_id_min", "image_id_max"))):
        path = name.rsplit("/", 1)[-1]
        want = logged.get(path)
        if want is None:
            continue
        if want[0] is not None and n != want[0]:
            raise _damaged(dt.table_uri, path, f"holds {n} rows, the log says {want[0]} (swapped or rewritten)")
        if want[1] is not None and (lo, hi) != (want[1], want[2]):
            raise _damaged(dt.table_uri, path, f"holds images {lo}..{hi}, the log says {want[1]}..{want[2]}")


def read_view(dt: Any, view: str, options: dict[str, str] | None, columns: list[str] | None = None,
              filter: Any = None, image_ids: Sequence[str] | None = None) -> pa.Table:
    """`view` ("segments", "images" or "masks": one row per proposal) of the DeltaTable `dt`."""
    dataset = table_dataset(dt, view, options, image_ids)
    if view != "masks":
        return read_verified(dt, dataset, columns or VIEWS[view].names, filter)
    wanted = columns or VIEWS["masks"].names
    image_cols = [c for c in wanted if c in SEGMENTS_SCHEMA.names and c != "proposals"]
    read = [*dict.fromkeys([*image_cols, "proposals"])]
    if filter is None or _on_images(filter):  # a filter on the image's columns is pushed down to the files
        return masks_view(read_verified(dt, dataset, read, filter), wanted)
    # it names a proposal's column: filter the flat rows
    flat = masks_view(read_verified(dt, dataset, list(SEGMENTS_SCHEMA.names)), None)
    return ds.dataset(flat).to_table(columns=wanted, filter=filter)


def _on_images(filter: Any) -> bool:
    """Whether a dataset expression names only the image's columns (not a proposal's)."""
    try:
        ds.dataset(IMAGES_SCHEMA.empty_table()).to_table(filter=filter)
        return True
    except (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowTypeError):
        return False
