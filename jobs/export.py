"""Writes a segment job's proposals as a COCO results JSON (what pycocotools' COCO.loadRes and
COCOeval read, class-agnostic: category_id 1, segmentation as compressed RLE).

    ifcn-export --output s3://bucket/out/ --annotations coco.json --json results.json
    ifcn-export --output s3://bucket/out/ --json results.json      # + results.images.json (ids -> file names)

With --annotations, image ids are the annotations' ids (matched by file_name, as jobs.evaluate
matches them). Without, images get ids 1..N in image_id order, and a COCO images list
(id, file_name, height, width) is written beside the results so any tool can map them back.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from ._cli import add_output, interruptible, make_parser, output_of, storage_options


def images_index(table: Any) -> dict[str, Any]:
    """A COCO dataset skeleton ({images, categories, annotations: []}) of the table's images, ids 1..N
    in image_id order: what results are matched against when no annotations are given."""
    seen: dict[str, tuple[int, int]] = {}
    for image_id, h, w in zip(*(table.column(c).to_pylist() for c in ("image_id", "height", "width"))):
        seen.setdefault(image_id, (h, w))
    images = [{"id": i, "file_name": name, "height": h, "width": w}
              for i, (name, (h, w)) in enumerate(sorted(seen.items()), start=1)]
    return {"images": images, "categories": [{"id": 1, "name": "object"}], "annotations": []}


def export(output: str, json_url: str, annotations: str | None = None, max_proposals: int | None = None,
           options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reads the masks view (one row per proposal) and writes COCO results; returns counts for the log line."""
    import pyarrow.dataset as ds

    from ifcn.evaluation.recall import RESULT_COLUMNS, load_gt, results_from_masks
    from ifcn.io import write_bytes
    from pipeline.tables.output import read_output

    filter = None if max_proposals is None else ds.field("rank") < max_proposals
    table = read_output(output, "masks", list(RESULT_COLUMNS), filter=filter, storage_options=options)
    index_url = None
    if annotations:
        gt = load_gt(annotations, options)
    else:
        gt = images_index(table)
        index_url = json_url.removesuffix(".json") + ".images.json"
        write_bytes(index_url, json.dumps(gt).encode(), options)
    results = results_from_masks(table, gt)
    write_bytes(json_url, json.dumps(results).encode(), options)
    return {"results": len(results), "images": len({r["image_id"] for r in results}), "json": json_url,
            "images_json": index_url}


@interruptible("ifcn-export", "re-run the same command to write the file again")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-export", __doc__)
    add_output(p, "the segment job's --output folder (holding the segments/ table)")
    p.add_argument("--json", required=True, help="where to write the COCO results JSON (any fsspec URL)")
    p.add_argument("--annotations", help="COCO annotations JSON whose image ids the results use")
    p.add_argument("--max-proposals", type=int, help="keep each image's best N proposals (default: all kept)")
    p.add_argument("--storage-options", type=storage_options, help="JSON dict for fsspec, e.g. '{\"anon\": true}'")
    args = p.parse_args(argv)
    output = output_of(p, args)
    if args.max_proposals is not None and args.max_proposals < 1:
        p.error(f"--max-proposals {args.max_proposals}: must be >= 1")
    import pyarrow as pa

    from ifcn.image import one_line

    try:
        s = export(output, args.json, args.annotations, args.max_proposals, args.storage_options)
    except (OSError, ValueError, LookupError, pa.ArrowException) as e:
        print(f"{p.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {s['results']} results of {s['images']} images to {s['json']}"
          + (f" (image ids: {s['images_json']})" if s["images_json"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
