"""Checks a job's output table file by file against its Delta log; --repair drops damaged files.

    ifcn-check --output s3://bucket/out/run1
    ifcn-check --output s3://bucket/out/run1 --repair
    ifcn-check --output s3://bucket/out/run1 --storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

Exit status: 0 clean (or repaired), 1 damaged files found and not repaired, 2 bad input.
"""
from __future__ import annotations

import os
import sys

import pyarrow as pa

from pipeline.config import SegmentError
from pipeline.tables.check import check_output, repair_output
from pipeline.tables.files import delta_storage_options

from ._cli import add_output, interruptible, make_parser, output_of, storage_options


@interruptible("ifcn-check", "a repair is one commit, made whole or not at all; re-run to check")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-check", __doc__)
    add_output(p, "the segment job's --output (holds the segments/ Delta table)")
    p.add_argument("--repair", action="store_true",
                   help="remove every damaged file (one commit, under the output's lease) so the next run "
                        "re-processes those images")
    p.add_argument("--storage-options", type=storage_options,
                   help="JSON dict for fsspec, as jobs.segment takes it (e.g. '{\"endpoint_url\": ...}'); "
                        "the AWS_* environment is used too")
    args = p.parse_args(argv)
    args.output = output_of(p, args)
    options = delta_storage_options(args.output, args.storage_options) or None
    # delta-rs logs retries and region look-ups to stderr (WARN); errors reach the user as one line below
    os.environ.setdefault("RUST_LOG", "error")
    from deltalake.exceptions import DeltaError

    try:
        check = check_output(args.output, options)
        for d in check.damaged:
            ids = f" ({', '.join(d.image_ids[:3])}{', ...' if len(d.image_ids) > 3 else ''})" if d.image_ids else ""
            print(f"{d.path}: {d.reason}{ids}")
        print(f"{check.files} files, {check.images} images at version {check.version}"
              + (f"; {len(check.damaged)} damaged" if check.damaged else "; all match the log, every row whole"))
        if not check.damaged:
            return 0
        if not args.repair:
            print("run again with --repair to remove those files (the next run then re-processes their images)")
            return 1
        removal = repair_output(args.output, check.damaged, args.storage_options)
        print(f"removed {len(removal.paths)} file{'s' * (len(removal.paths) != 1)} (version {removal.version}): "
              f"{', '.join(removal.paths)}")
        print("repaired: the next run re-processes their images; older versions still list the removed files")
        return 0
    except (OSError, ValueError, DeltaError, pa.ArrowException, SegmentError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jobs.check: error: {msg if args.output in msg else f'{args.output}: {msg}'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
