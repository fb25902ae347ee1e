"""Trains InstanceFCN (or the one-map FCN baseline) with Ray Train on a COCO-format dataset.

    python -m jobs.train --images file:///data/train/images --annotations file:///data/train/annotations.json \
        --output file:///runs/narrow --backbone vgg16_narrow --scales 192 256 320 384 --max-minutes 10

Re-running with the same --output resumes from its last checkpoint. The final model is
<output>/model.pt (ifcn.load_checkpoint; the baseline: ifcn.baseline.load_baseline).
"""
from __future__ import annotations

import argparse
import sys

from ifcn.config import BACKBONES
from ifcn.train.config import MODELS, TrainConfig
from jobs._cli import Parser, storage_options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig("", "", "")
    p = Parser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder URL holding the COCO file_name entries")
    p.add_argument("--annotations", required=True, help="COCO instances JSON URL")
    p.add_argument("--output", required=True, help="folder URL for checkpoints, model.pt and the loss curve")
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="Ray Train workers (DDP)")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 0.001 (paper) for vgg16, 0.02 with warmup for vgg16_narrow (from scratch)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--steps", type=int, default=d.steps, help="schedule length in iterations")
    p.add_argument("--lr-step", type=int, default=d.lr_step, help="iteration where lr drops 10x")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--windows-per-image", type=int, default=d.windows_per_image)
    p.add_argument("--scales", type=int, nargs="+", default=list(d.scales), help="training short sides")
    p.add_argument("--max-size", type=int, default=d.max_size)
    p.add_argument("--no-flip", action="store_true", help="disable horizontal flip augmentation")
    p.add_argument("--vgg16-weights", default=None, help="ImageNet VGG-16 state dict URL (torchvision layout)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (the schedule keeps --steps)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--storage-options", type=storage_options, default=None, help="fsspec storage options as JSON")
    args = p.parse_args(argv)
    if args.num_workers < 1 or args.cpus_per_worker < 1 or args.steps < 1 or args.windows_per_image < 2:
        p.error("--num-workers, --cpus-per-worker, --steps must be >= 1 and --windows-per-image >= 2")
    if min(args.scales) < 32:
        p.error(f"--scales {args.scales}: every short side must be >= 32")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        images=args.images, annotations=args.annotations, output=args.output, model=args.model,
        backbone=args.backbone, num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        steps=args.steps, lr_step=args.lr_step, warmup_steps=args.warmup_steps,
        windows_per_image=args.windows_per_image, scales=tuple(args.scales), max_size=args.max_size,
        flip=not args.no_flip, vgg16_weights=args.vgg16_weights, max_minutes=args.max_minutes,
        max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        seed=args.seed, storage_options=args.storage_options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        from ifcn.train import train

        model_url = train(config)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model: {model_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
