"""Integrity of an output's Delta table: does every active file hold exactly what the log and
the readers rely on?

    python -m jobs.check OUT            # names damaged files, exit 1 if any
    python -m jobs.check OUT --repair   # and removes them so the next run redoes their images

The log is the truth. For each active file of OUT/segments (add actions of the latest version):
    - the store holds a file of the logged size (a HEAD);
    - the whole file reads (every page, not only the footer: a file damaged in place with its
      size unchanged fails here, as it would fail every reader);
    - its rows are the logged count (numRecords) and its image ids the logged min/max;
    - each row is whole: `num_proposals` equals the length of `proposals`, ranks are 0..n-1,
      an error row has no proposals;
and across files, no image has two rows (a doubled image: a file copied over another, a commit
made twice by hand). Files are read through delta-rs's own object store, so one set of storage
options serves the log and the files.

Repair takes the output's lease (no run may be writing), then removes every damaged file, and
every file holding a doubled image, in ONE commit (Delta remove actions) fenced like a run's:
those images then have no row, so the next run re-processes them, and the table is readable and
complete again after it. delta-rs's own `DeltaTable.delete(predicate)` cannot do this: it
rewrites candidate files and fails on the very file that is damaged. Removed files stay on the
store and in older versions (time travel) until a vacuum.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .delta import OutputTables
from .files import TABLE
from .schema import SEGMENTS_SCHEMA

READ_WORKERS = 8  # concurrent file reads: object-store latency, not CPU, bounds a check
CHECK_COLUMNS = ["image_id", "status", "num_proposals", "proposals"]


@dataclass(frozen=True)
class Damage:
    """One active file that does not hold what the log and the readers rely on."""

    path: str  # relative to the table root, as in the log
    reason: str  # 'missing', 'size X != Y (log)', 'rows X != Y (log)', 'unreadable (...)', ...
    image_ids: tuple[str, ...] = ()  # the images concerned, where the file told (doubled, bad rows)


@dataclass(frozen=True)
class TableCheck:
    uri: str
    version: int
    files: int  # active files checked
    images: int  # rows read
    damaged: tuple[Damage, ...]


def table_uri(output: str) -> str:
    """OUT/segments as delta-rs takes it: local paths made absolute, URLs kept."""
    if "://" not in output:
        output = os.path.abspath(output)
    elif not urlsplit(output).netloc and not output.startswith("file://"):
        raise ValueError(f"{output!r} names no bucket: expected e.g. s3://bucket/out/run1")
    return output.rstrip("/") + "/" + TABLE


def _open(uri: str, storage_options: dict[str, str] | None, version: int | None = None):
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(uri, version=version, storage_options=storage_options)
    except TableNotFoundError:
        raise FileNotFoundError(f"{uri} is not a Delta table (no _delta_log/ there): is it a jobs.segment "
                                f"--output (it holds segments/)?") from None


def active_files(dt: Any) -> pa.Table:
    """The latest version's add actions, one row per active file (path, size_bytes, num_records,
    min./max. stats columns), as a pyarrow Table."""
    return pa.table(dt.get_add_actions(flatten=True))


def _rows_problem(table: pa.Table) -> tuple[str, tuple[str, ...]] | None:
    """Why some rows of one file are not whole images, or None."""
    lengths = pc.list_value_length(table.column("proposals")).fill_null(0)
    counts = table.column("num_proposals").fill_null(-1)
    bad = pc.not_equal(lengths, pc.cast(counts, pa.int32()))
    if pc.any(bad).as_py():
        ids = table.column("image_id").filter(bad).to_pylist()
        return f"num_proposals != number of proposals for {len(ids)} image(s)", tuple(ids)
    errors = pc.and_(pc.not_equal(table.column("status"), "ok"), pc.greater(lengths, 0))
    if pc.any(errors).as_py():
        ids = table.column("image_id").filter(errors).to_pylist()
        return f"{len(ids)} error/retry row(s) hold proposals", tuple(ids)
    flat = table.column("proposals").combine_chunks()
    if len(pc.list_flatten(flat)):
        ranks = pc.list_flatten(flat).field("rank").to_numpy()
        parents = pc.list_parent_indices(flat).to_numpy()
        starts = np.r_[0, np.cumsum(lengths.to_numpy())[:-1]]
        want = np.arange(len(ranks)) - np.repeat(starts, lengths.to_numpy())
        wrong = np.unique(parents[ranks != want])
        if len(wrong):
            ids = tuple(table.column("image_id").take(pa.array(wrong)).to_pylist())
            return f"ranks are not 0..n-1 for {len(ids)} image(s)", ids
    return None


def inspect_file(fs: pafs.FileSystem, path: str, size: int, rows: int | None, ids: tuple[str | None, str | None],
                 ) -> tuple[Damage | None, pa.Array]:
    """(why the file at `path` does not match its add action or holds broken rows, or None; its
    image ids). Reads the whole file (one GET after a HEAD)."""
    empty = pa.array([], pa.string())
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        return Damage(path, "missing"), empty
    with f:
        if f.size() != size:
            return Damage(path, f"size {f.size()} != {size} (log)"), empty
        try:
            table = pq.read_table(f, columns=CHECK_COLUMNS, schema=SEGMENTS_SCHEMA)
        except (OSError, pa.ArrowException) as e:
            return Damage(path, f"unreadable ({str(e).splitlines()[0][:160]})"), empty
    image_ids = table.column("image_id").combine_chunks() if table.num_rows else empty
    if rows is not None and table.num_rows != rows:
        return Damage(path, f"rows {table.num_rows} != {rows} (log)"), image_ids
    if table.num_rows and None not in ids:
        mm = pc.min_max(image_ids)
        found = (mm["min"].as_py(), mm["max"].as_py())
        if found != tuple(ids):
            return Damage(path, f"image_id {found[0]}..{found[1]} != {ids[0]}..{ids[1]} (log)"), image_ids
    problem = _rows_problem(table)
    if problem is not None:
        return Damage(path, problem[0], problem[1]), image_ids
    return None, image_ids


def check_output(output: str, storage_options: dict[str, str] | None = None,
                 workers: int = READ_WORKERS) -> TableCheck:
    """Checks every active file of OUT/segments (see the module docstring)."""
    from deltalake.fs import DeltaStorageHandler

    uri = table_uri(output)
    dt = _open(uri, storage_options)
    files = active_files(dt)
    # no known_sizes: the size must come from the store, not from the log being checked
    fs = pafs.PyFileSystem(DeltaStorageHandler(uri, storage_options))
    n = files.num_rows
    column = lambda name: files.column(name).to_pylist() if name in files.column_names else [None] * n  # noqa: E731
    paths, sizes, rows = column("path"), column("size_bytes"), column("num_records")
    lows, highs = column("min.image_id"), column("max.image_id")
    with ThreadPoolExecutor(max(1, min(workers, n))) as pool:
        found = list(pool.map(lambda i: inspect_file(fs, paths[i], sizes[i], rows[i], (lows[i], highs[i])), range(n)))
    damaged = [d for d, _ in found if d is not None]
    damaged += _doubled([(p, ids) for p, (d, ids) in zip(paths, found) if d is None])
    return TableCheck(uri, dt.version(), n, sum(len(ids) for _, ids in found), tuple(damaged))


def _doubled(files: list[tuple[str, pa.Array]]) -> list[Damage]:
    """A Damage for each readable file that holds an image another file (or itself) holds too."""
    if not files:
        return []
    ids = pa.concat_arrays([ids for _, ids in files])
    which = np.repeat(np.arange(len(files)), [len(ids) for _, ids in files])
    counts = pc.value_counts(ids)
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(twice):
        return []
    hit = pc.is_in(ids, twice).to_numpy(zero_copy_only=False)
    out = []
    for k in np.unique(which[hit]):
        mine = ids.filter(pa.array(hit & (which == k))).to_pylist()
        out.append(Damage(files[k][0], f"{len(mine)} image(s) with more than one row", tuple(sorted(set(mine)))))
    return out


@dataclass(frozen=True)
class Removal:
    version: int  # the table version of the repair commit
    paths: tuple[str, ...]


def repair_output(output: str, damaged: Iterable[Damage], storage_options: dict[str, Any] | None = None,
                  ) -> Removal | None:
    """Removes every damaged file in one fenced commit, holding the output's lease (see the
    module docstring); the next run re-processes their images. None when nothing was damaged."""
    from .lease import Lease
    from .store import new_run_id, now_utc

    damaged = list(damaged)
    if not damaged:
        return None
    paths = sorted({d.path for d in damaged})
    lease = Lease(output, storage_options)
    lease.acquire()
    try:
        tables = OutputTables(output, storage_options, lease.check)
        repair_id = f"repair-{new_run_id()}"
        record = {"run_id": repair_id, "started_at": now_utc(), "exit": "repair", "complete": True,
                  "repair": {"files": paths, "damaged": [f"{d.path}: {d.reason}" for d in damaged]}}
        tables.fence(record, tables.settings() or {})
        live = set(tables.file_sizes())
        tables.commit_group(repair_id, 1, [], [(p, None) for p in paths if p in live], record, step="repair")
        return Removal(tables.open().version(), tuple(paths))
    finally:
        lease.release()
