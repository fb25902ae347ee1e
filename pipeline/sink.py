"""The output folder: staged fragments written by workers, shard commits, the job's small files.

Who writes what (no table bytes pass through the driver):
    1. workers (the encoding tasks, or the CPU actors) write each batch's rows of a shard as a
       fragment `_tmp/stage/<run>/<shard>/<uuid>.parquet` and hand the driver only
       (shard_id, path, image_ids)  -- `StageWriter`;
    2. once fragments hold every image of a shard, the driver starts a publish task (a Ray task,
       many in parallel) that concatenates them and writes `masks/part-<shard>.parquet`, then
       `images/part-<shard>.parquet`, then the commit marker `_commits/<shard>.json` (counts,
       the shard's input digest, its files) -- `publish_shard`.
The marker is what commits a shard: the project's readers (`pipeline.read_output`) read only
files that a marker lists. A job killed between a shard's files and its marker leaves files of an
uncommitted shard; the next run deletes them before it starts (`remove_uncommitted`) and writes
the shard again under the same names, so files can be overwritten but never duplicated.
Every file is written with `ifcn.io.put_atomic` (object stores: one upload; local disks: a hidden
temp file renamed over the target), so no reader sees half a file.

Why not Ray Data's `Datasink`: its `on_write_complete` runs once, on the driver, after the whole
dataset is written, so a 10M-image job would commit nothing until its end and a crash would
lose all of it. Shards must commit while the job runs; the driver decides when, workers write.
"""
from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ifcn.io import filesystem, is_temp_name, put_atomic

from .errors import RETRY, storage_call
from .schema import MASKS_ROW_GROUP_ROWS, PARQUET_COMPRESSION, REDUCED_SCHEMA, reduced_to_tables
from .sources import Shard

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"  # empty, written last by a complete run (the Hadoop/Spark convention)
MANIFEST_FILE = "_manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
STAGE_DIR = f"{TMP_DIR}/stage"
TABLES = ("masks", "images")  # write order: a shard's images row never appears before its masks
STAGE_COMPRESSION = "lz4"  # fragments are read once, by the publish task: fast beats small

# What a worker hands the driver per fragment: a few hundred bytes, whatever the masks weigh.
# retry_ids: images that failed transiently (pipeline/errors.py); they are in no file, and their
# shard is not published this run. path is "" when every image of the batch is such a one.
FRAGMENT_SCHEMA = pa.schema([("shard_id", pa.string()), ("path", pa.string()),
                             ("image_ids", pa.list_(pa.string())), ("nbytes", pa.int64()),
                             ("retry_ids", pa.list_(pa.string())), ("retry_error", pa.string())])


@dataclass(frozen=True)
class Fragment:
    """One staged file of a shard's rows and the images the driver takes from it."""

    path: str
    image_ids: tuple[str, ...]  # only these rows are published (a retried task may repeat some)


class OutputStore:
    """One job's output folder on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.fs, root = filesystem(url, storage_options)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- small JSON files -------------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        try:
            return json.loads(self.fs.cat_file(p))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        put_atomic(self.fs, self.path(name), json.dumps(obj, indent=2, sort_keys=True).encode())

    # --- commits ----------------------------------------------------------------------
    def committed(self) -> dict[str, dict[str, Any]]:
        """shard_id -> commit marker, for every committed shard.

        One listing, then every marker in one `cat` call: s3fs and gcsfs fetch a list of keys
        concurrently, so 80k markers take seconds rather than one round trip each."""
        d = self.path(COMMITS_DIR)
        try:
            self.fs.invalidate_cache(d)
            paths = [p for p in self.fs.ls(d, detail=False) if _name(p).endswith(".json") and not _name(p).startswith(".")]
        except FileNotFoundError:
            return {}
        out = {}
        for data in self.fs.cat(paths, on_error="raise").values() if paths else ():
            marker = json.loads(data)
            out[marker["shard_id"]] = marker
        return dict(sorted(out.items()))

    def remove_uncommitted(self, committed: set[str]) -> int:
        """Deletes `_tmp/`, temp files, and table files of shards without a commit marker; returns
        the table files removed. Only a run holding the output's lease may call it."""
        removed = 0
        _remove_quietly(self.fs, self.path(TMP_DIR))
        for table in TABLES:
            d = self.path(table)
            try:
                self.fs.invalidate_cache(d)
                paths = self.fs.ls(d, detail=False)
            except FileNotFoundError:
                continue
            for p in paths:
                name = _name(p)
                part = name.startswith("part-") and name.endswith(".parquet")
                if is_temp_name(name) or (part and _shard_of(name) not in committed):
                    self.fs.rm(p)
                    removed += part
        return removed

    def commit(self, shard: Shard, reduced: pa.Table) -> dict[str, Any]:
        """Writes one shard's tables (REDUCED_SCHEMA rows, one per image), then its marker."""
        images, masks = reduced_to_tables(reduced)
        got = images.column("image_id").to_pylist()
        want = sorted(it.image_id for it in shard.items)
        if got != want:  # a lost or duplicated image would be silently wrong output: refuse to commit
            raise RuntimeError(f"shard {shard.shard_id}: got images {got[:5]}..., expected {want[:5]}... "
                               f"({len(got)} vs {len(want)}); not committing it")
        name = f"part-{shard.shard_id}.parquet"
        for table_name, table, group in (("masks", masks, MASKS_ROW_GROUP_ROWS), ("images", images, None)):
            put_atomic(self.fs, self.path(table_name, name), _parquet_bytes(table, group))
        status = images.column("status").to_pylist()
        marker = {"shard_id": shard.shard_id, "digest": shard.digest, "num_images": images.num_rows,
                  "num_ok": status.count("ok"), "num_error": status.count("error"),
                  "num_proposals": masks.num_rows, "files": [f"{t}/{name}" for t in TABLES],
                  "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write_json(marker_name(shard.shard_id), marker)
        return marker

    def remove_tmp(self) -> None:
        """Drops `_tmp/` once a run has nothing left in flight."""
        _remove_quietly(self.fs, self.path(TMP_DIR))

    def remove(self, name: str) -> None:
        _remove_quietly(self.fs, self.path(name))

    def mark_success(self) -> None:
        """Writes the empty `_SUCCESS`, the last file of a complete run."""
        put_atomic(self.fs, self.path(SUCCESS_FILE), b"")


def marker_name(shard_id: str) -> str:
    return f"{COMMITS_DIR}/{shard_id}.json"


class StageWriter:
    """Last stage of the graph, in the workers: REDUCED_SCHEMA rows -> one staged fragment per
    shard in the batch -> FRAGMENT_SCHEMA rows (what the driver receives)."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None, run_id: str) -> None:
        self.store = OutputStore(output, storage_options)
        self.run_id = run_id

    def __call__(self, reduced: pa.Table) -> pa.Table:
        rows = []
        shard_ids = reduced.column("shard_id")
        for sid in pc.unique(shard_ids).to_pylist():
            part = reduced.filter(pc.equal(shard_ids, sid))
            retry = pc.equal(part.column("status"), RETRY)
            failed, part = part.filter(retry), part.filter(pc.invert(retry))
            path, nbytes = "", 0
            if part.num_rows:
                data = _parquet_bytes(part, None, STAGE_COMPRESSION)
                path = self.store.path(STAGE_DIR, self.run_id, sid, f"{uuid.uuid4().hex}.parquet")
                storage_call(lambda: put_atomic(self.store.fs, path, data))
                nbytes = len(data)
            rows.append({"shard_id": sid, "path": path, "image_ids": part.column("image_id").to_pylist(),
                         "nbytes": nbytes, "retry_ids": failed.column("image_id").to_pylist(),
                         "retry_error": failed.column("error")[0].as_py() if failed.num_rows else None})
        return pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)


def publish_shard(output: str, storage_options: dict[str, Any] | None, shard: Shard,
                  fragments: list[Fragment]) -> dict[str, Any]:
    """A complete shard's fragments -> its committed files and marker; returns the marker.

    Runs as a Ray task (retried if its worker dies): an existing marker of the same shard and
    digest means an earlier attempt finished, so a retry returns it rather than rewriting.
    Transient storage failures are retried with backoff here (`storage_call`), before Ray's own
    retries, so a short outage delays the shard instead of failing the run."""
    store = OutputStore(output, storage_options)
    return storage_call(lambda: _publish(store, shard, fragments))


def _publish(store: OutputStore, shard: Shard, fragments: list[Fragment]) -> dict[str, Any]:
    """One attempt of publish_shard: idempotent (the same files, then the marker)."""
    done = store.read_json(marker_name(shard.shard_id))
    if done is not None and done.get("digest") == shard.digest:
        return done
    parts = []
    for frag in fragments:
        table = pq.read_table(io.BytesIO(store.fs.cat_file(frag.path)), schema=REDUCED_SCHEMA)
        keep = pc.is_in(table.column("image_id"), pa.array(frag.image_ids, pa.string()))
        parts.append(table.filter(keep))
    marker = store.commit(shard, pa.concat_tables(parts))
    for frag in fragments:  # best effort: the run's end removes all of _tmp/ anyway
        _remove_quietly(store.fs, frag.path)
    return marker


def _parquet_bytes(table: pa.Table, row_group_size: int | None, compression: str = PARQUET_COMPRESSION) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, row_group_size=row_group_size, write_statistics=True)
    return buf.getvalue()


def _remove_quietly(fs, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _shard_of(file_name: str) -> str:
    """'part-000012.parquet' -> '000012'."""
    return file_name[len("part-"):-len(".parquet")]
