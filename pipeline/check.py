"""Integrity of an output's Delta tables: is every active file there, whole, and the one the log names?

    python -m jobs.check OUT            # names damaged files, exit 1 if any
    python -m jobs.check OUT --repair   # and removes their shards' rows so the next run redoes them

The log is the truth: for each active file of OUT/masks and OUT/images (add actions of the
latest version) the store must hold a file of the logged size whose Parquet footer holds the
logged row count (numRecords) and the logged shard_id range. Only footers are read (ranged GETs,
via delta-rs's own object store, so one set of storage options serves the log and the files).

Repair removes, per table in ONE commit (Delta remove actions; images first, then masks), every
active file of each damaged file's shard: those images then have no images row, so the next run
re-processes them, and no masks row of theirs is left behind to be doubled. delta-rs's own
`DeltaTable.delete(predicate)` cannot do this: it opens every candidate file's footer to rewrite
it, and fails on the very file that is damaged ("Requested range was invalid" on a truncated one).
Removed files stay on the store and in older versions (time travel) until a vacuum.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TABLES = ("images", "masks")  # repair order: an image loses its images row before its masks rows
SHARD_COLUMN = "shard_id"
FOOTER_WORKERS = 16  # concurrent HEAD + footer reads: object-store latency, not CPU, bounds a check
# part-<shard_id>-<run_id>-<uuid>.parquet (DELTA_LAYOUT); used only where a file has no shard stats
_PART_NAME = re.compile(r"(?:^|/)part-(?P<shard>[^-/]+)-[^/]*\.parquet$")


@dataclass(frozen=True)
class Damage:
    """One active file that does not match its add action."""

    table: str  # 'masks' or 'images'
    path: str  # relative to the table root, as in the log
    reason: str  # 'missing', 'size X != Y (log)', 'rows X != Y (log)', 'unreadable footer (...)', ...
    shard_id: str | None  # the shard whose rows the file holds (None: neither stats nor name tell)


@dataclass(frozen=True)
class TableCheck:
    table: str
    uri: str
    version: int
    files: int  # active files checked
    damaged: tuple[Damage, ...]


def table_uri(output: str, table: str) -> str:
    """OUT/<table> as delta-rs takes it: local paths made absolute, URLs kept."""
    if "://" not in output:
        output = os.path.abspath(output)
    elif not urlsplit(output).netloc and not output.startswith("file://"):
        raise ValueError(f"{output!r} names no bucket: expected e.g. s3://bucket/out/run1")
    return output.rstrip("/") + "/" + table


def _open(uri: str, storage_options: dict[str, str] | None, version: int | None = None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, version=version, storage_options=storage_options)
    except TableNotFoundError:
        raise FileNotFoundError(f"{uri} is not a Delta table (no _delta_log/ there): is it a job's --output "
                                f"with masks/ and images/?") from None


def active_files(dt: Any) -> pa.Table:
    """The latest version's add actions, one row per active file (path, size_bytes, num_records,
    min./max. stats columns, partition.* values), as a pyarrow Table."""
    return pa.table(dt.get_add_actions(flatten=True))


def file_shards(files: pa.Table) -> list[str | None]:
    """The shard of each file: its shard_id stats when min == max, else its file name's shard."""
    names = files.column("path").to_pylist()
    cols = files.column_names
    lo = files.column(f"min.{SHARD_COLUMN}").to_pylist() if f"min.{SHARD_COLUMN}" in cols else [None] * len(names)
    hi = files.column(f"max.{SHARD_COLUMN}").to_pylist() if f"max.{SHARD_COLUMN}" in cols else [None] * len(names)
    out: list[str | None] = []
    for name, a, b in zip(names, lo, hi):
        if a is not None and a == b:
            out.append(a)
        else:
            m = _PART_NAME.search(name)
            out.append(m.group("shard") if m else None)
    return out


def _footer_shard_range(meta: pq.FileMetaData) -> tuple[str, str] | None:
    """(min, max) of shard_id over the footer's row-group statistics, None when not recorded."""
    try:
        col = meta.schema.names.index(SHARD_COLUMN)
    except ValueError:
        return None
    lows, highs = [], []
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(col).statistics
        if stats is None or not stats.has_min_max:
            return None
        lows.append(stats.min)
        highs.append(stats.max)
    return (min(lows), max(highs)) if lows else None


def inspect_file(fs: pafs.FileSystem, path: str, size: int, rows: int | None,
                 shard_range: tuple[str | None, str | None]) -> str | None:
    """Why the file at `path` does not match its add action, or None when it does.

    Opening costs one HEAD (the store's size); then the footer's few ranged GETs, never data pages.
    """
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        return "missing"
    with f:
        if f.size() != size:
            return f"size {f.size()} != {size} (log)"
        try:
            meta = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as e:
            return f"unreadable footer ({str(e).splitlines()[0][:200]})"
    if rows is not None and meta.num_rows != rows:
        return f"rows {meta.num_rows} != {rows} (log)"
    found = _footer_shard_range(meta)
    if found is not None and None not in shard_range and found != tuple(shard_range):
        return f"{SHARD_COLUMN} {found[0]}..{found[1]} != {shard_range[0]}..{shard_range[1]} (log)"
    return None


def check_table(output: str, table: str, storage_options: dict[str, str] | None = None,
                workers: int = FOOTER_WORKERS) -> TableCheck:
    """Checks every active file of OUT/<table> against its add action (see the module docstring)."""
    from deltalake.fs import DeltaStorageHandler

    uri = table_uri(output, table)
    dt = _open(uri, storage_options)
    files = active_files(dt)
    # no known_sizes: the size must come from the store, not from the log being checked
    fs = pafs.PyFileSystem(DeltaStorageHandler(uri, storage_options))
    cols = files.column_names
    n = files.num_rows
    column = lambda name: files.column(name).to_pylist() if name in cols else [None] * n  # noqa: E731
    paths, sizes, rows = column("path"), column("size_bytes"), column("num_records")
    lows, highs = column(f"min.{SHARD_COLUMN}"), column(f"max.{SHARD_COLUMN}")
    with ThreadPoolExecutor(max(1, min(workers, n))) as pool:
        reasons = list(pool.map(lambda i: inspect_file(fs, paths[i], sizes[i], rows[i], (lows[i], highs[i])),
                                range(n)))
    shards = file_shards(files)
    damaged = tuple(Damage(table, paths[i], r, shards[i]) for i, r in enumerate(reasons) if r is not None)
    return TableCheck(table, uri, dt.version(), n, damaged)


def check_output(output: str, storage_options: dict[str, str] | None = None) -> list[TableCheck]:
    """Both tables of a job's output, images first (the order repair uses)."""
    return [check_table(output, t, storage_options) for t in TABLES]


@dataclass(frozen=True)
class Removal:
    table: str
    version: int  # the table version of the repair commit
    paths: tuple[str, ...]
    shards: tuple[str, ...]


def repair_output(output: str, damaged: Iterable[Damage], storage_options: dict[str, str] | None = None,
                  now_ms: int | None = None) -> list[Removal]:
    """Removes every active file of the damaged files' shards: one commit per table, images first.

    A damaged file whose shard is unknown is removed alone. Old versions keep listing the removed
    files (time travel); nothing is deleted from the store.
    """
    from deltalake import CommitProperties
    from deltalake.transaction import RemoveAction

    damaged = list(damaged)
    shards = sorted({d.shard_id for d in damaged if d.shard_id is not None})
    wanted = set(shards)
    loose = {(d.table, d.path) for d in damaged if d.shard_id is None}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    out = []
    for table in TABLES:
        dt = _open(table_uri(output, table), storage_options)
        files = active_files(dt)
        parts = [c for c in files.column_names if c.startswith("partition.")]
        actions, paths = [], []
        for i, (path, shard) in enumerate(zip(files.column("path").to_pylist(), file_shards(files))):
            if shard in wanted or (table, path) in loose:
                pv = {c.removeprefix("partition."): files.column(c)[i].as_py() for c in parts}
                actions.append(RemoveAction(path, True, now_ms, files.column("size_bytes")[i].as_py(), pv or None))
                paths.append(path)
        if not actions:
            continue
        record = {"ifcn.repair": {"shards": shards, "files": paths,
                                  "damaged": [f"{d.table}/{d.path}: {d.reason}" for d in damaged]}}
        dt.create_write_transaction(actions, mode="append", schema=dt.schema(),
                                    partition_by=dt.metadata().partition_columns or None,
                                    commit_properties=CommitProperties(custom_metadata=record))
        dt.update_incremental()  # create_write_transaction leaves the handle at its read version
        out.append(Removal(table, dt.version(), tuple(paths), tuple(shards)))
    return out
