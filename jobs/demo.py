"""The whole flow on one machine with no setup: synthetic bucket -> model -> Ray job -> AR -> pictures.

    ifcn-demo --output demo_out            # uses the shipped checkpoints/narrow_synth.pt
    ifcn-demo --output demo_out --train-minutes 5   # trains a fresh narrow model first

Everything runs on local Ray over local files, the same code paths as a cluster run over s3://.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from ._cli import RESUME, interruptible, make_parser

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "narrow_synth.pt"
# Inference scales for the 256 px synthetic images: objects of 56-128 px reach the 81-114 px
# positive range of the 168 px window at one of these short sides.
DEMO_SCALES = (192, 256, 320, 384)
VAL_SEED = 1000  # the shipped model was trained on seed 0; evaluate on images it never saw
TRAIN_SEED = 0
TRAIN_STEPS = 2000  # the shipped model's schedule: ~7.5 min on 2 cores, lr drops 10x at 80%


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("ifcn-demo", __doc__)
    p.add_argument("--output", default="demo_out", help="folder for the bucket, tables, AR and pictures")
    p.add_argument("--num-images", type=int, default=32, help="images in the synthetic bucket")
    p.add_argument("--train-minutes", type=float, default=0.0,
                   help="train a fresh narrow model for this long (0: use the shipped checkpoint)")
    p.add_argument("--pictures", type=int, default=4, help="overlay pictures to write")
    p.add_argument("--max-proposals", type=int, default=100)
    args = p.parse_args(argv)
    if args.num_images < 1 or args.pictures < 0 or args.train_minutes < 0:
        p.error("--num-images must be >= 1, --pictures and --train-minutes >= 0")
    return args


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


@interruptible("ifcn-demo", RESUME)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ifcn.data.synth import write_synthetic_dataset
    from .evaluate import evaluate
    from .show import show
    from ifcn.evaluation.recall import format_table
    from pipeline.config import SegmentConfig, SegmentError
    from pipeline.report.build import describe, write_report
    from pipeline.run import run_segment

    out = Path(args.output).resolve()
    began = time.perf_counter()

    t = _step(f"1/6 synthetic bucket: {args.num_images} images (seed {VAL_SEED}) -> {out / 'bucket'}")
    write_synthetic_dataset(str(out / "bucket"), args.num_images, VAL_SEED)
    print(f"   {time.perf_counter() - t:.1f}s")

    t = _step("2/6 model")
    if args.train_minutes > 0 or not SHIPPED_CHECKPOINT.exists():
        from ifcn.train import train
        from ifcn.train.config import TrainConfig

        minutes = args.train_minutes or 3.0
        write_synthetic_dataset(str(out / "train"), 200, TRAIN_SEED)
        print(f"   training vgg16_narrow for {minutes:g} min on {out / 'train'}")
        checkpoint = train(TrainConfig(images=str(out / "train" / "images"),
                                       annotations=str(out / "train" / "annotations.json"),
                                       output=str(out / "model"), backbone="vgg16_narrow",
                                       scales=DEMO_SCALES, steps=TRAIN_STEPS, lr_step=TRAIN_STEPS * 4 // 5,
                                       max_minutes=minutes))
    else:
        checkpoint = str(SHIPPED_CHECKPOINT)
        print(f"   shipped checkpoint {checkpoint} (reproduce: see README 'Training')")
    print(f"   {time.perf_counter() - t:.1f}s")

    t = _step("3/6 jobs.segment on local Ray")
    try:
        config = SegmentConfig.from_options(str(out / "bucket" / "images"), str(out / "segments"), checkpoint,
                                            scales=DEMO_SCALES, max_proposals=args.max_proposals)
        summary = run_segment(config)
    except SegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"   {summary['images_ok']} ok, {summary['images_error']} error, {summary['proposals']} proposals, "
          f"{summary['images_per_s']:.2f} images/s -> {summary['output']}")

    t = _step("4/6 jobs.evaluate (class-agnostic COCO AR, pycocotools)")
    report = evaluate(str(out / "bucket" / "annotations.json"), predictions=str(out / "segments"),
                      out=str(out / "ar.json"))
    print(format_table(report["metrics"], report["iou_protocol"]))
    print(f"   {time.perf_counter() - t:.1f}s -> {out / 'ar.json'}")

    t = _step(f"5/6 jobs.show: {args.pictures} overlay pictures")
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in (out / "bucket" / "images").iterdir())[: args.pictures]:
        png = out / "pictures" / f"{Path(name).stem}.png"
        show(str(out / "segments"), name, str(png), top=10)
        print(f"   {png}")

    t = _step("6/6 jobs.report: the run report (one self-contained HTML page)")
    summary = write_report(str(out / "segments"), str(out / "report.html"),
                           annotations=str(out / "bucket" / "annotations.json"))
    print(f"   {describe(summary)}")

    print(f"\ndone in {time.perf_counter() - began:.0f}s. Query the tables, e.g.:\n"
          f"   .venv/bin/python -c \"import duckdb, deltalake; t = deltalake.DeltaTable('{out}/segments/segments')"
          f".to_pyarrow_dataset(); duckdb.sql('SELECT image_id, num_proposals, proposals[1].score AS best "
          f"FROM t ORDER BY 1').show()\"\n"
          f"   ifcn-show --output {out}/segments --history        # after: source .venv/bin/activate\n"
          f"   ifcn-show --output {out}/segments --image 000005.png --out top.png\n"
          f"   ifcn-export --output {out}/segments --json {out}/results.json   # COCO results JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
