"""Writes a synthetic COCO-format dataset of touching, look-alike instances of one category.

    python -m jobs.synth --output file:///tmp/synth/train --num-images 300 --seed 0
    python -m jobs.synth --output s3://bucket/synth/val --num-images 50 --seed 1 --size 256
"""
from __future__ import annotations

import sys
from dataclasses import replace

from ifcn.data.synth import SynthConfig, write_synthetic_dataset

from ._cli import interruptible, make_parser, storage_options


@interruptible("ifcn-synth", "re-run the same command (same seed, same images) to finish the dataset")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-synth", __doc__)
    p.add_argument("--output", required=True, help="folder URL (local, file://, s3://...)")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--size", type=int, default=SynthConfig.size, help="image side in pixels")
    p.add_argument("--storage-options", type=storage_options, default=None, help="fsspec storage options as JSON")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.size < 32:
        p.error("--num-images must be >= 1 and --size >= 32")
    try:
        coco = write_synthetic_dataset(args.output, args.num_images, args.seed, replace(SynthConfig(), size=args.size),
                                       args.storage_options)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(coco['images'])} images, {len(coco['annotations'])} instances to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
