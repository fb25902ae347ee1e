"""Reducer stage (CPU tasks): candidates -> proposals with `ifcn.postprocess` -> table rows.

Paste, binarise, mask NMS and RLE encoding are the CPU half of inference; running them here,
after the actor pool, keeps the GPU actors busy with forward passes only. Output rows follow
`schema.REDUCED_SCHEMA`: one row per image with its proposals as a list, which the driver
explodes into the masks table when it commits the image's shard.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from ifcn import InferenceConfig, postprocess
from ifcn.image import one_line

from .infer import InferenceActor, unpack_candidates
from .schema import REDUCED_SCHEMA, proposals_to_rows


def reduce_batch(batch: pa.Table, inference: dict[str, Any]) -> pa.Table:
    """Inference-stage rows (with `candidates` npz bytes) -> REDUCED_SCHEMA rows."""
    config = InferenceConfig.from_dict(inference)
    rows = []
    for row in batch.to_pylist():
        proposals: list[dict[str, Any]] = []
        ms = None
        if row["status"] == "ok":
            t0 = time.perf_counter()
            try:
                proposals = proposals_to_rows(postprocess(unpack_candidates(row["candidates"]), config))
            except Exception as e:  # a bad image must become an error row, not a failed task
                row["status"] = "error"
                row["error"] = f"image {row['uri']}: postprocessing failed ({type(e).__name__}: {one_line(e)})"
                proposals = []
            ms = (time.perf_counter() - t0) * 1e3
        row.update(proposals=proposals, num_proposals=len(proposals), postprocess_ms=ms)
        rows.append({name: row.get(name) for name in REDUCED_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=REDUCED_SCHEMA)


class InferAndReduceActor(InferenceActor):
    """Both halves in one actor, for CPU-only clusters (`--postprocess actor`, the default there).

    With no GPU to keep busy, a separate reducer stage only leaves the actor's core idle while
    reducers queue; one actor per core running the whole `predict()` uses every core.
    """

    def __init__(self, checkpoint: str, inference: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 amp: str = "none", torch_threads: int | None = None) -> None:
        super().__init__(checkpoint, inference, storage_options, amp, torch_threads)
        self.inference = inference

    def __call__(self, batch: pa.Table) -> pa.Table:
        return reduce_batch(super().__call__(batch), self.inference)
