"""Runs a trained model (made for the one-map FCN baseline) over a COCO dataset's images to COCO results.

Any --model of jobs.train works: the checkpoint's kind picks the predictor (ifcn.models.registry), as in
jobs.evaluate; the baseline's is connected components of its foreground map.

Train it with `python -m jobs.train --model fcn-baseline ...`; then
    python -m jobs.baseline --checkpoint file:///runs/base/model.pt --images file:///data/val/images \
        --annotations file:///data/val/annotations.json --output file:///runs/base/results.json --scales 192,256,320,384
    python -m jobs.evaluate --annotations file:///data/val/annotations.json --predictions file:///runs/base/results.json
writes COCO results JSON (one entry per proposal) that jobs.evaluate scores like InstanceFCN's.
"""
from __future__ import annotations

import json
import sys
from ._cli import interruptible, make_parser, scales, storage_options


@interruptible("ifcn-baseline", "no results file was written; re-run the same command")
def main(argv: list[str] | None = None) -> int:
    p = make_parser("ifcn-baseline", __doc__)
    p.add_argument("--checkpoint", required=True, help="model.pt written by jobs.train (e.g. --model fcn-baseline)")
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--output", required=True, help="COCO results JSON URL")
    p.add_argument("--scales", type=scales, default=None, help="comma-separated short sides (default: the paper's six)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--storage-options", type=storage_options, default=None, help="fsspec options as JSON")
    args = p.parse_args(argv)
    from ifcn import InferenceConfig
    from ifcn.models.checkpoint import load_model
    from ifcn.data import CocoDataset
    from ifcn.inference.predictor import predictor_for
    from ifcn.evaluation.recall import predictions_to_results
    from ifcn.io import open_url

    try:
        config = InferenceConfig(scales=args.scales) if args.scales else InferenceConfig()
        model, _ = load_model(args.checkpoint, args.storage_options)
        predictor = predictor_for(model, config)
        ds = CocoDataset(args.images, args.annotations, args.storage_options)
        results = []
        n = len(ds) if args.limit is None else min(args.limit, len(ds))
        for i in range(n):
            results += predictions_to_results(ds.images[i]["id"], predictor.predict(ds.read_image(i)))
        with open_url(args.output, "w", args.storage_options) as f:
            json.dump(results, f)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(results)} proposals for {n} images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
