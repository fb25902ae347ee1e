"""The output table's schema: the one place that knows column names, types and meanings.

The README copies `SEGMENTS_COLUMNS`, `PROPOSAL_COLUMNS` and the views' columns; change a column
here and nowhere else (and bump `FORMAT`, since readers downstream depend on it).

Layout under the job's --output URL (pipeline/tables/delta.py writes and commits it):

    segments/                     Delta Lake table: one row per input image (status ok/error/retry)
                                  with its proposals nested (`proposals`: list<struct>); each data
                                  file holds one shard of one run, sorted by image_id
    _runs/<run_id>/listing/       a run's snapshot of its input listing, part-NNNNN.parquet files, each
                                  written before any of its shards runs (pipeline/planning/parts.py)
    _tmp/                         staged fragments; never read; gone when a run ends
    _lease.json                   the live run's lease (pipeline/tables/lease.py)

Why one table with nested proposals (not a masks table beside an images table): Delta has no
multi-table transaction. With two tables, a reader that opens masks, then images, can see an
images row whose masks rows its older masks snapshot lacks, and a kill between two tables'
commits leaves work for the next run to finish. With one table an image is one row: every
commit (a group of shards, a replaced image's old row leaving as its new one lands, a prune,
an overwrite) is one Delta commit, and every reader, at any version, in any order, sees all of
an image's proposals or none of them.

Two views serve people who want flat rows (`pipeline.read_output(url, "masks" | "images")`):
`masks` is one row per proposal (MASKS_SCHEMA: the image's columns repeated beside each
proposal's), `images` is the table without the `proposals` column (Parquet reads no byte of it).
In SQL: `SELECT image_id, p.* FROM segments, UNNEST(proposals) AS t(p)` (DuckDB:
`SELECT image_id, unnest(proposals, recursive := true) FROM ...`); polars:
`df.explode("proposals").unnest("proposals")`.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FORMAT = "instancefcn-segment/3"  # 3: one Delta table, proposals nested (/2: masks + images tables; /1: markers)

# (name, arrow type, doc). Order is the column order in the files.
PROPOSAL_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("rank", pa.int32(), "0 = best proposal of the image, by objectness score after NMS"),
    ("score", pa.float32(), "objectness probability in [0, 1]"),
    ("bbox", pa.list_(pa.float32()), "tight box of the mask in image pixels: x, y, w, h (COCO order; 4 values)"),
    ("area", pa.int64(), "mask area in pixels"),
    ("rle", pa.string(), "COCO compressed RLE counts; decode with "
                         "pycocotools.mask.decode({'size': [height, width], 'counts': rle})"),
    ("scale", pa.int32(), "short side (px) of the inference scale that produced the proposal"),
)
PROPOSAL_TYPE = pa.struct([pa.field(n, t) for n, t, _ in PROPOSAL_COLUMNS])

SEGMENTS_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("image_id", pa.string(), "input's path relative to the input prefix (e.g. 'a/000012.jpg'), "
                              "or its full URI for manifest inputs"),
    ("uri", pa.string(), "full URI of the image file (s3://..., file:///...)"),
    ("width", pa.int32(), "pixels after EXIF orientation (the RLE size's width); null when the image could not "
                          "be decoded"),
    ("height", pa.int32(), "pixels after EXIF orientation (the RLE size's height); null when the image could not "
                           "be decoded"),
    ("status", pa.string(), "'ok', 'error' (the input's fault: final) or 'retry' (storage or machine "
                            "failure that outlived the retries: the next run redoes it)"),
    ("error", pa.string(), "one-line reason when status is 'error' or 'retry' (corrupt, too large, ...), else null"),
    ("num_proposals", pa.int32(), "length of `proposals` (0 for errors)"),
    ("read_ms", pa.float32(), "time to fetch the file's bytes"),
    ("decode_ms", pa.float32(), "time to decode the bytes to RGB"),
    ("infer_ms", pa.float32(), "model time: the image's share of its batch's forward passes at every scale, "
                               "top windows and assembling"),
    ("postprocess_ms", pa.float32(), "paste, binarise, NMS and run lengths (on the actor's device) plus COCO RLE "
                                     "encoding"),
    ("etag", pa.string(), "the input object's version when listed: its ETag on object stores, 'mtime:<ns>' on "
                          "local disks, null for manifest inputs; a re-run redoes an image whose etag or size changed"),
    ("size", pa.int64(), "the input object's size in bytes when listed (null for manifest inputs)"),
    ("shard_id", pa.string(), "the shard of its run that wrote the row (one data file per shard and run)"),
    ("run_id", pa.string(), "the run that wrote the row (jobs.show --output OUT --history lists runs)"),
    ("proposals", pa.list_(PROPOSAL_TYPE), "the image's proposals, best first (rank 0 first); empty for errors"),
)
SEGMENTS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in SEGMENTS_COLUMNS])

# The views (read_output): images = the table without proposals; masks = one row per proposal.
IMAGES_SCHEMA = pa.schema([f for f in SEGMENTS_SCHEMA if f.name != "proposals"])
# one row per proposal: the proposal's columns with the image's it needs beside them (RLE size, ids)
MASKS_COLUMN_ORDER = ("image_id", "uri", "rank", "score", "bbox", "area", "rle", "height", "width", "scale",
                      "shard_id", "run_id")
MASKS_SCHEMA = pa.schema([PROPOSAL_TYPE.field(n) if PROPOSAL_TYPE.get_field_index(n) >= 0
                          else SEGMENTS_SCHEMA.field(n) for n in MASKS_COLUMN_ORDER])
VIEWS = {"segments": SEGMENTS_SCHEMA, "images": IMAGES_SCHEMA, "masks": MASKS_SCHEMA}

# Columns that are facts about the inputs and results (equal across re-runs); the rest are timings.
IMAGES_RESULT_COLUMNS: tuple[str, ...] = ("image_id", "uri", "width", "height", "status", "error", "num_proposals")
TIMING_COLUMNS: tuple[str, ...] = ("read_ms", "decode_ms", "infer_ms", "postprocess_ms")
# Which run and shard wrote a row, and the input's version: bookkeeping, not results.
RUN_COLUMNS: tuple[str, ...] = ("shard_id", "run_id")
VERSION_COLUMNS: tuple[str, ...] = ("etag", "size")

# What the encoding stage hands on, one row per image: the table's columns less what only the
# publish task knows (the listed version and the run).
REDUCED_SCHEMA = pa.schema([f for f in SEGMENTS_SCHEMA if f.name not in ("etag", "size", "run_id")])

SEGMENTS_ROW_GROUP_ROWS = 16  # images per row group (~16k proposals at 1000 each): image_id stats let readers skip groups
PARQUET_COMPRESSION = "zstd"


def columns_markdown() -> str:
    """The table's and the proposals' columns as Markdown (what the README shows)."""
    out = []
    for title, columns in (("segments/ (Delta table, one row per image)", SEGMENTS_COLUMNS),
                           ("each element of `proposals`", PROPOSAL_COLUMNS)):
        out += [f"`{title}`" if "/" not in title else title, "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{n}` | {t} | {doc} |" for n, t, doc in columns] + [""]
    return "\n".join(out)


def proposals_to_rows(proposals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ifcn.postprocess output (best first) -> PROPOSAL_TYPE dicts with their rank."""
    return [{"rank": i, "score": p["score"], "bbox": p["bbox"], "area": p["area"], "rle": p["rle"]["counts"],
             "scale": p["scale"]} for i, p in enumerate(proposals)]


def reduced_to_segments(reduced: pa.Table, run_id: str = "",
                        versions: dict[str, tuple[str | None, int | None]] | None = None) -> pa.Table:
    """REDUCED_SCHEMA rows (one per image) -> SEGMENTS_SCHEMA rows, sorted by image_id (file stats
    then let readers skip files and row groups).

    versions: image_id -> (etag, size) of the listed object (missing: nulls)."""
    reduced = reduced.sort_by("image_id")
    ids = reduced.column("image_id").to_pylist()
    versions = versions or {}
    extra = {"etag": pa.array([versions.get(i, (None, None))[0] for i in ids], pa.string()),
             "size": pa.array([versions.get(i, (None, None))[1] for i in ids], pa.int64()),
             "run_id": pa.array([run_id] * reduced.num_rows, pa.string())}
    table = pa.table({n: extra[n] if n in extra else reduced.column(n) for n in SEGMENTS_SCHEMA.names})
    return table.cast(SEGMENTS_SCHEMA)


def masks_view(segments: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """SEGMENTS_SCHEMA rows (any subset of columns holding `proposals`) -> MASKS_SCHEMA rows, one
    per proposal in image then rank order; vectorised (no Python object per proposal)."""
    names = [n for n in (columns or MASKS_SCHEMA.names)]
    lists = segments.column("proposals").combine_chunks() if segments.num_rows else \
        pa.array([], pa.list_(PROPOSAL_TYPE))
    parent = pc.list_parent_indices(lists)  # (P,) row of each proposal
    flat = pc.list_flatten(lists)  # (P,) structs
    out = {}
    for n in names:
        if n in PROPOSAL_TYPE.names:
            out[n] = flat.field(n)
        else:
            out[n] = segments.column(n).take(parent)
    return pa.table(out, schema=pa.schema([MASKS_SCHEMA.field(n) for n in names]))
