"""Is the training step fed? Steps/s with images in memory vs on an S3 endpoint, with and without prefetch.

    OMP_NUM_THREADS=1 python bench/train.py                        # CPU: narrow model, the small preset's scales
    python bench/train.py --device cuda --backbone vgg16 --scales 600 --size 640 --steps 60   # a GPU

One process, one synthetic dataset (written once, then copied to fsspec's memory:// and to a real S3
endpoint: moto's server on loopback, started with tests/fixtures_infra.py's helper), the real
training loop (ifcn.train.train_local) in four modes, interleaved over --rounds rounds, best round
of each (the least disturbed on a shared machine):
    memory   / in-step   images decoded from RAM inside the step (data_workers=0)
    memory   / prefetch  the same, decoded ahead by --data-workers DataLoader processes
    s3       / in-step   every step GETs its PNG from the endpoint, then decodes it
    s3       / prefetch  the GETs and decoding happen ahead of the step
Steps/s is measured from the loop's own per-step clock (loss.csv's elapsed_s), after --skip
warm-up steps, and with it the share of the time the step waited for its data (data_s): what a GPU
would idle. Ratios printed: s3/memory with prefetch (the target: >= 0.9), s3/memory without,
and what prefetch buys on each source.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path, where bench/pipeline.py would shadow the `pipeline` package.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # fixtures_infra: the tests' S3 endpoint helper

import fsspec  # noqa: E402
import torch  # noqa: E402

from ifcn.data import SynthConfig, write_synthetic_dataset  # noqa: E402
from ifcn.train import TrainConfig, train_local  # noqa: E402

MODES: tuple[tuple[str, bool], ...] = (("memory", False), ("memory", True), ("s3", False), ("s3", True))


def copy_tree(src: Path, fs: fsspec.AbstractFileSystem, dest: str) -> None:
    """Every file under src to dest/<relative path> on fs."""
    for path in sorted(src.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{dest}/{path.relative_to(src).as_posix()}", path.read_bytes())


def run_mode(root: str, storage_options: dict | None, prefetch: bool, args: argparse.Namespace,
             out: Path) -> tuple[float, float]:
    """Steps/s of one short training run (after the warm-up steps) and the share of that time the
    step waited for its data (the loop's data_s column)."""
    config = TrainConfig(images=f"{root}/images", annotations=f"{root}/annotations.json", output=str(out),
                         backbone=args.backbone, scales=tuple(args.scales), steps=args.steps, lr_step=args.steps,
                         log_every=1, checkpoint_every=10**9, seed=0, use_gpu=args.device == "cuda",
                         data_workers=args.data_workers if prefetch else 0, prefetch=args.prefetch,
                         storage_options=storage_options)
    history = train_local(config, log=lambda _: None)["history"]
    clock = [r["elapsed_s"] for r in history]
    timed = clock[-1] - clock[args.skip - 1]
    return (len(clock) - args.skip) / timed, sum(r["data_s"] for r in history[args.skip:]) / timed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vgg16_narrow")
    p.add_argument("--scales", type=int, nargs="+", default=[192, 256, 320, 384])
    p.add_argument("--size", type=int, default=SynthConfig.size, help="synthetic image side (px)")
    p.add_argument("--num-images", type=int, default=40)
    p.add_argument("--steps", type=int, default=50, help="steps per mode and round")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps not timed (worker start, first forward)")
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    if args.skip < 1 or args.steps <= args.skip + 1:
        p.error("need 1 <= --skip < --steps - 1")

    from fixtures_infra import S3Server

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp_path = Path(tmp)
        local = tmp_path / "data"
        write_synthetic_dataset(str(local), args.num_images, seed=0, config=SynthConfig(size=args.size))
        memory = fsspec.filesystem("memory")
        copy_tree(local, memory, "/bench-train")
        server = S3Server.start(tmp_path)
        try:
            os.environ.update(server.env)  # endpoint and credentials as a user would set them (AWS_*)
            s3 = fsspec.filesystem("s3", skip_instance_cache=True)
            s3.mkdir("bench-train")
            copy_tree(local, s3, "bench-train")
            roots = {"memory": ("memory:///bench-train", None), "s3": ("s3://bench-train", None)}
            rates: dict[tuple[str, bool], list[float]] = {m: [] for m in MODES}
            waits: dict[tuple[str, bool], list[float]] = {m: [] for m in MODES}
            t = time.perf_counter()
            for r in range(args.rounds):
                for source, prefetch in MODES:
                    root, options = roots[source]
                    out = tmp_path / f"run-{source}-{prefetch}-{r}"
                    rate, wait = run_mode(root, options, prefetch, args, out)
                    rates[(source, prefetch)].append(rate)
                    waits[(source, prefetch)].append(wait)
            wall = time.perf_counter() - t
        finally:
            server.stop()

    best = {m: max(v) for m, v in rates.items()}
    print(f"bench/train.py: {args.backbone}, scales {args.scales}, {args.num_images} synthetic {args.size} px PNGs, "
          f"{args.steps} steps per run ({args.skip} untimed), device {args.device}, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"data workers {args.data_workers} x prefetch {args.prefetch}, {args.rounds} rounds in {wall:.0f} s")
    print(f"{'source':<8} {'loading':<10} {'steps/s (best)':>15} {'waiting for data':>17}   steps/s per round")
    for (source, prefetch), values in rates.items():
        wait = waits[(source, prefetch)][values.index(best[(source, prefetch)])]
        print(f"{source:<8} {'prefetch' if prefetch else 'in-step':<10} {best[(source, prefetch)]:>15.2f} "
              f"{100 * wait:>16.1f}%   " + " ".join(f"{v:.2f}" for v in values))
    print(f"s3 / memory, prefetch:        {best[('s3', True)] / best[('memory', True)]:.3f}   (target >= 0.9)")
    print(f"s3 / memory, in-step:         {best[('s3', False)] / best[('memory', False)]:.3f}")
    print(f"prefetch / in-step, memory:   {best[('memory', True)] / best[('memory', False)]:.3f}")
    print(f"prefetch / in-step, s3:       {best[('s3', True)] / best[('s3', False)]:.3f}")
    print(f"s3 prefetch / memory in-step: {best[('s3', True)] / best[('memory', False)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
