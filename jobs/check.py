"""Checks a job's output tables file by file against their Delta log; --repair drops damaged shards.

    python -m jobs.check s3://bucket/out/run1
    python -m jobs.check s3://bucket/out/run1 --repair
    python -m jobs.check s3://bucket/out/run1 --storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

Exit status: 0 clean (or repaired), 1 damaged files found and not repaired, 2 bad input.
"""
from __future__ import annotations

import os
import sys

import pyarrow as pa

from jobs._cli import Parser, storage_options
from pipeline.check import check_output, repair_output
from pipeline.table import delta_storage_options


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="jobs.check", description=__doc__.split("\n")[0])
    p.add_argument("output", help="the job's --output (holds masks/ and images/ Delta tables)")
    p.add_argument("--repair", action="store_true",
                   help="remove every file of each damaged file's shard (one commit per table, images first) "
                        "so the next run re-processes those images")
    p.add_argument("--storage-options", type=storage_options,
                   help="JSON dict for fsspec, as jobs.segment takes it (e.g. '{\"endpoint_url\": ...}'); "
                        "the AWS_* environment is used too")
    args = p.parse_args(argv)
    options = delta_storage_options(args.output, args.storage_options) or None
    # delta-rs logs retries and region look-ups to stderr (WARN); errors reach the user as one line below
    os.environ.setdefault("RUST_LOG", "error")
    from deltalake.exceptions import DeltaError

    try:
        checks = check_output(args.output, options)
        damaged = [d for c in checks for d in c.damaged]
        for d in damaged:
            print(f"{d.table} {d.path}: {d.reason} (shard {d.shard_id or 'unknown'})")
        shards = sorted({d.shard_id for d in damaged if d.shard_id is not None})
        print(", ".join(f"{c.table}: {c.files} files at version {c.version}" for c in checks)
              + (f"; {len(damaged)} damaged, in shards {', '.join(shards) or '(unknown)'}" if damaged
                 else "; all match the log"))
        if not damaged:
            return 0
        if not args.repair:
            print("run again with --repair to remove those shards' rows (the next run then re-processes them)")
            return 1
        for r in repair_output(args.output, damaged, options):
            print(f"removed {len(r.paths)} file{'s' * (len(r.paths) != 1)} from {r.table} (version {r.version}): "
                  f"{', '.join(r.paths)}")
        print(f"repaired: the next run re-processes shards {', '.join(shards) or '(none)'}; "
              f"older versions still list the removed files")
        return 0
    except (OSError, ValueError, DeltaError, pa.ArrowException) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jobs.check: error: {msg if args.output in msg else f'{args.output}: {msg}'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
