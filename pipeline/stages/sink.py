"""Staging and publishing a shard's rows: the workers' half of writing the output tables.

Who writes what (no table bytes pass through the driver):
    1. workers (the encoding tasks, or the CPU actors) write each batch's rows of a shard as a
       fragment `_tmp/stage/<run>/<shard>/<uuid>.arrow` (Arrow IPC) and hand the driver only
       (shard_id, path, image_ids)  -- `StageWriter`;
    2. once fragments hold every image of a shard, the driver starts a publish task (a Ray task,
       many in parallel) that concatenates them and writes the shard's data file
       (`segments/part-<shard>-<run>-<uuid>.parquet`) and returns its add-action facts
       -- `publish_shard`; old files holding images a group replaces are rewritten without
       them in the same kind of task -- `rewrite_file`;
    3. the driver commits groups of published shards to the table (pipeline/tables/delta.py).
A file that no commit adds is invisible to Delta readers, so a publish task that dies after its
writes and runs again just leaves an unreferenced file (for `vacuum`).

Why not Ray Data's `Datasink`: its `on_write_complete` runs once, on the driver, after the whole
dataset is written, so a 10M-image job would commit nothing until its end and a crash would
lose all of it. Shards must commit while the job runs; the driver decides when, workers write.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ifcn.io import put_atomic

from pipeline.errors import RETRY, storage_call
from pipeline.tables.parquet_io import parquet_bytes  # noqa: F401  (plan.py imports it from here)
from pipeline.planning.sources import Shard
from pipeline.tables.files import rewrite, write_data_file
from pipeline.tables.schema import REDUCED_SCHEMA, reduced_to_segments
from pipeline.tables.store import TMP_DIR, OutputStore, remove_quietly

STAGE_DIR = f"{TMP_DIR}/stage"
# Fragments are written once and read once, by the publish task: Arrow IPC, buffers as they are.
# Parquet (lz4) cost ~1.2 core-ms to write and ~0.5 to read per 480x640 image of 1000 proposals; IPC with
# lz4 or zstd buffers 1.3-2.2 ms; uncompressed 0.06 ms, for ~360 KB per such image (~3x the data file's
# zstd bytes) that live until the shard is published (bench/README.md, cpu_side).
STAGE_COMPRESSION: str | None = None

# What a worker hands the driver per fragment: a few hundred bytes, whatever the masks weigh.
# Images that failed transiently are rows with status 'retry' like any other (committed, redone
# by the next run), so they never hold their shard back.
FRAGMENT_SCHEMA = pa.schema([("shard_id", pa.string()), ("path", pa.string()),
                             ("image_ids", pa.list_(pa.string())), ("nbytes", pa.int64())])


@dataclass(frozen=True)
class Fragment:
    """One staged file of a shard's rows and the images the driver takes from it."""

    path: str
    image_ids: tuple[str, ...]  # only these rows are published (a retried task may repeat some)


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
            data = ipc_bytes(part)
            path = self.store.path(STAGE_DIR, self.run_id, sid, f"{uuid.uuid4().hex}.arrow")
            storage_call(lambda: put_atomic(self.store.fs, path, data))
            rows.append({"shard_id": sid, "path": path, "image_ids": part.column("image_id").to_pylist(),
                         "nbytes": len(data)})
        return pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)


def ipc_bytes(table: pa.Table) -> bytes:
    """A staged fragment's bytes: REDUCED_SCHEMA rows as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, REDUCED_SCHEMA, options=pa.ipc.IpcWriteOptions(compression=STAGE_COMPRESSION)) as w:
        w.write_table(table.cast(REDUCED_SCHEMA))
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    """`ipc_bytes` back to REDUCED_SCHEMA rows (a fragment of another schema is refused, naming both)."""
    table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    if not table.schema.equals(REDUCED_SCHEMA):
        raise ValueError(f"staged fragment of schema {table.schema}; expected {REDUCED_SCHEMA}")
    return table


def publish_shard(output: str, storage_options: dict[str, Any] | None, shard: Shard,
                  fragments: list[Fragment], run_id: str) -> dict[str, Any]:
    """A complete shard's fragments -> its data file; returns the add-action facts and the
    shard's counts and image ids (what the driver commits and sums).

    Runs as a Ray task (retried if its worker dies; a retry writes new files, and the old ones are
    never committed). Transient storage failures are retried with backoff here (`storage_call`),
    before Ray's own retries, so a short outage delays the shard instead of failing the run."""
    store = OutputStore(output, storage_options)
    return storage_call(lambda: _publish(store, shard, fragments, run_id))


def _publish(store: OutputStore, shard: Shard, fragments: list[Fragment], run_id: str) -> dict[str, Any]:
    parts = []
    for frag in fragments:
        table = read_ipc(store.fs.cat_file(frag.path))
        keep = pc.is_in(table.column("image_id"), pa.array(frag.image_ids, pa.string()))
        parts.append(table.filter(keep))
    reduced = pa.concat_tables(parts) if parts else REDUCED_SCHEMA.empty_table()
    versions = {it.image_id: (it.etag, it.size) for it in shard.items}
    segments = reduced_to_segments(reduced, run_id, versions)
    got = segments.column("image_id").to_pylist()
    want = sorted(versions)
    if got != want:  # a lost or duplicated image would be silently wrong output: refuse to publish
        raise RuntimeError(f"shard {shard.shard_id}: got images {got[:5]}..., expected {want[:5]}... "
                           f"({len(got)} vs {len(want)}); not publishing it")
    file = write_data_file(store.fs, store.root, segments, shard.shard_id, run_id)
    status = segments.column("status").to_pylist()
    for frag in fragments:  # best effort: the run's end removes all of _tmp/ anyway
        remove_quietly(store.fs, frag.path)
    return {"shard_id": shard.shard_id, "file": file, "image_ids": got, "num_images": segments.num_rows,
            "num_ok": status.count("ok"), "num_error": status.count("error"), "num_retry": status.count(RETRY),
            "num_proposals": int(pc.sum(segments.column("num_proposals")).as_py() or 0)}


def rewrite_file(output: str, storage_options: dict[str, Any] | None, path: str, drop: list[str],
                 run_id: str) -> tuple[str, dict[str, Any] | None]:
    """The table's data file `path` rewritten without the images `drop` (a Ray task, like
    publish_shard): (path, the new file's add facts or None when no row is left)."""
    store = OutputStore(output, storage_options)
    return path, storage_call(lambda: rewrite(store.fs, store.root, path, drop, run_id))
