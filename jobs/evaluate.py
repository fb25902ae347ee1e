"""Class-agnostic mask average recall (AR@10/100/1000, by size) of InstanceFCN proposals on COCO.

Run a checkpoint over the annotation file's images:
    python -m jobs.evaluate --annotations file:///data/coco/annotations/instances_val2014.json \\
        --checkpoint s3://bucket/ifcn.pt --images s3://bucket/coco/val2014 --limit 5000 --iou-protocol deepmask
or score existing proposals (a COCO results JSON, or a pipeline output folder (with segments/)):
    python -m jobs.evaluate --annotations ann.json --predictions s3://bucket/out/run1
Prints a table and writes the numbers as JSON (--out, or next to the predictions).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any, TextIO


from ifcn.evaluation.recall import (IOU_LABELS, IOU_PROTOCOLS, RESULT_COLUMNS, average_recall, format_table, load_gt,
                           load_results_json, predictions_to_results, rank_filter, results_from_masks, up_to)
from ifcn.config import NMS_MODES, InferenceConfig
from ifcn.image import ImageError, decode_image
from ifcn.io import filesystem, join, open_url, write_bytes

from ._cli import interruptible, make_parser, scales, storage_options


class Progress:
    """A one-line counter on stderr (rewritten in place on a terminal, every ~5% otherwise)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.start, self.done = time.perf_counter(), 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.tty and self.done != self.total and self.done % max(1, self.total // 20):
            return
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(1, self.done)
        eta = rate * (self.total - self.done)
        line = f"{self.label}: {self.done}/{self.total} images, {rate:.2f} s/image, ETA {eta:.0f} s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def predict_images(gt: dict, checkpoint: str, images: str, scales: tuple[int, ...] | None = None,
                   max_proposals: int | None = None, limit: int | None = None, device: str | None = None,
                   storage_options: dict | None = None, progress: bool = True,
                   nms: str | None = None) -> tuple[list[dict], list[int]]:
    """Runs the checkpoint's predictor over the annotation file's images (file order, first `limit`):
    ifcn.Predictor for InstanceFCN and DeepMask, connected components for the FCN baseline
    (ifcn.inference.predictor.predictor_for picks it by the checkpoint's kind).

    Returns COCO results entries and the evaluated image ids.
    """
    from ifcn.models.checkpoint import load_model
    from ifcn.inference.predictor import predictor_for

    overrides: dict[str, Any] = {}
    if scales:
        overrides["scales"] = tuple(scales)
    if max_proposals:
        overrides["max_proposals"] = int(max_proposals)
    if nms:
        overrides["nms"] = nms
    model, _ = load_model(checkpoint, storage_options)
    predictor = predictor_for(model, InferenceConfig(**overrides), device)
    todo = gt["images"][:limit] if limit else gt["images"]
    bar = Progress(len(todo), "jobs.evaluate") if progress else None
    results: list[dict] = []
    for img in todo:
        url = join(images, img["file_name"])
        with open_url(url, "rb", storage_options) as f:
            data = f.read()
        try:  # decoded exactly as the pipeline decodes (EXIF, alpha, 16-bit), so both AR paths agree
            pixels = decode_image(data, url)
        except ImageError as e:
            raise ValueError(f"image {url}: {e.problem}") from None
        results += predictions_to_results(img["id"], predictor.predict(pixels))
        if bar:
            bar.update()
    return results, [img["id"] for img in todo]


def is_output_folder(url: str, storage_options: dict | None = None) -> bool:
    """True for a pipeline output (a folder with segments/), False for a results file."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or folder (give a COCO results JSON or a pipeline output)")
    if fs.isdir(path):
        if not fs.exists(join(path, "segments")):
            raise FileNotFoundError(f"{url}: a folder without segments/ (expected a jobs.segment output folder)")
        return True
    return False


def output_max_proposals(url: str, storage_options: dict | None = None) -> int | None:
    """The proposals per image a jobs.segment output was made with (its table's settings)."""
    from pipeline.tables.delta import OutputTables

    settings = OutputTables(url, storage_options).settings() or {}
    kept = (settings.get("settings") or {}).get("inference", {}).get("max_proposals")
    return int(kept) if kept else None


def top_per_image(results: list[dict], n: int) -> list[dict]:
    """The n best-scored results of each image."""
    by_image: dict[Any, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return [r for rs in by_image.values() for r in sorted(rs, key=lambda r: -float(r["score"]))[:n]]


def default_out(predictions: str | None, save_predictions: str | None) -> str | None:
    """Where the numbers go when --out is not given: beside the predictions."""
    src = predictions or save_predictions
    if src is None:
        return None
    if predictions and not predictions.rstrip("/").endswith(".json"):
        return join(predictions, "ar.json")  # inside the pipeline output folder
    return src[:-5] + ".ar.json" if src.endswith(".json") else src + ".ar.json"


def write_json(url: str, obj: Any, storage_options: dict | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=2).encode(), storage_options)


def evaluate(annotations: str | dict, *, checkpoint: str | None = None, images: str | None = None,
             predictions: str | None = None, scales: tuple[int, ...] | None = None,
             max_proposals: int | None = None, iou_protocol: str = "coco", limit: int | None = None,
             device: str | None = None, save_predictions: str | None = None, out: str | None = None,
             storage_options: dict | None = None, progress: bool = True, nms: str | None = None) -> dict[str, Any]:
    """AR of a checkpoint (run over `images`) or of saved `predictions`; returns (and writes to `out`) a report.

    The report: {"metrics": {AR@10, ...}, "iou_protocol", "iou_thresholds", "num_images", "num_results", ...}.
    """
    if (checkpoint is None) == (predictions is None):
        raise ValueError("give exactly one of checkpoint (with images) or predictions")
    if checkpoint is not None and images is None:
        raise ValueError("checkpoint needs images: the root URL that the annotations' file_names are relative to")
    if iou_protocol not in IOU_PROTOCOLS:
        raise ValueError(f"iou_protocol={iou_protocol!r}: choose one of {list(IOU_PROTOCOLS)}")
    gt = load_gt(annotations, storage_options)
    image_ids = None
    kept = max_proposals  # AR@k is reported for k up to the proposals per image the results can have
    if checkpoint is not None:
        kept = max_proposals or InferenceConfig().max_proposals
        results, image_ids = predict_images(gt, checkpoint, images, scales, max_proposals, limit, device,
                                            storage_options, progress, nms)
        if save_predictions:
            write_json(save_predictions, results, storage_options)
    else:
        if scales or nms:
            raise ValueError("scales and nms only apply with checkpoint (saved predictions are already made)")
        if is_output_folder(predictions, storage_options):
            from pipeline import read_output  # committed shards only: right during a run or after a crash

            masks = read_output(predictions, "masks", list(RESULT_COLUMNS), rank_filter(max_proposals),
                                storage_options)
            results = results_from_masks(masks, gt)
            kept = min(filter(None, (max_proposals, output_max_proposals(predictions, storage_options))),
                       default=None)
        else:
            results = load_results_json(predictions, storage_options)
            if max_proposals:
                results = top_per_image(results, max_proposals)
        if limit:
            image_ids = [img["id"] for img in gt["images"][:limit]]
    evaluated = set(image_ids) if image_ids is not None else {img["id"] for img in gt["images"]}
    predicted = {r["image_id"] for r in results} & evaluated
    report = {
        "metrics": up_to(average_recall(gt, results, iou_protocol, image_ids), kept),
        "kept_proposals": kept,
        "iou_protocol": iou_protocol,
        "iou_thresholds": [round(float(t), 4) for t in IOU_PROTOCOLS[iou_protocol]],
        "num_images": len(evaluated),
        "num_images_with_predictions": len(predicted),
        "num_results": len(results),
        "annotations": annotations if isinstance(annotations, str) else None,
        "checkpoint": checkpoint,
        "predictions": predictions,
        "max_proposals": max_proposals,
        "scales": list(scales) if scales else None,
        "nms": nms,
    }
    out = out or default_out(predictions, save_predictions)
    if out:
        write_json(out, report, storage_options)
        report["out"] = out
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("ifcn-evaluate", __doc__)
    p.add_argument("--annotations", required=True, help="COCO instances JSON (any fsspec URL)")
    p.add_argument("--checkpoint", help="model.pt of jobs.train (any --model: instancefcn, deepmask, fcn-baseline) "
                   "to run over the annotations' images")
    p.add_argument("--images", help="root URL that the annotations' file_names are relative to (with --checkpoint)")
    p.add_argument("--predictions", help="COCO results JSON, or a pipeline output folder (with segments/)")
    p.add_argument("--scales", type=scales, help="comma-separated short sides, e.g. 119,178,267,400,600,900 (with --checkpoint)")
    p.add_argument("--max-proposals", type=int, help="keep at most N proposals per image")
    p.add_argument("--nms", choices=NMS_MODES, help="with --checkpoint: NMS by box IoU (default, the paper's) "
                   "or mask IoU")
    p.add_argument("--limit", type=int, help="evaluate only the first N images of the annotations")
    p.add_argument("--iou-protocol", choices=sorted(IOU_PROTOCOLS), default="coco",
                   help="; ".join(f"{k}: {v}" for k, v in IOU_LABELS.items()))
    p.add_argument("--device", help="torch device for --checkpoint (default: cuda if available)")
    p.add_argument("--save-predictions", help="write the --checkpoint run's COCO results JSON here")
    p.add_argument("--out", help="where to write the numbers as JSON (default: beside the predictions)")
    p.add_argument("--storage-options", type=storage_options, help="JSON dict for fsspec, e.g. '{\"anon\": true}'")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.predictions is None):
        p.error("give exactly one of --checkpoint (with --images) or --predictions")
    if args.checkpoint and not args.images:
        p.error("--checkpoint needs --images, the root that the annotations' file_names are relative to")
    for name in ("scales", "nms"):
        if getattr(args, name) and not args.checkpoint:
            p.error(f"--{name} only applies with --checkpoint")
    for name in ("max_proposals", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


@interruptible("ifcn-evaluate", "no numbers were written; re-run the same command")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            report = evaluate(args.annotations, checkpoint=args.checkpoint, images=args.images,
                              predictions=args.predictions, scales=args.scales, max_proposals=args.max_proposals,
                              iou_protocol=args.iou_protocol, limit=args.limit, device=args.device,
                              save_predictions=args.save_predictions, out=args.out,
                              storage_options=args.storage_options, nms=args.nms)
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            print(f"jobs.evaluate: error: {msg}", file=sys.stderr)
            return 2
        finally:
            for w in caught:
                if issubclass(w.category, UserWarning):
                    print(f"jobs.evaluate: warning: {w.message}", file=sys.stderr)
    print(format_table(report["metrics"], args.iou_protocol))
    print(f"  images: {report['num_images']} ({report['num_images_with_predictions']} with predictions), "
          f"proposals: {report['num_results']}")
    if report["num_images_with_predictions"] < report["num_images"]:
        print("  note: images without predictions count as misses (use --limit to evaluate a prefix)")
    print(f"  written to {report['out']}" if "out" in report else "  (not written: give --out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
