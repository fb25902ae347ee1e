"""Writes one self-contained HTML report of a segment job's output: runs, inputs and errors,
proposal statistics, throughput, a gallery of sampled images, and AR with --annotations.

    ifcn-report --output s3://bucket/out/ [--html s3://bucket/out/report.html] [--annotations coco.json]

The page needs no server and no network (CSS, plots and thumbnails inline): open it from the
bucket or copy it to a laptop.
"""
from __future__ import annotations

import sys

import pyarrow as pa

from ifcn.image import one_line

from pipeline.report.build import ReportConfig, describe, write_report

from ._cli import add_output, interruptible, make_parser, output_of, storage_options


@interruptible("ifcn-report", "no page was written; re-run the same command")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-report", __doc__)
    add_output(p, "the segment job's --output URL (holding the segments/ table)")
    p.add_argument("--html", help="where to write the page (any fsspec URL; default OUTPUT/report.html)")
    p.add_argument("--annotations", help="COCO annotations JSON of the inputs: adds AR@10/100/1000 and recall vs IoU")
    p.add_argument("--samples", type=int, default=ReportConfig.samples, help="images in the gallery")
    p.add_argument("--top", type=int, default=ReportConfig.top, help="proposals drawn per gallery image")
    p.add_argument("--storage-options", type=storage_options, help="JSON dict for fsspec, e.g. '{\"anon\": true}'")
    args = p.parse_args(argv)
    args.output = output_of(p, args)
    if args.samples < 0 or args.top < 0:
        p.error("--samples and --top must be >= 0")
    try:
        summary = write_report(args.output, args.html, args.storage_options, args.annotations,
                               ReportConfig(samples=args.samples, top=args.top))
    except (OSError, ValueError, LookupError, pa.ArrowException) as e:  # one line: read in logs
        print(f"jobs.report: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
