"""The output tables' schemas: the one place that knows column names, types and meanings.

The README copies `MASKS_COLUMNS` and `IMAGES_COLUMNS`; change a column here and nowhere else
(and bump `FORMAT`, since readers downstream depend on it).

Layout under the job's --output URL (pipeline/table.py writes and commits it):

    masks/                        Delta Lake table: one row per proposal; each data file holds one
                                  shard of one run, sorted by (image_id, rank)
    images/                       Delta Lake table: one row per input image (status ok/error/retry)
    _runs/<run_id>/listing.parquet  a run's snapshot of its input listing (written before any work)
    _tmp/                         staged fragments; never read; gone when a run ends
    _lease.json                   the live run's lease (pipeline/lease.py)

Read them with any Delta reader (deltalake, polars.read_delta, ray.data.read_delta, Spark,
DuckDB's delta_scan): a plain Parquet glob also sees files that no commit added.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FORMAT = "instancefcn-segment/2"  # 2: Delta tables (the /1 layout is not readable)

# (name, arrow type, doc). Order is the column order in the files.
MASKS_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("image_id", pa.string(), "input's path relative to the input prefix (e.g. 'a/000012.jpg'), "
                              "or its full URI for manifest inputs"),
    ("uri", pa.string(), "full URI of the image file (s3://..., file:///...)"),
    ("rank", pa.int32(), "0 = best proposal of the image, by objectness score after NMS"),
    ("score", pa.float32(), "objectness probability in [0, 1]"),
    ("bbox", pa.list_(pa.float32()), "tight box of the mask in image pixels: x, y, w, h (COCO order; 4 values)"),
    ("area", pa.int64(), "mask area in pixels"),
    ("rle", pa.string(), "COCO compressed RLE counts; decode with "
                         "pycocotools.mask.decode({'size': [height, width], 'counts': rle})"),
    ("height", pa.int32(), "RLE size: image height in pixels (after EXIF orientation)"),
    ("width", pa.int32(), "RLE size: image width in pixels (after EXIF orientation)"),
    ("scale", pa.int32(), "short side (px) of the inference scale that produced the proposal"),
    ("shard_id", pa.string(), "the shard of its run that wrote the row (one data file per shard and run)"),
    ("run_id", pa.string(), "the run that wrote the row (jobs.show OUT --history lists runs)"),
)

IMAGES_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("image_id", pa.string(), "as in masks"),
    ("uri", pa.string(), "as in masks"),
    ("width", pa.int32(), "pixels after EXIF orientation; null when the image could not be decoded"),
    ("height", pa.int32(), "pixels after EXIF orientation; null when the image could not be decoded"),
    ("status", pa.string(), "'ok', 'error' (the input's fault: final) or 'retry' (storage or machine "
                            "failure that outlived the retries: the next run redoes it)"),
    ("error", pa.string(), "one-line reason when status is 'error' or 'retry' (corrupt, too large, ...), else null"),
    ("num_proposals", pa.int32(), "rows of this image in masks (0 for errors)"),
    ("read_ms", pa.float32(), "time to fetch the file's bytes"),
    ("decode_ms", pa.float32(), "time to decode the bytes to RGB"),
    ("infer_ms", pa.float32(), "model time: the image's share of its batch's forward passes at every scale, "
                               "top windows and assembling"),
    ("postprocess_ms", pa.float32(), "paste, binarise, NMS and run lengths (on the actor's device) plus COCO RLE "
                                     "encoding"),
    ("etag", pa.string(), "the input object's version when listed: its ETag on object stores, 'mtime:<ns>' on "
                          "local disks, null for manifest inputs; a re-run redoes an image whose etag or size changed"),
    ("size", pa.int64(), "the input object's size in bytes when listed (null for manifest inputs)"),
    ("shard_id", pa.string(), "as in masks"),
    ("run_id", pa.string(), "as in masks"),
)

MASKS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in MASKS_COLUMNS])
IMAGES_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in IMAGES_COLUMNS])

# Columns that are facts about the inputs and results (equal across re-runs); the rest are timings.
IMAGES_RESULT_COLUMNS: tuple[str, ...] = ("image_id", "uri", "width", "height", "status", "error", "num_proposals")
TIMING_COLUMNS: tuple[str, ...] = ("read_ms", "decode_ms", "infer_ms", "postprocess_ms")
# Which run and shard wrote a row, and the input's version: bookkeeping, not results.
RUN_COLUMNS: tuple[str, ...] = ("shard_id", "run_id")
VERSION_COLUMNS: tuple[str, ...] = ("etag", "size")

# Proposals of one image as they travel from encoding tasks to the driver: one list per image,
# exploded into masks rows at commit time (so a shard's images and masks commit together).
PROPOSAL_TYPE = pa.struct([pa.field(n, t) for n, t, _ in MASKS_COLUMNS
                           if n not in ("image_id", "uri", "height", "width")])
REDUCED_SCHEMA = pa.schema([*(f for f in IMAGES_SCHEMA if f.name not in ("etag", "size", "run_id")),
                            pa.field("proposals", pa.list_(PROPOSAL_TYPE))])

MASKS_ROW_GROUP_ROWS = 16_384  # ~16 images at 1000 proposals: image_id min/max stats let readers skip groups
PARQUET_COMPRESSION = "zstd"


def columns_markdown() -> str:
    """Both tables' columns as Markdown (what the README shows)."""
    out = []
    for title, columns in (("masks", MASKS_COLUMNS), ("images", IMAGES_COLUMNS)):
        out += [f"`{title}/` (Delta table)", "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{n}` | {t} | {doc} |" for n, t, doc in columns] + [""]
    return "\n".join(out)


def proposals_to_rows(proposals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ifcn.postprocess output (best first) -> PROPOSAL_TYPE dicts with their rank."""
    return [{"rank": i, "score": p["score"], "bbox": p["bbox"], "area": p["area"], "rle": p["rle"]["counts"],
             "scale": p["scale"]} for i, p in enumerate(proposals)]


def reduced_to_tables(reduced: pa.Table, run_id: str = "",
                      versions: dict[str, tuple[str | None, int | None]] | None = None) -> tuple[pa.Table, pa.Table]:
    """REDUCED_SCHEMA rows (one per image) -> (images, masks) tables, sorted for pruning.

    versions: image_id -> (etag, size) of the listed object (missing: nulls)."""
    reduced = reduced.sort_by("image_id")
    ids = reduced.column("image_id").to_pylist()
    versions = versions or {}
    run = pa.array([run_id] * reduced.num_rows, pa.string())
    extra = {"etag": pa.array([versions.get(i, (None, None))[0] for i in ids], pa.string()),
             "size": pa.array([versions.get(i, (None, None))[1] for i in ids], pa.int64()), "run_id": run}
    images = pa.table({n: extra[n] if n in extra else reduced.column(n) for n in IMAGES_SCHEMA.names})
    images = images.cast(IMAGES_SCHEMA)
    counts = reduced.column("proposals").combine_chunks()
    lengths = pc.list_value_length(counts).fill_null(0).to_numpy(zero_copy_only=False)
    parent = pc.list_parent_indices(counts)  # (P,) row of each proposal
    flat = pc.list_flatten(counts)  # (P,) structs, in image then rank order
    take = lambda name: reduced.column(name).take(parent)  # noqa: E731
    columns = {"image_id": take("image_id"), "uri": take("uri"),
               **{f.name: flat.field(f.name) for f in PROPOSAL_TYPE},
               "height": take("height"), "width": take("width"), "shard_id": take("shard_id"),
               "run_id": run.take(parent)}
    masks = pa.table({n: columns[n] for n in MASKS_SCHEMA.names}).cast(MASKS_SCHEMA)
    assert int(lengths.sum()) == masks.num_rows
    return images, masks
