"""What readers see: the committed shards of a job's output, and nothing else.

    from pipeline import read_output
    masks = read_output("s3://bucket/out/run1")                       # pyarrow Table
    one = read_output(url, "masks", filter=pyarrow.dataset.field("image_id") == "a/1.jpg")
    images = read_output(url, "images", ray=True)                     # Ray Dataset

A shard counts once its commit marker `_commits/<shard>.json` exists; the marker names the
shard's files. A plain glob over `masks/*.parquet` also sees files of a shard being published
(its masks file lands a moment before its images file and marker) and, after a crash, the files
of shards that never got their marker, until the next run removes them. `_SUCCESS` says the
whole listing is done; this reader is right at any moment, during a run or after a crash.
"""
from __future__ import annotations

from typing import Any

import pyarrow.dataset as ds

from .schema import IMAGES_SCHEMA, MASKS_SCHEMA
from .sink import COMMITS_DIR, JOB_FILE, OutputStore

SCHEMAS = {"masks": MASKS_SCHEMA, "images": IMAGES_SCHEMA}


def _filter_block(table, expression: Any):
    """A pyarrow.dataset expression applied to one block of a Ray Dataset (expressions pickle)."""
    return table.filter(expression)


def committed_files(url: str, table: str = "masks", storage_options: dict[str, Any] | None = None) -> list[str]:
    """Paths (without protocol) of `table`'s files in committed shards, in shard order."""
    return _committed_files(OutputStore(url, storage_options), table)


def _committed_files(store: OutputStore, table: str) -> list[str]:
    if table not in SCHEMAS:
        raise ValueError(f"table={table!r}: choose one of {sorted(SCHEMAS)}")
    url = store.url
    markers = store.committed()
    if not markers and store.read_json(JOB_FILE) is None:
        raise FileNotFoundError(f"{url}: not a jobs.segment output (no {JOB_FILE} or {COMMITS_DIR}/); "
                                f"pass the --output URL the job wrote to")
    return [store.path(f) for m in markers.values() for f in m["files"] if f.startswith(f"{table}/")]


def read_output(url: str, table: str = "masks", columns: list[str] | None = None, filter: Any = None,
                storage_options: dict[str, Any] | None = None, ray: bool = False):
    """`table` ("masks" or "images") of the committed shards at `url`: a pyarrow Table, or with
    ray=True a Ray Dataset read by the cluster. `filter` is a pyarrow.dataset expression; the
    files' row-group statistics let it skip most of a shard for one image_id."""
    store = OutputStore(url, storage_options)
    files = _committed_files(store, table)
    schema = SCHEMAS[table]
    if ray:
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        if not files:
            return ray.data.from_arrow(schema.empty_table().select(columns or schema.names))
        rds = ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(store.fs)), schema=schema,
                                    partitioning=None)
        if filter is not None:  # before the projection: a filter may use columns that are not returned
            rds = rds.map_batches(_filter_block, fn_kwargs={"expression": filter}, batch_format="pyarrow",
                                  batch_size=None)
        return rds.select_columns(columns) if columns else rds  # (read_parquet's columns= is deprecated)
    if not files:
        return schema.empty_table().select(columns or schema.names)
    dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=store.fs)
    return dataset.to_table(columns=columns, filter=filter)


__all__ = ["committed_files", "read_output"]
