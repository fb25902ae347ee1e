r"""Trains InstanceFCN (or DeepMask, or the one-map FCN baseline: --model) with Ray Train on a COCO-format dataset.

    python -m jobs.train --images file:///data/train/images --annotations file:///data/train/annotations.json \
        --output file:///runs/small --max-minutes 10                     # preset "small": a CPU, 10 minutes
    python -m jobs.train --preset paper --use-gpu --num-workers 8 --amp bf16 --vgg16-weights s3://.../vgg16.pth \
        --images s3://bucket/coco/train2014 --annotations s3://bucket/coco/instances_train2014.json \
        --output s3://bucket/runs/paper --val-images s3://bucket/coco/val2014 \
        --val-annotations s3://bucket/coco/instances_val2014.json --val-every 2000 --val-max-images 200

Re-running with the same --output resumes from its last checkpoint. The final model is
<output>/model.pt (ifcn.load_checkpoint; the baseline: ifcn.load_baseline), the best
validated one <output>/best.pt.
"""
from __future__ import annotations

import argparse
import sys

from ifcn.config import BACKBONES
from ifcn.train.config import AMP, MODELS, PRESETS, TrainConfig

from ._cli import interruptible, make_parser, scales, show_defaults, storage_options

# flag dest -> TrainConfig field, where the names differ
_RENAMED = {"no_flip": "flip"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig("", "", "")
    presets = "; ".join(f"{name}: {', '.join(f'{k} {v}' for k, v in values.items())}" for name, values in PRESETS.items())
    p = make_parser("ifcn-train", __doc__)
    p.add_argument("--images", required=True, help="folder URL holding the COCO file_name entries")
    p.add_argument("--annotations", required=True, help="COCO instances JSON URL")
    p.add_argument("--output", required=True, help="folder URL for checkpoints, model.pt and the loss curve")
    p.add_argument("--model", choices=MODELS, help="what to train")
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"default {d.preset}; what the flags below default "
                   f"to ({presets})")
    p.add_argument("--backbone", choices=BACKBONES, help="default: the preset's")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP), one image each per step")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs per Ray Train worker")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--amp", choices=AMP, help="autocast the forward and loss in this dtype (CUDA)")
    p.add_argument("--lr", type=float,
                   help="default: 0.001 (paper) for vgg16, 0.02 with warmup for vgg16_narrow (from scratch)")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay")
    p.add_argument("--steps", type=int, help="schedule length in iterations (default: the preset's)")
    p.add_argument("--lr-step", type=int, help="iteration where lr drops 10x (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="iterations of linear lr warm-up (default: the preset's)")
    p.add_argument("--windows-per-image", type=int, help="training windows sampled per image per step")
    p.add_argument("--scales", type=scales, help="training short sides in px, comma-separated (default: the preset's)")
    p.add_argument("--max-size", type=int, help=f"cap on the resized long side (default {d.max_size}, inference's)")
    p.add_argument("--no-flip", action="store_false", default=None, help="disable horizontal flip augmentation")
    p.add_argument("--vgg16-weights", help="ImageNet VGG-16 state dict URL (torchvision layout)")
    p.add_argument("--max-minutes", type=float, help="training-time budget (all resumed runs together); warm-up "
                   "and the lr drop move with it so a run stopped by time has decayed its lr")
    p.add_argument("--max-steps", type=int, help="stop at this step (the schedule keeps --steps)")
    p.add_argument("--data-workers", type=int, help=f"processes per worker decoding and augmenting ahead of the "
                   f"step (default {d.data_workers}; 0: in the step)")
    p.add_argument("--prefetch", type=int, help=f"steps each data process keeps ready (default {d.prefetch})")
    p.add_argument("--val-images", help="validation image folder URL (with --val-annotations)")
    p.add_argument("--val-annotations", help="validation COCO JSON: AR@100 logged, in loss.csv/png, best.pt kept")
    p.add_argument("--val-every", type=int, help=f"steps between validations (default {d.val_every})")
    p.add_argument("--val-max-images", type=int, help=f"validate on the first N images (default {d.val_max_images})")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (resume points)")
    p.add_argument("--log-every", type=int, help="steps between progress lines")
    p.add_argument("--seed", type=int, help="random seed (sampling, augmentation, init)")
    p.add_argument("--storage-options", type=storage_options, help="fsspec storage options as JSON")
    show_defaults(p, {a.dest: getattr(d, a.dest) for a in p._actions if a.default is None and hasattr(d, a.dest)
                      and not isinstance(getattr(d, a.dest), bool)})
    args = p.parse_args(argv)
    for name in ("num_workers", "cpus_per_worker", "steps", "lr_step", "max_steps", "prefetch", "val_every",
                 "val_max_images", "checkpoint_every", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.windows_per_image is not None and args.windows_per_image < 2:
        p.error("--windows-per-image must be >= 2")
    if args.data_workers is not None and args.data_workers < 0:
        p.error("--data-workers must be >= 0")
    if args.scales is not None and min(args.scales) < 32:
        p.error(f"--scales {args.scales}: every short side must be >= 32")
    if (args.val_images is None) != (args.val_annotations is None):
        p.error("give --val-images and --val-annotations together")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Only the flags a user set reach TrainConfig: its defaults and presets stay the one source."""
    given = {_RENAMED.get(k, k): v for k, v in vars(args).items() if v is not None}
    if "scales" in given:
        given["scales"] = tuple(given["scales"])
    return TrainConfig(**given)


@interruptible("ifcn-train", "re-running the same command resumes from the last checkpoint (see --checkpoint-every)")
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
