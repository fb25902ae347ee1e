"""The driver at bucket scale: planning time and memory, and driver RSS over a long run.

    python bench/scale.py plan --entries 1000000      # --dry-run on a generated 1M-entry manifest
    python bench/scale.py run --images 2000           # the job on N generated images, narrow model
    python bench/scale.py list --keys 50000           # listing an S3 prefix: memory per key
    python bench/scale.py plan run                     # plan and run

plan: writes a Parquet manifest of N URIs (no images: --dry-run reads none) and times
      `python -m jobs.segment --dry-run` on it in a child process; prints its wall time and
      peak RSS (targets: < 60 s, < 1 GB).
list: puts N empty .jpg keys under s3://<bucket>/images/ on a real S3 endpoint (moto's server on
      loopback) and lists the prefix in child processes, once as the listing did before
      (`fs.find`, which builds and caches an info dict per key) and once with `list_inputs`
      (ListObjectsV2 pages into Arrow arrays); prints each one's peak memory (tracemalloc's peak
      of Python objects plus pyarrow's allocations, after a warm-up listing loaded the S3
      client and its models), per key.
run:  runs `python -m jobs.segment` on N small generated PNGs with checkpoints/narrow_synth.pt,
      samples the driver process's RSS every 0.5 s, and prints the mean RSS of the first and
      the last quarter of the run and their ratio (target: within 10%, i.e. <= 1.10), plus
      images/s.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "narrow_synth.pt"


def _sample_rss(proc: subprocess.Popen, every_s: float, out: list[tuple[float, int]]) -> threading.Thread:
    """Samples `proc`'s own RSS (the driver; not the Ray processes it starts) until it exits."""
    def loop() -> None:
        p = psutil.Process(proc.pid)
        t0 = time.monotonic()
        while proc.poll() is None:
            try:
                out.append((time.monotonic() - t0, p.memory_info().rss))
            except psutil.NoSuchProcess:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _run_sampled(cmd: list[str], every_s: float, env: dict[str, str]) -> tuple[str, float, list[tuple[float, int]]]:
    """Runs `cmd` from the repo root while sampling its RSS; returns (stdout, wall s, samples)."""
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    sampler = _sample_rss(proc, every_s, samples)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {stderr[-2000:]}")
    return stdout, wall, samples


def bench_plan(entries: int, workdir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = workdir / "manifest.parquet"
    uris = pa.array([f"s3://bucket/images/{i // 1000:04d}/{i:08d}.jpg" for i in range(entries)])
    pq.write_table(pa.table({"uri": uris}), manifest)
    del uris
    cmd = [sys.executable, "-m", "jobs.segment", "--input", str(manifest), "--output", str(workdir / "out"),
           "--checkpoint", str(CHECKPOINT), "--dry-run"]
    stdout, wall, samples = _run_sampled(cmd, 0.1, {})
    peak = max(r for _, r in samples) if samples else 0
    print(stdout.strip())
    print(f"plan {entries} manifest entries: {wall:.1f} s (target < 60), driver peak RSS {peak / 2**20:.0f} MiB "
          f"(target < 1024; sampled every 0.1 s)")


LIST_CHILD = """
import gc, sys, time, tracemalloc
import pyarrow as pa
import s3fs
from pipeline.sources import list_inputs
fs = s3fs.S3FileSystem()  # the instance list_inputs gets too (fsspec caches it)
# warm-up on one folder of 1000 keys: S3 client, botocore models, pyarrow kernels (~25 MB of imports)
list_inputs("s3://bucket/images/0000/"); fs.find("bucket/images/0000")
fs.invalidate_cache(); gc.collect()
tracemalloc.start()
t0 = time.perf_counter()
if sys.argv[1] == "find":  # the listing before: fs.find, then Python lists of every key
    keys = [p for p in fs.find(sys.argv[2].removeprefix("s3://"), withdirs=False)]
    n = len(keys)
else:
    n = len(list_inputs(sys.argv[2]))
wall = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] + pa.total_allocated_bytes()
print(n, wall, peak)
"""


def bench_list(keys: int, workdir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import s3fs
    from fixtures_infra import S3Server

    server = S3Server.start(workdir)
    try:
        os.environ.update(server.env)  # this process's s3fs and the children reach the endpoint
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bucket")
        t0 = time.perf_counter()
        for lo in range(0, keys, 5000):
            fs.pipe({f"bucket/images/{i // 1000:04d}/{i:08d}.jpg": b"" for i in range(lo, min(keys, lo + 5000))})
        print(f"put {keys} keys in {time.perf_counter() - t0:.0f} s")
        for how in ("find", "list_inputs"):
            out = subprocess.run([sys.executable, "-c", LIST_CHILD, how, "s3://bucket/images/"], cwd=REPO,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if out.returncode != 0:
                raise SystemExit(f"list with {how} failed: {out.stderr[-2000:]}")
            n, wall, grew = out.stdout.split()
            print(f"list {how:11s}: {int(n)} keys in {float(wall):.1f} s (traced), peak {int(grew) / 2**20:.1f} MiB "
                  f"of Python objects + Arrow buffers ({int(grew) / max(1, int(n)):.0f} bytes per key)")
    finally:
        server.stop()


def bench_run(images: int, workdir: Path) -> None:
    from PIL import Image

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    for i in range(images):
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:06d}.png")
    cmd = [sys.executable, "-m", "jobs.segment", "--input", str(folder), "--output", str(workdir / "run"),
           "--checkpoint", str(CHECKPOINT), "--scales", "64,96", "--max-proposals", "50", "--shard-size", "16"]
    stdout, wall, samples = _run_sampled(cmd, 0.5, {"RAY_ADDRESS": "local"})
    print(stdout.strip())
    # The run proper: from the first commit log line's time on would need log parsing; instead drop
    # the first 20% of samples (imports, Ray start-up, planning) and compare quarters of the rest.
    rest = samples[len(samples) // 5:]
    q = max(1, len(rest) // 4)
    first, last = np.mean([r for _, r in rest[:q]]), np.mean([r for _, r in rest[-q:]])
    print(f"run {images} images: {wall:.1f} s ({images / wall:.2f} images/s end to end); driver RSS first quarter "
          f"{first / 2**20:.0f} MiB, last quarter {last / 2**20:.0f} MiB, ratio {last / first:.3f} "
          f"(target <= 1.10); peak {max(r for _, r in samples) / 2**20:.0f} MiB; {len(samples)} samples")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=("plan", "list", "run"))
    p.add_argument("--entries", type=int, default=1_000_000, help="manifest entries to plan")
    p.add_argument("--keys", type=int, default=50_000, help="S3 keys to list")
    p.add_argument("--images", type=int, default=2000, help="images for the long run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ifcn-scale-") as tmp:
        if "plan" in args.what:
            bench_plan(args.entries, Path(tmp))
        if "list" in args.what:
            bench_list(args.keys, Path(tmp))
        if "run" in args.what:
            bench_run(args.images, Path(tmp))


if __name__ == "__main__":
    main()
