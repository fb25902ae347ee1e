"""Encoding stage (CPU tasks): the actors' proposal columns -> COCO compressed RLE strings -> staged fragments.

The inference actors ship per proposal its score, box, area, scale and uncompressed run lengths
as Arrow columns (pipeline/stages/handoff.py); compressing the runs and building the rows is CPU work
that runs here, after the actor pool, so a GPU actor never waits on it. Output rows follow
`schema.REDUCED_SCHEMA`: one row per image with its proposals as a list. The same task then
writes them to staging (`sink.StageWriter`) and passes on only the fragments' paths and image
ids; a publish task writes the shard's data file when it is complete. Imports no torch (an
encoding worker starts in a fraction of a second): tests/test_stage_imports.py.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifcn.image import one_line

from pipeline.tables.schema import PROPOSAL_TYPE, REDUCED_SCHEMA

from .handoff import encode_column
from .sink import StageWriter


def encode_batch(batch: pa.Table) -> pa.Table:
    """Inference-stage rows (`proposals`: handoff.HANDOFF_TYPE) -> REDUCED_SCHEMA rows; the batch's
    proposals in one vectorised pass (image by image only if that fails, so a bad image becomes an
    error row instead of a failed task)."""
    t0 = time.perf_counter()
    status = batch.column("status").to_pylist()
    error = batch.column("error").to_pylist()
    sizes = _sizes(batch)
    try:
        proposals = encode_column(batch.column("proposals"), *sizes)
    except Exception:
        proposals = _encode_one_by_one(batch, sizes, status, error)
    ok = np.array([s == "ok" for s in status])
    encode_ms = (time.perf_counter() - t0) * 1e3 / max(1, int(ok.sum()))
    post = batch.column("postprocess_ms").to_numpy(zero_copy_only=False).astype(np.float64)  # NaN for nulls
    post = np.where(ok, np.nan_to_num(post) + encode_ms, post)
    columns = {"proposals": proposals, "num_proposals": pc.list_value_length(proposals).cast(pa.int32()),
               "status": pa.array(status, pa.string()), "error": pa.array(error, pa.string()),
               "postprocess_ms": pa.array(post, pa.float32(), from_pandas=True)}
    return pa.table({n: columns[n] if n in columns else batch.column(n) for n in REDUCED_SCHEMA.names},
                    schema=REDUCED_SCHEMA)


def _sizes(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(B,) heights and (B,) widths of the rows' images (0 where the read stage found none)."""
    h, w = (pc.fill_null(batch.column(c), 0).to_numpy().astype(np.int64) for c in ("height", "width"))
    return h, w


def _encode_one_by_one(batch: pa.Table, sizes: tuple[np.ndarray, np.ndarray], status: list[str],
                       error: list[str | None]) -> pa.Array:
    """Each image's proposals encoded alone; an image that fails becomes an error row without proposals."""
    column = batch.column("proposals").combine_chunks()
    parts = []
    for i in range(batch.num_rows):
        try:
            parts.append(encode_column(column[i:i + 1], sizes[0][i:i + 1], sizes[1][i:i + 1]))
        except Exception as e:
            status[i] = "error"
            error[i] = f"image {batch.column('uri')[i].as_py()}: encoding its masks failed " \
                       f"({type(e).__name__}: {one_line(e)})"
            parts.append(pa.array([[]], pa.list_(PROPOSAL_TYPE)))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.list_(PROPOSAL_TYPE))


def encode_and_stage(batch: pa.Table, output: str, storage_options: dict[str, Any] | None, run_id: str) -> pa.Table:
    """The stage after GPU actors (CPU tasks): encode, write fragments, return FRAGMENT_SCHEMA rows."""
    return StageWriter(output, storage_options, run_id)(encode_batch(batch))
