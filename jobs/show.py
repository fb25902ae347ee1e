"""Draws one image's best proposals from a pipeline output as a PNG, or lists the output's runs.

    python -m jobs.show --output s3://bucket/out/run1 --image a/000012.jpg --out file:///tmp/000012.png --top 20
    python -m jobs.show s3://bucket/out/run1 --history
"""
from __future__ import annotations

import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ifcn.tools.viz import draw_proposals, save_png
from ifcn.image import ImageError, decode_image, read_bytes  # decode exactly as the pipeline did (EXIF, alpha)
from pipeline import read_output

from ._cli import add_output, interruptible, make_parser, output_of, storage_options

MASK_COLUMNS = ["image_id", "uri", "rank", "score", "bbox", "rle", "height", "width"]
SHOWN_IDS = 5  # valid ids listed when an id is unknown


def _table(output: str, table: str, columns: list[str], image_id: str | None, storage_options: dict | None):
    """Rows of one image (or, with image_id None, just the columns) of an output's committed shards
    (files skipped by their image_id statistics: one image reads one file)."""
    return read_output(output, table, columns, storage_options=storage_options,
                       image_ids=None if image_id is None else [image_id])


def load_proposals(output: str, image_id: str, storage_options: dict | None = None) -> tuple[str, list[dict]]:
    """(uri, proposals best first as {rle, bbox, score, rank}) of one image of a pipeline output.

    Raises LookupError naming a few valid ids when the output has no such image, and ValueError when
    the pipeline recorded the image as an error.
    """
    images = _table(output, "images", ["image_id", "uri", "status", "error"], image_id, storage_options)
    masks = _table(output, "masks", MASK_COLUMNS, image_id, storage_options)
    if images.num_rows:
        row = images.slice(0, 1).to_pylist()[0]
        if row["status"] != "ok":
            raise ValueError(f"image {image_id!r} was not segmented: {row['error'] or row['status']}")
        uri = row["uri"]
    elif masks.num_rows:
        uri = masks.column("uri")[0].as_py()
    else:
        raise LookupError(f"image {image_id!r} is not in {output}; valid ids include "
                          f"{valid_ids(output, storage_options)}")
    proposals = []
    if masks.num_rows:
        masks = masks.sort_by("rank")
        for r in masks.to_pylist():
            proposals.append({"rank": r["rank"], "score": r["score"], "bbox": r["bbox"],
                              "rle": {"size": [r["height"], r["width"]], "counts": r["rle"]}})
    return uri, proposals


def valid_ids(output: str, storage_options: dict | None = None, n: int = SHOWN_IDS) -> list[str]:
    """A few image ids that the output does hold (from images/, else masks/)."""
    for table in ("images", "masks"):
        t = _table(output, table, ["image_id"], None, storage_options)
        if t.num_rows:
            return sorted(pc.unique(t.column("image_id")).to_pylist())[:n]
    return []


def history_lines(output: str, storage_options: dict | None = None) -> list[str]:
    """One line per run of the output, oldest first, from the tables' commit metadata."""
    from pipeline.tables.output import open_table
    from pipeline.tables.delta import OutputTables

    open_table(output, "images", storage_options)  # a one-line error when there is no output
    lines = []
    for r in OutputTables(output, storage_options).runs():
        c = r.get("counts", {})
        state = "complete" if r.get("complete") else ("interrupted" if r.get("exit") == "running" else "incomplete")
        lines.append(f"{r['run_id']}  {r.get('started_at', '?')}  {state}: {r.get('exit')}; "
                     f"{c.get('num_images', 0)} images ({c.get('num_ok', 0)} ok, {c.get('num_error', 0)} error, "
                     f"{c.get('num_retry', 0)} retry), {c.get('num_proposals', 0)} proposals, {c.get('shards', 0)} "
                     f"shards; checkpoint {str(r.get('checkpoint_sha256', ''))[:12]}"
                     + (f"; continued {r['resumes']}" if r.get("resumes") else ""))
    return lines


def show(output: str, image_id: str, out: str, top: int = 20, storage_options: dict | None = None) -> dict[str, Any]:
    """Reads one image's proposals and pixels, draws the `top` best, writes a PNG to `out`."""
    uri, proposals = load_proposals(output, image_id, storage_options)
    pixels = decode_image(read_bytes(uri, storage_options), uri)
    if proposals and tuple(proposals[0]["rle"]["size"]) != pixels.shape[:2]:
        raise ValueError(f"{uri}: decoded size {pixels.shape[:2]} != the masks' size "
                         f"{tuple(proposals[0]['rle']['size'])} (was the file replaced after the run?)")
    save_png(draw_proposals(pixels, proposals, top=top), out, storage_options)
    return {"image_id": image_id, "uri": uri, "num_proposals": len(proposals),
            "drawn": min(top, len(proposals)), "out": out}


@interruptible("ifcn-show", "pictures already written are kept; re-run the same command")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-show", __doc__)
    add_output(p, "the segment job's --output folder (holding the segments/ table)")
    p.add_argument("--history", action="store_true", help="list the output's runs, one line each, and exit")
    p.add_argument("--image", help="image_id as in the tables (e.g. a/000012.jpg)")
    p.add_argument("--out", help="PNG to write (any fsspec URL)")
    p.add_argument("--top", type=int, default=20, help="how many of the best proposals to draw")
    p.add_argument("--storage-options", type=storage_options, help="JSON dict for fsspec, e.g. '{\"anon\": true}'")
    args = p.parse_args(argv)
    output = output_of(p, args)
    if args.top < 0:
        p.error("--top must be >= 0")
    if not args.history and not (args.image and args.out):
        p.error("--image and --out are required (or pass --history)")
    try:
        if args.history:
            print("\n".join(history_lines(output, args.storage_options)))
            return 0
        info = show(output, args.image, args.out, args.top, args.storage_options)
    except (OSError, ValueError, LookupError, pa.ArrowException, ImageError) as e:
        msg = e.args[0] if isinstance(e, LookupError) and e.args else e  # KeyError's str() adds quotes
        print(f"jobs.show: error: {msg}", file=sys.stderr)
        return 2
    print(f"drew {info['drawn']} of {info['num_proposals']} proposals of {info['image_id']} ({info['uri']}) "
          f"to {info['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
