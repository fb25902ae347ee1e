"""What readers see: a job's Delta tables at a committed version, and nothing else.

    from pipeline import read_output
    masks = read_output("s3://bucket/out/run1")                       # pyarrow Table
    one = read_output(url, "masks", filter=pyarrow.dataset.field("image_id") == "a/1.jpg")
    images = read_output(url, "images", ray=True)                     # Ray Dataset
    before = read_output(url, "images", version=3)                    # time travel

A thin layer over `deltalake.DeltaTable(...).to_pyarrow_dataset()`: only files that a commit
added are read, so a shard being written, a publish task killed mid-way or a run killed
between its two commits is never seen. Any other Delta reader (polars.read_delta,
ray.data.read_delta, Spark, DuckDB's delta_scan) sees the same; a plain Parquet glob does not.
"""
from __future__ import annotations

from typing import Any

from .schema import IMAGES_SCHEMA, MASKS_SCHEMA
from .table import OutputTables

SCHEMAS = {"masks": MASKS_SCHEMA, "images": IMAGES_SCHEMA}


def _filter_block(table, expression: Any):
    """A pyarrow.dataset expression applied to one block of a Ray Dataset (expressions pickle)."""
    return table.filter(expression)


def open_table(url: str, table: str = "masks", storage_options: dict[str, Any] | None = None,
               version: int | None = None):
    """The DeltaTable `table` of a job's output at `version` (default: the latest). Raises
    FileNotFoundError (one line) when `url` holds no such table."""
    if table not in SCHEMAS:
        raise ValueError(f"table={table!r}: choose one of {sorted(SCHEMAS)}")
    tables = OutputTables(url, storage_options)
    dt = tables.open(table, version)
    if dt is None:
        raise FileNotFoundError(f"{url}: not a jobs.segment output (no Delta table at {tables.uri(table)}); pass "
                                f"the --output URL the job wrote to (outputs of the previous layout are not readable)")
    return dt


def read_output(url: str, table: str = "masks", columns: list[str] | None = None, filter: Any = None,
                storage_options: dict[str, Any] | None = None, ray: bool = False, version: int | None = None):
    """`table` ("masks" or "images") of the output at `url`: a pyarrow Table, or with ray=True a
    Ray Dataset read by the cluster. `filter` is a pyarrow.dataset expression (files' min/max
    stats and row groups let it skip most files for one image_id); `version` reads the table as
    a past commit left it."""
    dt = open_table(url, table, storage_options, version)
    if ray:
        import ray.data
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        from ifcn.io import filesystem

        fs, _ = filesystem(url, storage_options)
        files = [fs._strip_protocol(u) for u in dt.file_uris()]
        schema = SCHEMAS[table]
        if not files:
            return ray.data.from_arrow(schema.empty_table().select(columns or schema.names))
        rds = ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), schema=schema,
                                    partitioning=None)
        if filter is not None:  # before the projection: a filter may use columns that are not returned
            rds = rds.map_batches(_filter_block, fn_kwargs={"expression": filter}, batch_format="pyarrow",
                                  batch_size=None)
        return rds.select_columns(columns) if columns else rds  # (read_parquet's columns= is deprecated)
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter)


__all__ = ["open_table", "read_output"]
