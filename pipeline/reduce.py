"""Encoding stage (CPU tasks): compact proposals -> COCO compressed RLE strings -> staged fragments.

The inference actors ship per proposal its score, box, area, scale and uncompressed run
lengths; compressing the runs (pycocotools) and building rows is CPU work that runs here,
after the actor pool, so a GPU actor never waits on it. Output rows follow
`schema.REDUCED_SCHEMA`: one row per image with its proposals as a list. The same task then
writes them to staging (`sink.StageWriter`) and passes on only the fragments' paths and image
ids; a publish task explodes them into the masks table when the image's shard is complete.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from ifcn import encode
from ifcn.image import one_line

from .infer import InferenceActor, unpack_proposals
from .schema import REDUCED_SCHEMA, proposals_to_rows
from .sink import StageWriter


def encode_batch(batch: pa.Table) -> pa.Table:
    """Inference-stage rows (with `proposals` npz bytes) -> REDUCED_SCHEMA rows."""
    rows = []
    for row in batch.to_pylist():
        proposals: list[dict[str, Any]] = []
        if row["status"] == "ok":
            t0 = time.perf_counter()
            try:
                proposals = proposals_to_rows(encode(unpack_proposals(row["proposals"])))
            except Exception as e:  # a bad image must become an error row, not a failed task
                row["status"] = "error"
                row["error"] = f"image {row['uri']}: encoding its masks failed ({type(e).__name__}: {one_line(e)})"
                proposals = []
            row["postprocess_ms"] = (row["postprocess_ms"] or 0.0) + (time.perf_counter() - t0) * 1e3
        row.update(proposals=proposals, num_proposals=len(proposals))
        rows.append({name: row.get(name) for name in REDUCED_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=REDUCED_SCHEMA)


def encode_and_stage(batch: pa.Table, output: str, storage_options: dict[str, Any] | None, run_id: str) -> pa.Table:
    """The stage after GPU actors (CPU tasks): encode, write fragments, return FRAGMENT_SCHEMA rows."""
    return StageWriter(output, storage_options, run_id)(encode_batch(batch))


class InferAndEncodeActor(InferenceActor):
    """Inference and encoding in one actor, for CPU-only clusters (`--postprocess actor`, the default there).

    With no GPU to keep busy, a separate encoding stage only leaves the actor's core idle while
    tasks queue; one actor per core doing everything uses every core.
    """

    def __init__(self, *args: Any, stage: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = StageWriter(**stage)  # {"output", "storage_options", "run_id"}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(encode_batch(super().__call__(batch)))
