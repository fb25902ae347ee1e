"""Segments every image of a prefix or manifest into InstanceFCN proposals (Delta Lake tables), on Ray.

    ifcn-segment --input s3://bucket/images/ --output s3://bucket/out/ --checkpoint s3://bucket/ifcn.pt
    ray job submit --working-dir . -- python -m jobs.segment --input ... --output ... --checkpoint ...

Re-running the same command resumes, and over a bucket that changed processes only what changed:
new keys, objects whose ETag/size changed, and 'retry' rows. Only flags you set are
forwarded; everything else keeps the library defaults (ifcn.InferenceConfig, SegmentConfig).
"""
from __future__ import annotations

import argparse
import sys

from dataclasses import MISSING, fields

from ifcn.config import NMS_MODES, InferenceConfig
from ._cli import (RESUME, in_flags, interruptible, make_parser, scales, show_defaults, storage_options,
                       trained_scales, warn_scales)
from pipeline.config import SegmentConfig


def parser() -> argparse.ArgumentParser:
    p = make_parser("ifcn-segment", __doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--input", required=True, help="prefix URL/path listed recursively for images, "
                   "a manifest: .txt (one URI per line) or .parquet (a `uri` column), or an S3 Inventory "
                   "manifest.json (its CSV, ORC or Parquet files: key, size, ETag)")
    p.add_argument("--output", required=True, help="folder URL for the Delta table segments/ (one row per image, proposals nested)")
    p.add_argument("--checkpoint", required=True, help="InstanceFCN checkpoint URL (ifcn.save_checkpoint)")
    p.add_argument("--storage-options", type=storage_options, help="fsspec options as JSON (AWS_* env also works)")
    p.add_argument("--scales", type=scales, help="inference short sides in px, comma-separated; a checkpoint works best "
                   "at the scales it was trained at (a warning says when these differ); the paper's six")
    p.add_argument("--max-proposals", type=int, help="proposals kept per image after NMS")
    p.add_argument("--windows-per-scale", type=int, help="top windows by objectness assembled per scale")
    p.add_argument("--nms", choices=NMS_MODES, help="NMS by IoU of the masks' tight boxes (default, the "
                   "paper's) or of the masks (stricter)")
    p.add_argument("--nms-iou", type=float, help="IoU above which a lower-scored proposal is dropped (default 0.8)")
    p.add_argument("--pad-to", type=int, help="pad resized images to multiples of this many px so differently "
                   "sized images share a forward (default 0: batch only equal sizes)")
    p.add_argument("--shard-size", type=int, help="images per data file (resume granularity)")
    p.add_argument("--commit-shards", type=int, help="finished shards per table commit at most (default 256; a "
                   "group also commits after 2 s)")
    p.add_argument("--listing-part", type=int, help="images per listing part: an S3 prefix is snapshotted and "
                   "its shards start part by part while it is still listed (default 100000)")
    p.add_argument("--actors", type=int, help="inference actors (default: one per GPU; without GPUs one per CPU)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 with GPUs, else 0 = CPU)")
    p.add_argument("--batch-size", type=int, help="images per inference actor call (default 16 on GPU, 4 on CPU)")
    p.add_argument("--postprocess", choices=("auto", "tasks", "actor"),
                   help="where masks' run lengths become COCO RLE strings: CPU tasks (GPU default) or the "
                   "actors (CPU-only default); paste and NMS always run in the actors, on their device")
    p.add_argument("--compile", action="store_true", help="torch.compile the model on GPU actors (~1 min warm-up)")
    p.add_argument("--max-pixels", type=int, help="images with more pixels become error rows")
    p.add_argument("--max-error-rate", type=float, help="exit non-zero when more than this share of images "
                   "end as error rows (default 0.1; the tables are kept)")
    p.add_argument("--prune", action="store_true", help="delete the rows of images whose keys are no longer "
                   "in the input (default: keep them)")
    p.add_argument("--overwrite", action="store_true", help="on an output made with other settings (checkpoint, "
                   "scales, NMS, ...): replace its rows in a new table version instead of refusing")
    p.add_argument("--dry-run", action="store_true", help="print the plan (images done, new, changed, vanished, "
                   "to retry, shards to run, skipped keys) and exit: nothing is written, no workers start")
    p.add_argument("--amp", choices=("auto", "bf16", "none"), help="bf16 autocast on CUDA (default auto = bf16 on "
                   "CUDA; CPU always runs fp32)")
    show_defaults(p, LIBRARY_DEFAULTS)
    return p


# What an unset flag means: the library's defaults (only flags a user sets are forwarded).
LIBRARY_DEFAULTS = {f.name: f.default for cls in (SegmentConfig, InferenceConfig) for f in fields(cls)
                    if f.default is not MISSING and f.default is not None}
FIELDS = [f.name for cls in (SegmentConfig, InferenceConfig) for f in fields(cls)]


@interruptible("ifcn-segment", RESUME)
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = vars(p.parse_args(argv))
    try:  # flag values the library refuses: one line naming the flag, exit 2, before Ray or torch start
        InferenceConfig(**{k: v for k, v in args.items() if k in InferenceConfig.__dataclass_fields__})
    except ValueError as e:
        p.error(in_flags(str(e), FIELDS))
    # Imported after parsing so --help and flag errors are instant (no torch/ray import).
    import ray.exceptions
    from deltalake.exceptions import DeltaError

    from ifcn.image import one_line
    from pipeline.config import IncompleteRunError, SegmentError
    from pipeline.planning.plan import describe_plan, make_plan
    from pipeline.run import run_segment

    dry_run = args.pop("dry_run", False)
    try:
        config = SegmentConfig.from_options(**args)
        warn_scales(config.inference.scales, trained_scales(config.checkpoint, config.storage_options))
        if dry_run:
            print(describe_plan(make_plan(config), config))
            return 0
        summary = run_segment(config)
    except IncompleteRunError as e:  # mid-run: what was committed stays committed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SegmentError as e:
        print(f"error: {in_flags(str(e), FIELDS)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, DeltaError, ray.exceptions.RayError) as e:
        # Mid-run failures (storage, Ray, table commits): committed rows stay, so re-running resumes.
        # Ray wraps a worker's error in its traceback: the last line is the error itself.
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        reason = lines[-1][:300] if isinstance(e, ray.exceptions.RayError) and lines else one_line(e)
        print(f"error: {type(e).__name__}: {reason}; committed rows are kept, re-run the same command "
              f"to resume", file=sys.stderr)
        return 1
    s = summary
    print(f"done: {s['images_ok']} images ok, {s['images_error']} errors, {s['proposals']} proposals; "
          f"{s['images_this_run']} images this run ({s['new']} new, {s['changed']} changed, {s['to_retry']} retried) "
          f"in {s['wall_s']:.1f} s ({s['images_per_s']:.2f} images/s); {s['done']} images were already done; "
          f"run {s['run_id']}; output: {s['output']}")
    if s["error_rate"] > config.max_error_rate:
        print(f"error: {s['images_error']} of {s['images']} images ({s['error_rate']:.1%}) are error rows, over "
              f"--max-error-rate {config.max_error_rate}; list them with ifcn-report --output "
              f"{s['output']} (\"What went wrong\"), or read_output('{s['output']}', 'images', "
              f"filter=pyarrow.dataset.field('status') == 'error')", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
