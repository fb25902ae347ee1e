"""Kernel ops per image and syncs per batch of `Predictor.proposals` with the device postprocess, box and
mask NMS, forward included (ifcn.tools.opcount), on 480x640 random uint8 images with the narrow model and random
heads (torch.manual_seed(0)). CPU is enough: the counts are deterministic and the same on any machine.

    python bench/nms_counts.py                                   # batches 2 and 4, 250 windows per scale
    python bench/nms_counts.py --batches 4 --windows 1000 --max-proposals 1000 --nms mask   # paper's defaults
    python bench/nms_counts.py --batches 2 --windows 1000 --max-proposals 1000 --heads structured

Prints one line per (nms, batch): kernel ops / image, syncs / batch (sync ops + host reads), bytes written
per image by the postprocess (every stage but the forward's "windows") and by stage, seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ifcn import InferenceConfig, InstanceFCN, ModelConfig, Predictor  # noqa: E402
from ifcn.tools.opcount import OpCounter  # noqa: E402

GB = 1e9


def count(model: InstanceFCN, nms: str, batch: int, windows: int, max_proposals: int) -> dict:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
    config = InferenceConfig(nms=nms, windows_per_scale=windows, max_proposals=max_proposals)
    predictor = Predictor(model, config, "cpu", postprocess_on="device")
    t0 = time.perf_counter()
    with OpCounter() as counter:
        out = predictor.proposals(images)
    c = counter.counts
    return {"nms": nms, "batch": batch, "ops_per_image": c.kernel_ops / batch, "syncs": c.syncs,
            "sync_ops": c.sync_ops, "host_reads": c.host_reads, "kept": [len(p) for p in out],
            "seconds": time.perf_counter() - t0, "by_op": counter.by_op, "bytes_by_op": counter.bytes_by_op,
            "bytes_by_stage": dict(counter.bytes_by_stage), "post_bytes": post_bytes(counter) / batch}


def post_bytes(counter: OpCounter) -> int:
    """Bytes the postprocess writes: every stage but the forward's ("windows")."""
    return sum(v for k, v in counter.bytes_by_stage.items() if k != "windows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--nms", nargs="+", default=["box", "mask"])
    ap.add_argument("--windows", type=int, default=250, help="windows per scale")
    ap.add_argument("--max-proposals", type=int, default=250)
    ap.add_argument("--heads", choices=("random", "structured"), default="random",
                    help="structured: louder score/objectness heads (tests' `model`): masks with structure")
    ap.add_argument("--top", type=int, default=0, help="also print the N most counted ops and every sync")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = InstanceFCN(ModelConfig("vgg16_narrow")).eval()
    if args.heads == "structured":  # as tests/conftest.py's `model`
        torch.nn.init.normal_(model.score_head[-1].weight, std=0.5)
        torch.nn.init.normal_(model.objectness_head[-1].weight, std=0.5)
    for nms in args.nms:
        for b in args.batches:
            r = count(model, nms, b, args.windows, args.max_proposals)
            print(f"{r['nms']:4s} batch {r['batch']:2d}: {r['ops_per_image']:8.0f} kernel ops / image, "
                  f"{r['syncs']:4d} syncs / batch ({r['sync_ops']} + {r['host_reads']}), kept {r['kept']}, "
                  f"{r['seconds']:.0f} s", flush=True)
            stages = ", ".join(f"{k} {v / b / GB:.3f}" for k, v in sorted(r["bytes_by_stage"].items()))
            print(f"     postprocess writes {r['post_bytes'] / GB:.3f} GB / image (by stage, GB / image: {stages})",
                  flush=True)
            if args.top:
                ops = r["by_op"]
                print("   ", ", ".join(f"{n} {v}" for n, v in ops.most_common(args.top)))
                print("   ", ", ".join(f"{n} {v}" for n, v in ops.items() if n.startswith(("sync:", "read:"))))
                print("    GB / image:", ", ".join(f"{n} {v / b / GB:.3f}" for n, v in r["bytes_by_op"].most_common(args.top)))


if __name__ == "__main__":
    main()
