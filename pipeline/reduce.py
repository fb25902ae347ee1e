"""Encoding stage (CPU tasks): compact proposals -> COCO compressed RLE strings -> table rows.

The inference actors ship per proposal its score, box, area, scale and uncompressed run
lengths; compressing the runs (pycocotools) and building rows is CPU work that runs here,
after the actor pool, so a GPU actor never waits on it. Output rows follow
`schema.REDUCED_SCHEMA`: one row per image with its proposals as a list, which the driver
explodes into the masks table when it commits the image's shard.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from ifcn import encode
from ifcn.image import one_line

from .infer import InferenceActor, unpack_proposals
from .schema import REDUCED_SCHEMA, proposals_to_rows


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


class InferAndEncodeActor(InferenceActor):
    """Inference and encoding in one actor, for CPU-only clusters (`--postprocess actor`, the default there).

    With no GPU to keep busy, a separate encoding stage only leaves the actor's core idle while
    tasks queue; one actor per core doing everything uses every core.
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_batch(super().__call__(batch))
